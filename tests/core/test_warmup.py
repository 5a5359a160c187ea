"""The start-up warm-up (core.warmup): the shapes it runs, that it leaves the engine as it found
it, and on a GPU that it compiles every kernel variant that serving then uses."""

from __future__ import annotations

import pytest
import torch

from titanserve import LLM, SamplingParams
from titanserve.core import engine as engine_module
from titanserve.core.engine_config import EngineConfig
from titanserve.core.warmup import powers_of_two_up_to, warmup_rounds


def test_powers_of_two_end_at_the_limit():
    assert powers_of_two_up_to(1) == [1]
    assert powers_of_two_up_to(8) == [1, 2, 4, 8]
    assert powers_of_two_up_to(40) == [1, 2, 4, 8, 16, 32, 40]
    assert powers_of_two_up_to(0) == []


def test_rounds_cover_each_prefill_length_a_chunked_prompt_and_each_decode_batch():
    prefills = [(1, n) for n in (1, 2, 4, 8, 16, 32, 64)]
    assert warmup_rounds(64, 8, 1000) == prefills + [(1, 65), (2, 1), (4, 1), (8, 1)]
    # a context shorter than the budget: prompts stop at it (2 tokens are generated), no chunking
    assert warmup_rounds(64, 1, 40) == [(1, n) for n in (1, 2, 4, 8, 16, 32, 38)]


@pytest.mark.parametrize("warmup,cpu,cuda", [(None, False, True), (True, True, True),
                                             (False, False, False)])
def test_warmup_defaults_to_on_where_kernels_are_compiled(warmup, cpu, cuda):
    config = EngineConfig(model="m", warmup=warmup)
    assert config.resolve_warmup(torch.device("cpu")) is cpu
    assert config.resolve_warmup(torch.device("cuda", 0)) is cuda


def test_warmed_engine_starts_clean_and_serves_the_same(tiny_model, random_prompts, monkeypatch):
    steps = []
    real = engine_module.warm_up
    monkeypatch.setattr(engine_module, "warm_up", lambda engine: steps.append(real(engine)))
    path = tiny_model("llama")
    options = dict(max_num_batched_tokens=64, max_num_seqs=8, block_size=16, progress=False)
    prompts = random_prompts([5, 40, 90], seed=3)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    with LLM(path, warmup=False, **options) as cold:
        expected = [o.token_ids for o in cold.generate(prompts, params)]
        assert not steps
    with LLM(path, warmup=True, **options) as warm:
        engine = warm.engine
        # 7 prefill rounds and a chunked one (a prefill step and a decode step each, the
        # chunked one a step more), then 3 decode batches of 2 steps
        assert steps == [2 * 7 + 3 + 2 * 3]
        assert (engine.num_steps, engine.step_time_s, engine.compute_time_s) == (0, 0.0, 0.0)
        assert not engine.trackers and not engine.has_unfinished()
        assert engine.scheduler.num_placed_tokens == engine.scheduler.num_cached_tokens == 0
        for bm in engine.scheduler.block_managers:
            assert bm.num_free_blocks == bm.num_blocks and not bm.hash_to_block
        assert [o.token_ids for o in warm.generate(prompts, params)] == expected


def _compiled_variants() -> dict[str, int]:
    """Compiled variants of every Triton kernel of titanserve.kernels, by kernel name."""
    import importlib
    import pkgutil

    import triton

    import titanserve.kernels as package

    counts = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, fn in vars(module).items():
            if isinstance(fn, triton.runtime.jit.JITFunction):
                counts[name] = sum(len(cache[0]) for cache in fn.device_caches.values())
    return counts


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_after_the_warmup_serving_compiles_nothing(family, tiny_model, random_prompts):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    # the worker in this process: the compiled variants counted are this process's
    with LLM(tiny_model(family), max_num_batched_tokens=256, max_num_seqs=32,
             worker_processes=False, progress=False) as llm:
        before = _compiled_variants()
        lengths = [1, 3, 17, 31, 33, 100, 127, 128, 200, 255, 256, 300, 600, 1000] * 2
        prompts = random_prompts(lengths, seed=5)
        prompts += [prompts[-1] + [7] * 20]  # a prefix-cache hit
        outs = llm.generate(prompts, [SamplingParams(max_tokens=n % 37 + 1, temperature=0.0)
                                      for n in lengths + [9]])
        assert all(o.finished for o in outs)
        after = _compiled_variants()
    grew = {name: (before.get(name, 0), n) for name, n in after.items() if n != before.get(name, 0)}
    assert not grew, f"compiled while serving (kernel: (before, after)): {grew}"
