"""ExpertParallel: dispatch/combine around the grouped compute, on one rank (exact) and on
real processes (each token sent once to each worker that computes any of its pairs)."""

from __future__ import annotations

import time

import pytest
import torch

from tests.ipc.test_collectives import backend_options, spawn_collective_group
from titanserve.ipc.collectives import create_collective
from titanserve.kernels import ops
from titanserve.moe import dispatch
from titanserve.moe.balance import PairDestinations
from titanserve.moe.placement import ExpertPlacement, with_no_expert


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
    rows_computed = []

    def compute(xs, ws, es):
        rows_computed.append(xs.shape[0])
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
    assert rows_computed == [T, T]  # a row a token, not a row a pair
    expected = compute(x, weights, ids)  # one worker's arithmetic, bit for bit
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


T_RANK, H_RANK, INTER_RANK, E_RANK, K_RANK = 24, 16, 8, 8, 2


def _experts(dtype):  # every rank builds the same full set of expert weights
    g = torch.Generator().manual_seed(1)
    w_gate_up = torch.randn(E_RANK, 2 * INTER_RANK, H_RANK, generator=g).to(dtype)
    w_down = torch.randn(E_RANK, H_RANK, INTER_RANK, generator=g).to(dtype)
    return w_gate_up, w_down


def _tokens(rank: int, dtype):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(T_RANK, H_RANK, generator=g).to(dtype)
    weights, ids = ops.topk_gating(torch.randn(T_RANK, E_RANK, generator=g), K_RANK)
    return x, weights.to(dtype), ids


def exchange_on_rank(rank: int, collective, dtype=torch.bfloat16) -> dict:
    """One layer's exchange on this rank's tokens, computing only its own experts (and the
    copy of an expert of the other worker) from its slots, as an MoE layer does."""
    placement = ExpertPlacement.contiguous(E_RANK, collective.world_size, rank, redundant=1)
    w_gate_up, w_down = _experts(dtype)
    local = placement.local_experts
    emap = with_no_expert(placement.expert_map())
    received = []

    def compute(xs, ws, es):
        received.append(xs.shape[0])
        return ops.fused_moe(xs, w_gate_up[local], w_down[local], ws.float(), es,
                             expert_map=emap)

    x, weights, ids = _tokens(rank, dtype)
    out = dispatch.ExpertParallel(collective)(
        x, weights, ids, compute, PairDestinations(placement)
    )
    return {"out": out.float().tolist(), "received": received[0]}  # no tensors on a queue


def test_exchange_on_two_processes_sends_a_token_once_per_worker():
    dtype, world = torch.bfloat16, 2
    results = spawn_collective_group(world, "zmq", exchange_on_rank, **backend_options("zmq"))
    w_gate_up, w_down = _experts(dtype)
    placements = [ExpertPlacement.contiguous(E_RANK, world, r, redundant=1) for r in range(world)]
    rows = 0
    for rank in range(world):
        x, weights, ids = _tokens(rank, dtype)
        expected = ops.fused_moe(x, w_gate_up, w_down, weights.float(), ids)  # one worker
        dest = PairDestinations(placements[rank])(ids.reshape(-1).long()).view(T_RANK, K_RANK)
        one_worker = (dest == dest[:, :1]).all(1)  # (T,) tokens whose pairs meet on a worker
        assert 0 < int(one_worker.sum()) < T_RANK  # both kinds occur
        rows += T_RANK + int((~one_worker).sum())
        out = torch.tensor(results[rank]["out"]).to(dtype)
        # a token computed on one worker gets the one-worker sum exactly; the others differ
        # by the rounding of each worker's partial sum to bf16 (2**-8 of its size at most)
        torch.testing.assert_close(out[one_worker], expected[one_worker], atol=0, rtol=0)
        scale = float(expected.float().abs().max())
        torch.testing.assert_close(out, expected, atol=2**-7 * scale, rtol=0)
    assert sum(r["received"] for r in results.values()) == rows  # < T * K per rank
    assert rows < world * T_RANK * K_RANK
