"""One decoder for every supported family; family differences are ModelConfig fields."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from titanserve.core.config import ModelConfig
from titanserve.core.model.attention import Attention, AttentionMetadata
from titanserve.core.model.layers import GatedMLP, RMSNorm
from titanserve.core.model.rope import cos_sin_table
from titanserve.core.model.stages import Staged, finish, interleave
from titanserve.kernels import ops
from titanserve.moe.layer import MoELayer
from titanserve.moe.placement import ExpertPlacement


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, placement: ExpertPlacement) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe_layer(layer):
            self.mlp = MoELayer(cfg, placement)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, residual, meta, k_cache, v_cache, rope):
        return finish(self.stages(x, residual, meta, k_cache, v_cache, rope))

    def stages(self, x, residual, meta, k_cache, v_cache, rope):
        """The forward, staged (see `core.model.stages`): returns (output, residual)."""
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, meta, k_cache, v_cache, rope)
        x, residual = self.post_attention_layernorm(x, residual)
        if isinstance(self.mlp, MoELayer):
            x = yield from self.mlp.stages(x)
        else:
            x = self.mlp(x)
        return x, residual


class DecoderModel(nn.Module):
    """Embeddings -> layers -> final norm -> lm_head (logits only for the rows asked for)."""

    LINEAR_WEIGHTS = ("lm_head",)  # see kernels.cpu_linear.pack_linear_weights

    def __init__(
        self,
        cfg: ModelConfig,
        placement: ExpertPlacement,
        max_positions: int,
        layer_placements: dict[int, ExpertPlacement] | None = None,  # MoE layers' own
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Parameter(
            torch.empty(cfg.vocab_size, cfg.hidden_size), requires_grad=False
        )
        own = layer_placements or {}
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, own.get(i, placement)) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.tie_word_embeddings:
            self.lm_head = self.embed_tokens
        else:
            self.lm_head = nn.Parameter(
                torch.empty(cfg.vocab_size, cfg.hidden_size), requires_grad=False
            )
        table = cos_sin_table(cfg.rope, cfg.head_dim, max_positions, cfg.max_position_embeddings)
        self.register_buffer("cos_sin", table, persistent=False)
        # (max_pos, R/2) complex64, set where q/k rows hold rotary pairs side by side
        # (core.model.rotary_layout); the layers then take it instead of cos_sin
        self.register_buffer("rotations", None, persistent=False)

    def forward(self, token_ids, meta, k_caches, v_caches) -> torch.Tensor:
        """(T, H) hidden states: `stages` run alone."""
        return finish(self.stages(token_ids, meta, k_caches, v_caches))

    def forward_overlapped(
        self,
        batches: list[tuple[torch.Tensor, AttentionMetadata]],  # (token ids, metadata) each
        k_caches: torch.Tensor,
        v_caches: torch.Tensor,
    ) -> list[torch.Tensor]:  # (T_i, H) each
        """The forward of two micro-batches, each one's exchanges in flight while the other
        computes (see `core.model.stages`)."""
        return interleave([self.stages(t, meta, k_caches, v_caches) for t, meta in batches])

    def stages(
        self,
        token_ids: torch.Tensor,  # (T,) int64
        meta: AttentionMetadata,
        k_caches: torch.Tensor,  # (L, num_blocks, block_size, Hk, D)
        v_caches: torch.Tensor,  # (L, num_blocks, block_size, Hk, D)
    ) -> Staged[torch.Tensor]:  # (T, H)
        """The forward, staged (see `core.model.stages`)."""
        x = F.embedding(token_ids, self.embed_tokens)  # (T, H)
        residual = None
        rope = self.cos_sin if self.rotations is None else self.rotations
        for i, layer in enumerate(self.layers):
            x, residual = yield from layer.stages(x, residual, meta, k_caches[i], v_caches[i],
                                                  rope)  # fmt: skip
        if residual is None:  # no layers
            return self.norm(x)
        x, _ = self.norm(x, residual)
        return x  # (T, H)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return ops.linear(hidden, self.lm_head).float()  # (N, V) fp32
