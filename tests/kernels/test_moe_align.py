"""moe_align: torch implementation vs a per-expert loop, Triton vs torch (exact)."""

import pytest
import torch

from titanserve.kernels import forced_backend, ops
from titanserve.kernels.launch import interpreting
from titanserve.kernels.moe_align import max_padded_pairs, moe_align_torch, moe_align_triton

interp = pytest.mark.skipif(not interpreting(), reason="Triton is compiling (GPU): see gpu tests")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def align_loop(topk_ids, num_experts, block_m, expert_map=None):
    flat = topk_ids.reshape(-1).tolist()
    pad = len(flat)
    sorted_ids, block_experts = [], []
    for e in range(num_experts):
        run = [i for i, expert in enumerate(flat) if expert == e]
        run += [pad] * (-len(run) % block_m)
        sorted_ids += run
        local = e if expert_map is None else int(expert_map[e])
        block_experts += [local] * (len(run) // block_m)
    P = max_padded_pairs(len(flat), num_experts, block_m)
    used = len(sorted_ids)
    block_experts += [-1] * (P // block_m - used // block_m)
    return sorted_ids + [pad] * (P - used), block_experts, used


def half_local_map(num_experts):
    """Even experts live here (local index e // 2); odd ones elsewhere."""
    local = [e // 2 if e % 2 == 0 else -1 for e in range(num_experts)]
    return torch.tensor(local, dtype=torch.int32)


def make_ids(kind, T, K, E, gen):
    if kind == "one_expert":  # every token to expert E - 1 (its other slots: random)
        ids = torch.randint(0, E - 1, (T, K), generator=gen)
        ids[:, 0] = E - 1
        return ids
    if kind == "sparse":  # experts 1 and 2 only: the others get no tokens
        return torch.randint(1, 3, (T, K), generator=gen)
    return torch.randint(0, E, (T, K), generator=gen)


SHAPES = [(0, 2, 8, 4), (1, 1, 3, 16), (7, 2, 8, 4), (33, 3, 3, 16), (33, 2, 8, 1)]


@pytest.mark.parametrize("T,K,E,block_m", SHAPES)
@pytest.mark.parametrize("kind", ["random", "one_expert", "sparse"])
@pytest.mark.parametrize("mapped", [False, True])
def test_torch_matches_loop(T, K, E, block_m, kind, mapped):
    gen = torch.Generator().manual_seed(T * K + E)
    ids = make_ids(kind, T, K, E, gen)
    expert_map = half_local_map(E) if mapped else None
    sorted_ids, block_ids, used = moe_align_torch(ids, E, block_m, expert_map)
    want_sorted, want_blocks, want_used = align_loop(ids, E, block_m, expert_map)
    assert sorted_ids.dtype == block_ids.dtype == torch.int32
    assert sorted_ids.tolist() == want_sorted
    assert block_ids.tolist() == want_blocks
    assert used == want_used


@interp
@pytest.mark.parametrize("T,K,E,block_m", SHAPES)
@pytest.mark.parametrize("kind", ["random", "one_expert", "sparse"])
def test_triton_matches_torch(T, K, E, block_m, kind):
    gen = torch.Generator().manual_seed(T + K + E)
    ids = make_ids(kind, T, K, E, gen)
    expert_map = half_local_map(E) if kind == "random" else None
    got = moe_align_triton(ids, E, block_m, expert_map)
    want = moe_align_torch(ids, E, block_m, expert_map)
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1])
    assert got[2] == want[2]


@interp
def test_ops_dispatch_int32_ids():
    ids = torch.randint(0, 8, (7, 2), dtype=torch.int32)
    with forced_backend("triton"):
        got = ops.moe_align(ids, 8, 4)
    want = moe_align_torch(ids, 8, 4)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]


def test_argument_errors():
    with pytest.raises(ValueError, match="integer"):
        ops.moe_align(torch.zeros(3, 2), 8, 4)
    with pytest.raises(ValueError, match="expert_map"):
        ops.moe_align(torch.zeros(3, 2, dtype=torch.int64), 8, 4, expert_map=torch.zeros(4))


@gpu
@pytest.mark.gpu
def test_triton_matches_torch_cuda():
    ids = torch.randint(0, 64, (1025, 8), device="cuda")
    expert_map = half_local_map(64).cuda()
    got, want = moe_align_triton(ids, 64, 64, expert_map), moe_align_torch(ids, 64, 64, expert_map)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]
