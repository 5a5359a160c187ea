"""lse_merge: torch implementation vs a per-(token, head) loop, Triton vs torch, fully masked
partials; on GPU also vs xformers' merge_attentions when it is installed."""

import math

import pytest
import torch

from titanserve.kernels import forced_backend, ops
from titanserve.kernels.launch import interpreting
from titanserve.kernels.lse_merge import lse_merge_torch, lse_merge_triton

interp = pytest.mark.skipif(not interpreting(), reason="Triton is compiling (GPU): see gpu tests")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def merge_loop(outs, lses):
    N, T, H, D = outs.shape
    out, lse = torch.zeros(T, H, D), torch.full((T, H), float("-inf"))
    for t in range(T):
        for h in range(H):
            live = [n for n in range(N) if lses[n, t, h] != float("-inf")]
            if not live:
                continue
            total = sum(math.exp(float(lses[n, t, h])) for n in live)
            lse[t, h] = math.log(total)
            for n in live:
                out[t, h] += math.exp(float(lses[n, t, h])) / total * outs[n, t, h].float()
    return out.to(outs.dtype), lse


def make_partials(N, T, H, D, dtype=torch.float32, device="cpu", seed=0):
    """Random partials; token 1 has its first partial masked, token 2 all of them."""
    gen = torch.Generator().manual_seed(seed)
    outs = torch.randn(N, T, H, D, generator=gen)
    lses = torch.randn(N, T, H, generator=gen) * 3
    if T > 2:
        lses[0, 1], lses[:, 2] = float("-inf"), float("-inf")
        outs[0, 1], outs[:, 2] = 0.0, 0.0  # what a masked chunk returns
    return outs.to(device, dtype), lses.to(device)


def assert_merge_close(got, want, **tol):
    torch.testing.assert_close(got[0], want[0], **tol)
    assert torch.equal(torch.isinf(got[1]), torch.isinf(want[1]))
    torch.testing.assert_close(got[1].nan_to_num(neginf=0), want[1].nan_to_num(neginf=0), **tol)
    assert not got[0].isnan().any() and not got[1].isnan().any()


SHAPES = [(1, 1, 1, 64), (2, 7, 3, 80), (3, 33, 2, 64), (4, 0, 2, 64)]


@pytest.mark.parametrize("N,T,H,D", SHAPES)
def test_torch_matches_loop(N, T, H, D):
    outs, lses = make_partials(N, T, H, D)
    assert_merge_close(lse_merge_torch(outs, lses), merge_loop(outs, lses))


def test_merge_of_split_attention_is_the_whole_attention():
    q, k, v = torch.randn(3, 2, 16), torch.randn(10, 2, 16), torch.randn(10, 2, 16)
    s = torch.einsum("qhd,khd->qhk", q, k) / 4
    whole = (torch.einsum("qhk,khd->qhd", s.softmax(-1), v), s.logsumexp(-1))
    parts = [(torch.einsum("qhk,khd->qhd", s[..., c].softmax(-1), v[c]), s[..., c].logsumexp(-1))
             for c in (slice(0, 4), slice(4, 10))]
    merged = lse_merge_torch(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    assert_merge_close(merged, whole)


@interp
@pytest.mark.parametrize("N,T,H,D", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_torch(N, T, H, D, dtype):
    outs, lses = make_partials(N, T, H, D, dtype)
    assert_merge_close(lse_merge_triton(outs, lses), lse_merge_torch(outs, lses))


@interp
def test_ops_dispatch():
    outs, lses = make_partials(2, 5, 3, 64)
    with forced_backend("triton"):
        got = ops.lse_merge(outs, lses)
    assert_merge_close(got, lse_merge_torch(outs, lses))


def test_shape_errors():
    with pytest.raises(ValueError, match="lses"):
        ops.lse_merge(torch.randn(2, 3, 4, 8), torch.randn(2, 3, 5))


@gpu
@pytest.mark.gpu
def test_triton_matches_torch_cuda_bf16():
    outs, lses = make_partials(4, 1000, 32, 128, torch.bfloat16, "cuda")
    assert_merge_close(lse_merge_triton(outs, lses), lse_merge_torch(outs, lses),
                       atol=2e-2, rtol=2e-2)


@gpu
@pytest.mark.gpu
def test_matches_xformers_merge_attentions():
    fmha = pytest.importorskip("xformers.ops.fmha")
    outs, lses = make_partials(3, 100, 8, 128, torch.float32, "cuda")
    lses[:, 2] = -5.0  # xformers does not promise anything for all-masked rows
    # xformers layout: outs (N, B, M, H, K), lses (N, B, H, M)
    lses_x = lses[:, None].transpose(-1, -2).contiguous()
    want_out, want_lse = fmha.merge_attentions(outs[:, None], lses_x)
    got = lse_merge_triton(outs, lses)
    torch.testing.assert_close(got[0], want_out[0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got[1], want_lse[0].transpose(0, 1), atol=2e-2, rtol=2e-2)
