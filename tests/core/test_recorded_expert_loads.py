"""Expert loads recorded by the engine and experts placed by them, over real worker processes:
the counts do not depend on the worker count, the file is written at shutdown, and layers
placed by a file hold the experts it says while the results stay transformers'."""

from __future__ import annotations

import pytest

from tests.core.test_multiworker import check_against_hf, prompts, tiny
from titanserve import LLM, SamplingParams
from titanserve.core.errors import ConfigError
from titanserve.moe.expert_loads import layer_placements, read_expert_loads, write_expert_loads

SKEWED = [100, 90, 80, 70, 1, 1, 1, 1]


def _record(path: str, out, **options) -> dict[int, list[int]]:
    token_lists = prompts()
    greedy = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    with LLM(path, progress=False, record_expert_loads=str(out), **options) as llm:
        llm.generate(token_lists, greedy)
        loads = llm.expert_loads()
        cfg = llm.engine.model_config
    # every token computed once: prompts, and each output but the last (never fed back)
    computed = sum(len(p) + 5 - 1 for p in token_lists)
    assert sorted(loads) == list(cfg.moe_layers)
    assert all(sum(counts) == cfg.top_k * computed for counts in loads.values())
    assert read_expert_loads(out, cfg.num_experts, cfg.moe_layers) == loads  # at shutdown
    return loads


def test_recorded_loads_do_not_depend_on_the_worker_count(tmp_path, tmp_path_factory):
    """One worker in the engine's process, and two (whose tokens route on either), count
    the same pairs; a mid-run read does not disturb the step in flight."""
    path = tiny("mixtral", tmp_path_factory)
    one = _record(path, tmp_path / "one.json")
    two = _record(path, tmp_path / "two.json", num_workers=2)
    assert one == two
    assert any(len(set(counts)) > 1 for counts in one.values())  # not all even: a real count


@pytest.mark.parametrize(("family", "redundant"), [("mixtral", 0), ("qwen3-moe", 1)])
def test_experts_placed_by_recorded_loads_match_transformers(family, redundant, tmp_path,
                                                             tmp_path_factory):
    """Layer 1 placed by skewed loads: each worker holds the experts the balanced placement
    gives it there (copies of the hottest, with copies), and the results stay transformers'."""
    path = tiny(family, tmp_path_factory)
    loads_file = tmp_path / "loads.json"
    write_expert_loads(loads_file, {1: SKEWED}, 8)
    options = dict(expert_loads=str(loads_file), num_redundant_experts=redundant)
    check_against_hf(path, 2, "zmq", **options)
    with LLM(path, num_workers=2, progress=False, **options) as llm:
        held = [w.layer_experts for w in llm.engine.executor.workers]
    expected = [layer_placements({1: SKEWED}, 8, 2, rank, redundant)[1] for rank in range(2)]
    assert held == [{1: p.local_experts} for p in expected]
    assert held[0][1] != [0, 1, 2, 3, 4][: 4 + redundant]  # not the contiguous share
    assert len(held[0][1]) == len(held[1][1]) == 4 + redundant
    assert sorted(set(held[0][1]) | set(held[1][1])) == list(range(8))


@pytest.mark.parametrize("num_workers", [1, 2])
def test_the_warm_ups_requests_are_not_counted(num_workers, tmp_path, tmp_path_factory):
    """The warm-up's random prompts are not traffic: counting starts from zero after it."""
    path = tiny("mixtral", tmp_path_factory)
    with LLM(path, num_workers=num_workers, warmup=True, max_num_batched_tokens=64,
             max_num_seqs=4, progress=False, record_expert_loads=str(tmp_path / "l.json")) as llm:
        assert llm.engine.num_steps == 0  # the warm-up ran, and was forgotten
        assert all(sum(counts) == 0 for counts in llm.expert_loads().values())
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, ignore_eos=True))
        assert all(sum(counts) == 2 * 4 for counts in llm.expert_loads().values())  # top-2


def test_bad_expert_load_options_are_refused(tmp_path, tmp_path_factory):
    path = tiny("mixtral", tmp_path_factory)
    loads_file = tmp_path / "loads.json"
    write_expert_loads(loads_file, {1: SKEWED[:4]}, 4)
    with pytest.raises(ConfigError, match="recorded for 4 experts; this model has 8"):
        LLM(path, num_workers=2, expert_loads=str(loads_file), progress=False)
    with pytest.raises(ConfigError, match="cannot read expert loads"):
        LLM(path, num_workers=2, expert_loads=str(tmp_path / "missing.json"), progress=False)
    with pytest.raises(ConfigError, match="expert_loads needs num_workers > 1"):
        LLM(path, expert_loads=str(loads_file), progress=False)
    with pytest.raises(ConfigError, match="record_expert_loads needs a mixture-of-experts"):
        LLM(tiny("llama", tmp_path_factory), record_expert_loads=str(loads_file),
            progress=False)
    with pytest.raises(ConfigError, match="cannot record expert loads to .*: no folder"):
        LLM(path, record_expert_loads=str(tmp_path / "missing" / "l.json"), progress=False)
    with LLM(path, progress=False) as llm, pytest.raises(ConfigError, match="only with"):
        llm.expert_loads()
