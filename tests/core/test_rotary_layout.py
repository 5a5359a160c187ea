"""Rotary pairs side by side on CPU (core.model.rotary_layout): permuting q and k dims leaves
every attention score as rotate_half on the checkpoint's layout makes it; the CPU runner lays
its model out so, a Triton-backend one keeps the checkpoint's layout. (test_hf_oracle checks
the permuted models' logits and tokens against transformers.)"""

from __future__ import annotations

import pytest
import torch

from titanserve.core.config import ModelConfig
from titanserve.core.model.rotary_layout import pair_order
from titanserve.core.model_runner import ModelRunner
from titanserve.kernels import forced_backend
from titanserve.kernels.rotary import rotary_pairs_, rotary_torch, rotation_table
from titanserve.moe.placement import ExpertPlacement


def test_pair_order_moves_each_pair_side_by_side():
    assert pair_order(8, 8).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert pair_order(8, 4).tolist() == [0, 2, 1, 3, 4, 5, 6, 7]  # partial rotary: rest stays


def make_cache(max_pos, rotary_dim):
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    angles = torch.outer(torch.arange(max_pos).float(), inv_freq)  # (max_pos, R/2)
    return torch.cat((angles.cos(), angles.sin()), dim=-1)  # (max_pos, R)


@pytest.mark.parametrize("rotary_dim", [16, 10])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permuted_pairs_give_rotate_halfs_scores(rotary_dim, dtype):
    gen = torch.Generator().manual_seed(rotary_dim)
    T, Hq, Hk, D = 6, 4, 2, 16
    qkv = torch.randn(T, (Hq + 2 * Hk) * D, generator=gen).to(dtype)  # one fused projection
    positions = torch.tensor([0, 7, 3, 3, 30, 12])
    cache = make_cache(32, rotary_dim)
    order = pair_order(D, rotary_dim)
    permuted = qkv.clone()
    heads = permuted[:, : (Hq + Hk) * D].unflatten(1, (Hq + Hk, D))  # q's heads, then k's
    heads.copy_(heads[:, :, order].clone())

    def split(x):
        return x[:, : Hq * D].view(T, Hq, D), x[:, Hq * D : (Hq + Hk) * D].view(T, Hk, D)

    q, k = split(qkv)
    rotary_torch(q, k, positions, cache, is_neox=True)
    pq, pk = split(permuted)
    rotary_pairs_(pq, pk, positions, rotation_table(cache))
    scores = torch.einsum("tgd,sgd->gts", q.float(), k.float().repeat_interleave(2, dim=1))
    permuted_scores = torch.einsum(
        "tgd,sgd->gts", pq.float(), pk.float().repeat_interleave(2, dim=1)
    )
    tol = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(permuted_scores, scores, rtol=tol, atol=tol)
    torch.testing.assert_close(pq[..., order.argsort()], q, rtol=tol, atol=tol)
    assert torch.equal(permuted[:, (Hq + Hk) * D :], qkv[:, (Hq + Hk) * D :])  # v untouched


def runner_for(path):
    cfg = ModelConfig.from_hf(path)
    return ModelRunner(
        path, cfg, torch.float32, block_size=16, num_blocks=8, max_model_len=64,
        placement=ExpertPlacement.contiguous(cfg.num_experts), progress=False,
    )


def test_the_cpu_runner_lays_out_rotary_pairs(tiny_model):
    """Every layer's q and k rows (and q/k norms) permuted by pair_order on CPU, v rows as
    loaded; a Triton-backend runner keeps the checkpoint's rows and the cos | sin table."""
    model = runner_for(tiny_model("qwen3")).model  # q/k norms permute with the rows
    assert model.rotations.dtype == torch.complex64
    assert model.rotations.shape == (64, model.cos_sin.shape[1] // 2)
    with forced_backend("triton"):  # the Triton kernel rotates rotate_half's pairs as they are
        loaded = runner_for(tiny_model("qwen3")).model
    assert loaded.rotations is None
    for layer, as_loaded in zip(model.layers, loaded.layers, strict=True):
        attn, ref = layer.self_attn, as_loaded.self_attn
        D = attn.head_dim
        order = pair_order(D, model.cos_sin.shape[1])
        qk_rows = attn.q_size + attn.kv_size
        permuted = ref.qkv_weight[:qk_rows].unflatten(0, (-1, D))[:, order].flatten(0, 1)
        assert torch.equal(attn.qkv_weight[:qk_rows], permuted)
        assert torch.equal(attn.qkv_weight[qk_rows:], ref.qkv_weight[qk_rows:])  # v
        assert torch.equal(attn.q_norm, ref.q_norm[order])
        assert torch.equal(attn.k_norm, ref.k_norm[order])
