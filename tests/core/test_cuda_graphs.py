"""Decode-step CUDA graphs (core.cuda_graphs): the sizes captured, that padded static-buffer
steps give exactly the eager results (on CPU through the eager stand-in, with both kernel
backends), and on a GPU that the captured graphs serve the same tokens as eager steps."""

from __future__ import annotations

import pytest
import torch

from titanserve import LLM, SamplingParams
from titanserve.core.block_tables import BlockTables
from titanserve.core.cuda_graphs import DecodeGraphs, capture_sizes
from titanserve.core.engine_config import EngineConfig
from titanserve.kernels.backend import forced_backend


def test_sizes_are_small_powers_then_multiples_of_eight_up_to_the_limit():
    assert capture_sizes(1) == [1]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert capture_sizes(4096)[-2:] == [504, 512]  # larger batches stay eager


@pytest.mark.parametrize("max_batch", [5, 8, 13])
def test_static_inputs_are_aligned_as_fresh_tensors_are(max_batch):
    # Triton compiles a kernel variant per pointer alignment: aligned like the eager steps'
    # tensors, the graphs reuse the variants those compile (and the warm-up's).
    graphs = DecodeGraphs(lambda ids, meta: ids, BlockTables(7), 16, 7, 99, max_batch,
                          torch.device("cpu"), capture=False)
    for b in graphs.sizes:
        token_ids, meta = graphs._views(b)
        parts = [token_ids, meta.positions, meta.slot_blocks, meta.slot_offsets,
                 meta.decode_context_lens, meta.decode_block_tables]
        assert all(p.data_ptr() % 16 == 0 for p in parts)
        assert meta.decode_context_lens.dtype == meta.decode_block_tables.dtype == torch.int32


def test_graphs_are_on_for_cuda_unless_eager_is_enforced():
    assert EngineConfig(model="m").uses_decode_graphs(torch.device("cuda", 0))
    assert not EngineConfig(model="m", enforce_eager=True).uses_decode_graphs(
        torch.device("cuda", 0)
    )
    assert not EngineConfig(model="m").uses_decode_graphs(torch.device("cpu"))


def _generate(llm: LLM, prompts):
    # Different lengths: the batch shrinks from 7 sequences to 1, through every padded size.
    params = [SamplingParams(max_tokens=3 + 2 * i, temperature=0.0, ignore_eos=True,
                             return_logits=True) for i in range(len(prompts))]
    return llm.generate(prompts, params)


@pytest.mark.parametrize("family,kernels", [("llama", "torch"), ("mixtral", "torch"),
                                            ("qwen2-moe", "triton")])
def test_static_padded_decode_steps_match_eager_steps(family, kernels, tiny_model,
                                                      random_prompts):
    prompts = random_prompts([5, 17, 40, 3, 29, 11, 64], seed=4)
    with LLM(tiny_model(family), block_size=4, max_num_seqs=8, enforce_eager=True,
             worker_processes=False, progress=False) as llm, forced_backend(kernels):
        expected = _generate(llm, prompts)
        runner = llm.engine.executor.runner
        # up to 4: the first decode steps stay eager, the others pad to 4, 2 or 1 rows
        assert runner.capture_decode_graphs(4, capture=False, progress=False)
        scratch = [c[:, runner.scratch_block] for c in (runner.k_caches, runner.v_caches)]
        for block in scratch:
            block.zero_()
        outs = _generate(llm, prompts)
        # decode steps of 7, 7, 6, 6, 5, 5 sequences, then 8 steps of 4 down to 1
        assert runner.decode_graphs.replays == 8
        # the padding rows wrote their keys and values to the scratch block
        assert all(block.abs().sum() > 0 for block in scratch)
    for out, ref in zip(outs, expected):
        assert out.token_ids == ref.token_ids
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)


def test_a_forward_with_collectives_stays_eager(tiny_model):
    with LLM(tiny_model("mixtral"), worker_processes=False, progress=False) as llm:
        runner = llm.engine.executor.runner
        assert runner.capture_decode_graphs(8, capture=False, progress=False)
        moe = next(m for m in runner.model.modules() if hasattr(m, "exchange"))
        moe.exchange = object()  # what a worker of several sets: all-to-alls in the forward
        assert not runner.capture_decode_graphs(8, capture=False, progress=False)
        assert runner.decode_graphs is None  # graphs captured before are dropped too


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_captured_graphs_serve_what_eager_steps_serve(family, tiny_model, random_prompts):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    prompts = random_prompts([5, 17, 40, 3, 29, 11, 64, 300, 1], seed=6)
    # in this process, where the test reads the runner's graphs
    options = dict(max_num_seqs=16, max_num_batched_tokens=256, worker_processes=False,
                   progress=False)
    with LLM(tiny_model(family), enforce_eager=True, **options) as llm:
        assert llm.engine.executor.runner.decode_graphs is None
        expected = _generate(llm, prompts)
    with LLM(tiny_model(family), **options) as llm:
        graphs = llm.engine.executor.runner.decode_graphs
        assert graphs is not None and graphs.sizes == [1, 2, 4, 8, 16]
        before = graphs.replays
        outs = _generate(llm, prompts)
        assert graphs.replays - before >= 10
    for out, ref in zip(outs, expected):
        assert out.token_ids == ref.token_ids
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=1e-4)
