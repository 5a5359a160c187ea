"""Rotary position embedding, applied in place to q and k.

Legend: T tokens, Hq / Hk query / key heads, D head dim, R rotary dim (<= D).
"""

from __future__ import annotations

import torch


def _rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> None:
    rot = x[..., : 2 * cos.shape[-1]]  # (T, H, R), a view into x
    xf = rot.float()
    if is_neox:  # rotate_half: pairs (i, i + R/2)
        x1, x2 = xf.chunk(2, dim=-1)  # (T, H, R/2) each
        rot.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))
    else:  # interleaved: pairs (2i, 2i + 1)
        x1, x2 = xf[..., 0::2], xf[..., 1::2]  # (T, H, R/2) each
        rot.copy_(torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2))


def rotary_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> None:
    """Rotate the first R dims of every head of q and k in place, by the angle of `positions`.

    `cos_sin_cache` is (max_pos, R) fp32 with cos in `[:, :R//2]` and sin in `[:, R//2:]`;
    `is_neox` selects HF's rotate_half layout, otherwise GPT-J interleaved pairs.
    """
    cos, sin = cos_sin_cache[positions].float().chunk(2, dim=-1)  # (T, R/2) each
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, R/2)
    _rotate_(q, cos, sin, is_neox)
    _rotate_(k, cos, sin, is_neox)


# The Triton kernel lands in the next commit; until then CUDA tensors use torch.
rotary_triton = rotary_torch
