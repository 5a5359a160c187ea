"""rotary: torch implementation vs a per-element loop, Triton vs torch, in place on views."""


import pytest
import torch

from titanserve.kernels import forced_backend, ops
from titanserve.kernels.launch import interpreting
from titanserve.kernels.rotary import _heads_side_by_side, rotary_torch, rotary_triton

interp = pytest.mark.skipif(not interpreting(), reason="Triton is compiling (GPU): see gpu tests")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_cache(max_pos, rotary_dim, base=10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    freqs = torch.outer(torch.arange(max_pos).float(), inv_freq)  # (max_pos, R/2)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # (max_pos, R)


def rotary_loop(x, positions, cache, is_neox):
    out = x.clone()
    half = cache.shape[1] // 2
    for t in range(x.shape[0]):
        for h in range(x.shape[1]):
            for i in range(half):
                cos, sin = float(cache[positions[t], i]), float(cache[positions[t], half + i])
                a, b = (i, i + half) if is_neox else (2 * i, 2 * i + 1)
                x1, x2 = float(x[t, h, a]), float(x[t, h, b])
                out[t, h, a], out[t, h, b] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    return out


def fused_qkv(T, Hq, Hk, D, gen, dtype=torch.float32, device="cpu"):
    """q and k as row-strided views into one fused (T, (Hq + 2Hk) * D) projection output."""
    qkv = torch.randn(T, (Hq + 2 * Hk) * D, generator=gen).to(device, dtype)
    q = qkv[:, : Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D : (Hq + Hk) * D].view(T, Hk, D)
    return qkv, q, k


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [16, 10])
def test_torch_matches_loop(is_neox, rotary_dim):
    gen = torch.Generator().manual_seed(rotary_dim)
    qkv, q, k = fused_qkv(5, 3, 1, 16, gen)
    q0, k0, v0 = q.clone(), k.clone(), qkv[:, 4 * 16 :].clone()
    positions = torch.tensor([0, 9, 3, 3, 17])
    cache = make_cache(20, rotary_dim)
    rotary_torch(q, k, positions, cache, is_neox)
    torch.testing.assert_close(q, rotary_loop(q0, positions, cache, is_neox))
    torch.testing.assert_close(k, rotary_loop(k0, positions, cache, is_neox))
    assert torch.equal(qkv[:, 4 * 16 :], v0)  # v untouched


def test_neox_matches_hf_rotate_half():
    q = torch.randn(4, 2, 8)
    positions = torch.tensor([1, 0, 5, 2])
    cache = make_cache(8, 8)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 8, 2).float() / 8)  # HF's LlamaRotaryEmbedding
    freqs = torch.outer(positions.float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]
    want = q * cos + torch.cat((-q[..., 4:], q[..., :4]), -1) * sin
    k = q.clone()
    rotary_torch(q, k, positions, cache, is_neox=True)
    torch.testing.assert_close(q, want)


@interp
@pytest.mark.parametrize("T", [0, 1, 7, 33])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (80, 80), (80, 40)])
def test_triton_matches_torch(T, is_neox, head_dim, rotary_dim):
    gen = torch.Generator().manual_seed(T)
    _, q, k = fused_qkv(T, 4, 2, head_dim, gen)
    q2, k2 = q.clone(), k.clone()
    positions = torch.randint(0, 64, (T,), generator=gen)
    cache = make_cache(64, rotary_dim)
    rotary_triton(q, k, positions, cache, is_neox)
    rotary_torch(q2, k2, positions, cache, is_neox)
    torch.testing.assert_close(q, q2)
    torch.testing.assert_close(k, k2)


@interp
def test_ops_dispatch_fp16_in_place():
    gen = torch.Generator().manual_seed(1)
    _, q, k = fused_qkv(7, 4, 1, 64, gen, torch.float16)
    q2, k2 = q.clone(), k.clone()
    positions, cache = torch.arange(7), make_cache(7, 64)
    with forced_backend("triton"):
        ops.rotary(q, k, positions, cache)
    rotary_torch(q2, k2, positions, cache)
    torch.testing.assert_close(q, q2)
    torch.testing.assert_close(k, k2)


def test_shape_errors():
    q, k = torch.randn(3, 4, 16), torch.randn(3, 2, 16)
    with pytest.raises(ValueError, match="even R"):
        ops.rotary(q, k, torch.arange(3), torch.randn(8, 18))
    with pytest.raises(ValueError, match="positions"):
        ops.rotary(q, k, torch.arange(4), torch.randn(8, 16))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("is_neox", [True, False])
def test_triton_matches_torch_cuda_bf16(is_neox):
    gen = torch.Generator().manual_seed(0)
    _, q, k = fused_qkv(33, 32, 8, 128, gen, torch.bfloat16, "cuda")
    q2, k2 = q.clone(), k.clone()
    positions = torch.randint(0, 4096, (33,), device="cuda")
    cache = make_cache(4096, 128).cuda()
    rotary_triton(q, k, positions, cache, is_neox)
    rotary_torch(q2, k2, positions, cache, is_neox)
    torch.testing.assert_close(q, q2, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(k, k2, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("is_neox", [True, False])
def test_side_by_side_q_and_k_rotate_in_one_pass_like_apart(is_neox):
    """q and k cut from one fused qkv row take the one-pass path; v is left untouched and the
    result equals rotating separate copies."""
    gen = torch.Generator().manual_seed(3)
    qkv, q, k = fused_qkv(6, 4, 2, 16, gen)
    cache, positions = make_cache(32, 12), torch.tensor([0, 3, 7, 31, 5, 2])
    q_apart, k_apart, v_before = q.clone(), k.clone(), qkv[:, 6 * 16 :].clone()
    assert _heads_side_by_side(q, k) is not None and _heads_side_by_side(q_apart, k_apart) is None
    rotary_torch(q_apart, k_apart, positions, cache, is_neox)  # separate tensors: two passes
    rotary_torch(q, k, positions, cache, is_neox)
    assert torch.equal(q, q_apart) and torch.equal(k, k_apart)
    assert torch.equal(qkv[:, 6 * 16 :], v_before)
