"""Typed configuration: `ModelConfig` (from a Hugging Face config.json) and `EngineConfig`.

HF objects stop here: everything past the loader reads these frozen dataclasses.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from titanserve.core.engine_config import DTYPE_ALIASES, canonical_dtype_name
from titanserve.core.errors import ConfigError

# Architecture name -> family. One decoder implementation serves them all.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}

DTYPES = {name: getattr(torch, canonical) for name, canonical in DTYPE_ALIASES.items()}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (or a torch.dtype) -> torch.dtype."""
    if isinstance(name, torch.dtype):
        return name
    return DTYPES[canonical_dtype_name(name)]


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # default | linear | llama3 | yarn
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    partial_rotary_factor: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs, for every supported family."""

    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    # MoE (num_experts == 0: dense model)
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    router_scoring: str = "softmax"
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    moe_layers: tuple[int, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    @staticmethod
    def from_hf(path: str | os.PathLike) -> ModelConfig:
        """Read `config.json` from a checkpoint folder (or the file itself)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.exists():
            raise ConfigError(
                f"no config.json at {path}: is this a Hugging Face checkpoint folder?"
            )
        try:
            hf = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file} is not valid JSON: {e}") from None
        return ModelConfig.from_dict(hf)

    @staticmethod
    def from_dict(hf: dict) -> ModelConfig:
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ConfigError(
                f"unsupported architecture {archs or hf.get('model_type')!r}; "
                f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        num_layers = hf["num_hidden_layers"]
        moe = _moe_fields(family, hf, num_layers)
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        attention_bias = bool(hf.get("attention_bias", False))
        qkv_bias = {"qwen2": True, "qwen2_moe": bool(hf.get("qkv_bias", True))}.get(
            family, attention_bias
        )
        return ModelConfig(
            architecture=arch,
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf.get("intermediate_size", 0),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rope=_rope_config(hf),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=attention_bias and family in ("llama", "qwen3", "qwen3_moe"),
            qk_norm=family in ("qwen3", "qwen3_moe"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            **moe,
        )


def _moe_fields(family: str, hf: dict, num_layers: int) -> dict:
    if family == "mixtral":
        return dict(
            num_experts=hf["num_local_experts"],
            top_k=hf["num_experts_per_tok"],
            moe_intermediate_size=hf["intermediate_size"],
            norm_topk_prob=True,
            moe_layers=tuple(range(num_layers)),
        )
    if family in ("qwen2_moe", "qwen3_moe"):
        num_experts = hf.get("num_experts") or hf.get("num_local_experts", 0)
        step = hf.get("decoder_sparse_step", 1) or 1
        only_mlp = set(hf.get("mlp_only_layers") or [])
        layers = tuple(
            i
            for i in range(num_layers)
            if i not in only_mlp and num_experts > 0 and (i + 1) % step == 0
        )
        shared = hf.get("shared_expert_intermediate_size", 0) if family == "qwen2_moe" else 0
        return dict(
            num_experts=num_experts,
            top_k=hf["num_experts_per_tok"],
            moe_intermediate_size=hf["moe_intermediate_size"],
            norm_topk_prob=bool(hf.get("norm_topk_prob", family == "qwen3_moe")),
            shared_expert_intermediate_size=shared,
            shared_expert_gate=shared > 0,
            moe_layers=layers,
        )
    return {}


def _rope_config(hf: dict) -> RopeConfig:
    # transformers 5 writes `rope_parameters`; 4.x wrote `rope_theta` + `rope_scaling`.
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ("default", "linear", "llama3", "yarn"):
        raise ConfigError(f"rope type {kind!r} is not supported (default, linear, llama3, yarn)")
    return RopeConfig(
        theta=float(theta),
        kind=kind,
        factor=float(params.get("factor") or 1.0),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=params.get("original_max_position_embeddings"),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
        partial_rotary_factor=float(
            params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        ),
    )
