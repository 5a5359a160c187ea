"""Copies of experts and expert re-placement over real worker processes: where pairs are
computed changes, the results (transformers' tokens and logits) do not."""

from __future__ import annotations

import pytest

from tests.core.test_multiworker import check_against_hf, tiny
from titanserve import LLM


@pytest.mark.parametrize(("family", "num_workers", "redundant"),
                         [("mixtral", 2, 4), ("qwen2-moe", 4, 1)])
def test_redundant_experts_match_transformers(family, num_workers, redundant, tmp_path_factory):
    """Copies of experts change which worker computes a pair, never the result: 2 workers
    holding every expert, and 4 with one copy each (the shared expert stays local)."""
    check_against_hf(tiny(family, tmp_path_factory), num_workers, "zmq",
                     num_redundant_experts=redundant)


@pytest.mark.parametrize(
    ("family", "redundant", "comm"),
    [("mixtral", 0, "zmq"), ("qwen3-moe", 1, "zmq"), ("qwen2-moe", 1, "torch")],
)
def test_rebalanced_experts_match_transformers(family, redundant, comm, tmp_path_factory):
    """Experts re-placed (and their weights reloaded) every 2 steps, while requests run:
    the results stay those of transformers, over either collective backend."""
    llm = check_against_hf(tiny(family, tmp_path_factory), 2, comm, bind=comm == "zmq",
                           expert_rebalance_steps=2, num_redundant_experts=redundant)
    assert llm.engine.layers_rebalanced > 0  # some layers did move


def test_redundant_experts_are_loaded_and_bounded(tmp_path_factory):
    from titanserve.core.errors import ConfigError

    path = tiny("mixtral", tmp_path_factory)
    with LLM(path, num_workers=2, num_redundant_experts=1, progress=False) as llm:
        workers = llm.engine.executor.workers
        assert [w.local_experts for w in workers] == [[0, 1, 2, 3, 4], [0, 4, 5, 6, 7]]
        cfg = llm.engine.model_config
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        assert [w.expert_param_count for w in workers] == [
            per_expert * 5 * len(cfg.moe_layers)
        ] * 2
    with pytest.raises(ConfigError, match="more than the 4 experts each worker owns"):
        LLM(path, num_workers=2, num_redundant_experts=5, progress=False)
    with pytest.raises(ConfigError, match="8 experts cannot be sharded over 9 workers"):
        LLM(path, num_workers=9, progress=False)
    with pytest.raises(ConfigError, match="needs a mixture-of-experts model"):
        LLM(tiny("llama", tmp_path_factory), num_workers=2, num_redundant_experts=1,
            progress=False)
    with pytest.raises(ConfigError, match="needs num_workers > 1"):
        LLM(path, num_redundant_experts=1, progress=False)
    with pytest.raises(ConfigError, match="must be >= 0"):
        LLM(path, num_workers=2, num_redundant_experts=-1, progress=False)
    with pytest.raises(ConfigError, match="expert_rebalance_steps must be >= 0"):
        LLM(path, num_workers=2, expert_rebalance_steps=-1, progress=False)
    with pytest.raises(ConfigError, match="expert_rebalance_steps needs num_workers > 1"):
        LLM(path, expert_rebalance_steps=5, progress=False)
    with pytest.raises(ConfigError, match="expert_rebalance_steps needs a mixture-of-experts"):
        LLM(tiny("llama", tmp_path_factory), num_workers=2, expert_rebalance_steps=5,
            progress=False)
    with pytest.raises(ConfigError, match="two_batch_overlap needs num_workers > 1"):
        LLM(path, two_batch_overlap=True, progress=False)
    with pytest.raises(ConfigError, match="two_batch_overlap needs a mixture-of-experts"):
        LLM(tiny("llama", tmp_path_factory), num_workers=2, two_batch_overlap=True,
            progress=False)
