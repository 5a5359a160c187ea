"""paged_decode_attn: torch implementation vs a per-(sequence, head) loop over the block table,
Triton split-K vs torch; GQA, empty contexts, contexts ending mid-block, unused table entries."""

import math

import pytest
import torch

from titanserve.kernels import forced_backend, ops
from titanserve.kernels.launch import interpreting
from titanserve.kernels.paged_decode import (
    _length_groups,
    gather_pages,
    paged_decode_attn_torch,
    paged_decode_attn_triton,
)

interp = pytest.mark.skipif(not interpreting(), reason="Triton is compiling (GPU): see gpu tests")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def decode_loop(q, k_cache, v_cache, block_tables, context_lens):
    B, Hq, D = q.shape
    block_size, Hk = k_cache.shape[1], k_cache.shape[2]
    out, lse = torch.zeros(B, Hq, D), torch.full((B, Hq), float("-inf"))
    for b in range(B):
        slots = [(int(block_tables[b, j // block_size]), j % block_size)
                 for j in range(int(context_lens[b]))]
        if not slots:
            continue
        for h in range(Hq):
            kv = h // (Hq // Hk)
            s = torch.stack([q[b, h].float() @ k_cache[blk, i, kv].float() for blk, i in slots])
            s = s / math.sqrt(D)
            lse[b, h] = torch.logsumexp(s, 0)
            p = torch.exp(s - lse[b, h])
            out[b, h] = sum(p[n] * v_cache[blk, i, kv].float() for n, (blk, i) in enumerate(slots))
    return out.to(q.dtype), lse


def make_decode(B, Hq, Hk, D, block_size, max_blocks, context_lens, num_blocks=None,
                dtype=torch.float32, device="cpu", seed=0, head_major=False, keys_transposed=False):
    """(q, k_cache, v_cache, block_tables, context_lens); each sequence gets random blocks.
    `head_major`: the caches are (Hk, num_blocks, block_size, D) in memory, seen permuted
    (the KV cache's layout); `keys_transposed`: also keys as (Hk, num_blocks, D, block_size)
    (its CPU fp32 layout)."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = num_blocks or max_blocks + 7
    k_cache = torch.randn(num_blocks, block_size, Hk, D, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, Hk, D, generator=gen)
    tables = torch.zeros(B, max_blocks, dtype=torch.int32)  # unused entries: block 0
    lens = torch.tensor(context_lens, dtype=torch.int32)
    for b in range(B):
        used = -(-int(lens[b]) // block_size)
        tables[b, :used] = torch.randperm(num_blocks, generator=gen)[:used].to(torch.int32)
    q = torch.randn(B, Hq, D, generator=gen)
    if head_major:
        k_cache, v_cache = (c.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)
                            for c in (k_cache, v_cache))
        assert k_cache.permute(2, 0, 1, 3).is_contiguous()
    if keys_transposed:
        k_cache = k_cache.permute(2, 0, 3, 1).contiguous().permute(1, 3, 0, 2)
        assert k_cache.permute(2, 0, 3, 1).is_contiguous()
    return (q.to(device, dtype), k_cache.to(device, dtype), v_cache.to(device, dtype),
            tables.to(device), lens.to(device))


def assert_decode_close(got, want, **tol):
    torch.testing.assert_close(got[0], want[0], **tol)
    assert torch.equal(torch.isinf(got[1]), torch.isinf(want[1]))
    torch.testing.assert_close(got[1].nan_to_num(neginf=0), want[1].nan_to_num(neginf=0), **tol)
    assert not got[0].isnan().any()


# (Hq, Hk, D, block_size, max_blocks, context_lens)
CASES = [
    (4, 2, 64, 4, 5, [0, 1, 7, 20]),  # empty, one key, mid-block, full table
    (8, 1, 80, 16, 3, [33]),  # MQA
    (2, 2, 64, 1, 40, [40, 3]),  # block size 1
    (4, 4, 80, 8, 4, []),  # no sequences
]


LAYOUTS = {"plain": {}, "head_major": {"head_major": True},
           "keys_transposed": {"head_major": True, "keys_transposed": True}}


@pytest.mark.parametrize("Hq,Hk,D,block_size,max_blocks,lens", CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_matches_loop(Hq, Hk, D, block_size, max_blocks, lens, layout):
    args = make_decode(len(lens), Hq, Hk, D, block_size, max_blocks, lens, **LAYOUTS[layout])
    assert_decode_close(paged_decode_attn_torch(*args), decode_loop(*args))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gather_pages_is_the_block_table_in_head_major_order(layout):
    _, cache, _, tables, _ = make_decode(3, 4, 2, 8, 4, 5, [5, 0, 18], **LAYOUTS[layout])
    got = gather_pages(cache, tables)  # (Hk, B, L, D)
    want = torch.stack([cache[t.long()].flatten(0, 1) for t in tables])  # (B, L, Hk, D)
    assert torch.equal(got, want.permute(2, 0, 1, 3))


@interp
@pytest.mark.parametrize("Hq,Hk,D,block_size,max_blocks,lens", CASES)
@pytest.mark.parametrize("num_splits", [1, 3, 0])
def test_triton_matches_torch(Hq, Hk, D, block_size, max_blocks, lens, num_splits):
    layout = {1: "plain", 3: "head_major", 0: "keys_transposed"}[num_splits]
    args = make_decode(len(lens), Hq, Hk, D, block_size, max_blocks, lens, **LAYOUTS[layout])
    got = paged_decode_attn_triton(*args, num_splits=num_splits, block_n=16)
    assert_decode_close(got, paged_decode_attn_torch(*args))


@interp
def test_ops_dispatch_fp16():
    args = make_decode(3, 4, 2, 64, 4, 5, [5, 0, 18], dtype=torch.float16)
    with forced_backend("triton"):
        got = ops.paged_decode_attn(*args, num_splits=2)
    assert_decode_close(got, paged_decode_attn_torch(*args), atol=2e-3, rtol=2e-3)


def test_shape_errors():
    q, cache, _, tables, lens = make_decode(2, 4, 2, 64, 4, 3, [3, 5])
    with pytest.raises(ValueError, match="context_lens"):
        ops.paged_decode_attn(q, cache, cache, tables, lens[:1])
    with pytest.raises(ValueError, match="multiple"):
        ops.paged_decode_attn(q[:, :3], cache, cache, tables, lens)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("num_splits", [1, 0])
def test_triton_matches_torch_cuda_bf16(D, num_splits):
    lens = [0, 1, 17, 1000, 4095, 4096]
    args = make_decode(len(lens), 32, 8, D, 16, 256, lens, num_blocks=2048,
                       dtype=torch.bfloat16, device="cuda")
    got = paged_decode_attn_triton(*args, num_splits=num_splits)
    want = paged_decode_attn_torch(args[0].float(), args[1].float(), args[2].float(), *args[3:])
    assert_decode_close((got[0].float(), got[1]), want, atol=2e-2, rtol=2e-2)


def test_sequences_of_mixed_lengths_are_grouped_and_exact():
    lens = [1, 0, 60, 3] * 8 + [7] * 8  # 40 sequences, one long one per four: worth grouping
    args = make_decode(len(lens), 4, 2, 8, 4, 15, lens, num_blocks=160, head_major=True)
    groups = _length_groups(args[4], block_size=4)
    assert groups is not None and len(groups) == 2
    assert sorted(torch.cat([rows for rows, _ in groups]).tolist()) == list(range(len(lens)))
    assert [width for _, width in groups] == [1, 15]  # the short half reads 1 block, not 15
    assert_decode_close(paged_decode_attn_torch(*args), decode_loop(*args))
    assert _length_groups(torch.full((40,), 50), block_size=4) is None  # no padding to save
