"""q and k rows laid out for the CPU's complex-multiply rotary (`kernels.rotary.rotary_pairs_`).

Hugging Face's Llama-style checkpoints rotate the pairs (i, i + R/2) of each head's first R
dims (rotate_half), which takes seven torch ops a layer. An attention score is q . k over a
head's dims, which one permutation of those dims applied to both q and k leaves unchanged; so,
once after loading, the CPU runner permutes every head's q and k projection rows (and biases,
and q/k norm weights) to put each pair side by side, (2i, 2i + 1), where one complex multiply
rotates it. Keys are cached in that order; values, and so the outputs, are unchanged.
"""

from __future__ import annotations

import torch

from titanserve.kernels.backend import backend
from titanserve.kernels.rotary import rotation_table


def pair_order(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """(head_dim,) int64: the old dim at each new dim, pairs (i, i + R/2) moved to (2i, 2i + 1);
    dims past the rotary dim stay."""
    half = rotary_dim // 2
    pairs = torch.stack((torch.arange(half), torch.arange(half, rotary_dim)), dim=1)  # (R/2, 2)
    return torch.cat((pairs.reshape(-1), torch.arange(rotary_dim, head_dim)))


def interleave_rotary_pairs(model: torch.nn.Module) -> bool:
    """In place, on a `DecoderModel` whose rotary runs on the torch backend: permute every
    attention's q/k rows (`pair_order`) and give the model the complex `rotations` table it
    then passes to its layers (which rotate pairs when their table is complex). True where it
    did; a CUDA model keeps the checkpoint's layout (its Triton kernel rotates either in one
    pass)."""
    if backend(model.cos_sin) != "torch":
        return False
    cfg = model.cfg
    order = pair_order(cfg.head_dim, model.cos_sin.shape[-1]).to(model.cos_sin.device)
    for layer in model.layers:
        attn = layer.self_attn
        q_rows = attn.q_size  # rows [0, q_rows) are q's heads, the next kv_size k's
        for name in ("qkv_weight", "qkv_bias"):
            param = getattr(attn, name)
            if param is None:
                continue
            for start, heads in ((0, attn.num_heads), (q_rows, attn.num_kv_heads)):
                block = param.data.narrow(0, start, heads * attn.head_dim)  # (heads*D, ...)
                per_head = block.unflatten(0, (heads, attn.head_dim))  # (heads, D, ...)
                per_head.copy_(per_head[:, order])  # indexing by a tensor copies
        for norm in (attn.q_norm, attn.k_norm):
            if norm is not None:
                norm.data.copy_(norm.data[order])
    model.rotations = rotation_table(model.cos_sin)  # (max_pos, R/2) complex64
    return True
