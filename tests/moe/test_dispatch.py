"""ExpertParallel on a one-rank mesh: dispatch/combine around the grouped compute is exact."""

from __future__ import annotations

import time

import pytest
import torch

from titanserve.ipc.collectives import create_collective
from titanserve.kernels import ops
from titanserve.moe import dispatch
from titanserve.moe.balance import PairDestinations
from titanserve.moe.placement import ExpertPlacement


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [True, False])
def test_exchange_equals_local_grouped_compute(dtype, packed, monkeypatch):
    if not packed:  # force the two-message path (ids that a dtype cannot hold exactly)
        monkeypatch.setattr(dispatch, "_EXACT_IDS", {})
    g = torch.Generator().manual_seed(0)
    T, H, inter, E, K = 13, 16, 8, 8, 2
    x = torch.randn(T, H, generator=g).to(dtype)
    w_gate_up = torch.randn(E, 2 * inter, H, generator=g).to(dtype)
    w_down = torch.randn(E, H, inter, generator=g).to(dtype)
    weights, ids = ops.topk_gating(torch.randn(T, E, generator=g), K)
    weights = weights.to(dtype)
    placement = ExpertPlacement.contiguous(E)
    emap = placement.expert_map()

    def compute(xs, ws, es):
        return ops.fused_moe(xs, w_gate_up, w_down, ws.float(), es, expert_map=emap)

    def shared(xs):  # a shared expert: runs while the dispatch is in flight
        time.sleep(0.05)
        return 3 * xs

    collective = create_collective("zmq", 0, 1)
    try:
        exchange = dispatch.ExpertParallel(collective)
        out = exchange(x, weights, ids, compute, PairDestinations(placement))
        with_shared = exchange(x, weights, ids, compute, PairDestinations(placement), shared)
    finally:
        collective.close()
    # per pair, then summed in fp32: the same arithmetic as the exchange
    per_pair = compute(x.repeat_interleave(K, 0), weights.reshape(-1, 1), ids.reshape(-1, 1))
    expected = per_pair.float().view(T, K, H).sum(1).to(dtype)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    torch.testing.assert_close(with_shared, expected + 3 * x, atol=0, rtol=0)
    assert exchange.comm_time_s < 0.05  # the shared expert's time is compute, not exchange


@pytest.mark.parametrize("family", ["qwen2-moe", "qwen3-moe"])
def test_every_model_tensor_follows_the_build_device(family, tmp_path):
    """The runner builds the model inside `with torch.device(d)`; a tensor made elsewhere (the
    expert map, once) stays on the CPU and breaks every MoE step on a GPU."""
    from titanserve.core.config import ModelConfig
    from titanserve.core.model.decoder import DecoderModel
    from titanserve.launcher.tiny_models import make_tiny

    cfg = ModelConfig.from_hf(make_tiny(family, tmp_path, num_hidden_layers=2))
    placement = ExpertPlacement.contiguous(cfg.num_experts, 2, 1)
    with torch.device("meta"):
        model = DecoderModel(cfg, placement, max_positions=64)
    off = [name for name, t in [*model.named_parameters(), *model.named_buffers()]
           if t.device.type != "meta"]
    assert not off
    assert placement.expert_map().device.type == "cpu"  # outside the context: the default
    destinations = PairDestinations(ExpertPlacement.contiguous(8), torch.device("meta"))
    assert destinations.owner.device.type == "meta"


def test_a_failing_shared_expert_leaves_the_exchange_usable():
    """The dispatch is received even when the shared expert computed meanwhile raises: the
    collective is not left with an op in flight (the next exchange would be refused)."""
    placement = ExpertPlacement.contiguous(4)
    x, weights = torch.randn(3, 8), torch.full((3, 1), 1.0)
    ids = torch.tensor([[0], [1], [3]], dtype=torch.int32)

    def compute(xs, ws, es):
        return xs * ws

    def broken(xs):
        raise ValueError("shared expert failed")

    collective = create_collective("zmq", 0, 1)
    try:
        exchange = dispatch.ExpertParallel(collective)
        with pytest.raises(ValueError, match="shared expert failed"):
            exchange(x, weights, ids, compute, PairDestinations(placement), broken)
        out = exchange(x, weights, ids, compute, PairDestinations(placement))
    finally:
        collective.close()
    torch.testing.assert_close(out, x)
