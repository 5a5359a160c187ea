"""Sparse upcycling: turn a dense Llama checkpoint into a Mixtral-architecture MoE checkpoint.

Every MLP becomes `num_experts` copies of itself (`w1` = gate_proj, `w3` = up_proj,
`w2` = down_proj) behind a seeded random router. With identical experts and Mixtral's
renormalised top-k weights (they sum to 1) the MoE model computes exactly what the dense one
does, whatever the router picks; `noise > 0` perturbs each expert so that routing matters.
(Komatsuzaki et al., "Sparse Upcycling", 2022.)

Legend: E experts, H hidden, I intermediate.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
MAX_SHARD_BYTES = 2 * 1024**3
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def mixtral_config(dense: dict[str, Any], num_experts: int, top_k: int) -> dict[str, Any]:
    """The MixtralForCausalLM `config.json` dict with the dims of the dense Llama `config`."""
    archs = dense.get("architectures") or [dense.get("model_type")]
    if "LlamaForCausalLM" not in archs:
        raise ValueError(
            f"can only upcycle Llama checkpoints (LlamaForCausalLM), not {archs}; "
            "convert the model to a Llama checkpoint first"
        )
    if dense.get("attention_bias") or dense.get("mlp_bias"):
        raise ValueError("Mixtral has no attention/MLP biases; cannot upcycle a model with biases")
    rope = dict(dense.get("rope_parameters") or {})
    rope_theta = float(dense.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    rope.setdefault("rope_type", "default")
    rope["rope_theta"] = rope_theta
    hidden, heads = dense["hidden_size"], dense["num_attention_heads"]
    config = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": dense["vocab_size"],
        "hidden_size": hidden,
        "intermediate_size": dense["intermediate_size"],
        "num_hidden_layers": dense["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": dense.get("num_key_value_heads") or heads,
        # Mixtral's default head_dim is not hidden // heads on every version: spell it out.
        "head_dim": dense.get("head_dim") or hidden // heads,
        "hidden_act": dense.get("hidden_act", "silu"),
        "max_position_embeddings": dense["max_position_embeddings"],
        "rms_norm_eps": dense["rms_norm_eps"],
        "rope_theta": rope_theta,
        "rope_parameters": rope,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "initializer_range": dense.get("initializer_range", 0.02),
        "tie_word_embeddings": bool(dense.get("tie_word_embeddings", False)),
        "num_local_experts": num_experts,
        "num_experts_per_tok": top_k,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "bos_token_id": dense.get("bos_token_id"),
        "eos_token_id": dense.get("eos_token_id"),
        "pad_token_id": dense.get("pad_token_id"),
        "torch_dtype": dense.get("torch_dtype") or dense.get("dtype") or "float32",
    }
    if dense.get("rope_scaling"):
        config["rope_scaling"] = dense["rope_scaling"]
    return config


def _open_shards(dense_dir: Path) -> dict[str, Any]:
    """Tensor name -> open `safe_open` handle of the shard that holds it."""
    files = sorted(dense_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {str(dense_dir)!r}")
    handles: dict[str, Any] = {}
    for file in files:
        handle = safe_open(str(file), framework="pt")
        handles.update(dict.fromkeys(handle.keys(), handle))
    return handles


def _perturbed(weight: torch.Tensor, noise: float, gen: torch.Generator) -> torch.Tensor:
    """`weight` plus Gaussian noise of `noise` times its own standard deviation."""
    if noise == 0.0:
        return weight.clone()
    w = weight.float()
    jitter = torch.randn(w.shape, generator=gen) * (noise * w.std())
    return (w + jitter).to(weight.dtype)


def _layer_groups(handles: dict[str, Any], num_layers: int) -> Iterator[list[str]]:
    """Tensor names of each decoder layer in order, then the rest (embeddings, norm, head)."""
    by_layer: list[list[str]] = [[] for _ in range(num_layers)]
    rest = []
    for name in sorted(handles):
        match = _LAYER.match(name)
        (by_layer[int(match.group(1))] if match else rest).append(name)
    yield from by_layer
    yield rest


def _upcycled_tensors(
    names: list[str],
    handles: dict[str, Any],
    config: dict[str, Any],
    noise: float,
    gen: torch.Generator,
) -> dict[str, torch.Tensor]:
    """The Mixtral tensors of one group of dense tensors."""
    num_experts = config["num_local_experts"]
    out: dict[str, torch.Tensor] = {}
    for name in names:
        weight = handles[name].get_tensor(name)
        prefix, sep, proj = name.partition(".mlp.")
        if not sep:
            out[name] = weight
            continue
        kind = proj.removesuffix(".weight")
        if kind not in _EXPERT_NAMES:
            raise ValueError(f"unexpected MLP tensor {name!r} in a Llama checkpoint")
        for e in range(num_experts):
            out[f"{prefix}.block_sparse_moe.experts.{e}.{_EXPERT_NAMES[kind]}.weight"] = _perturbed(
                weight, noise, gen
            )  # (I, H) for w1/w3, (H, I) for w2
        if kind == "gate_proj":
            router = torch.randn(num_experts, config["hidden_size"], generator=gen)  # (E, H)
            router = router * config["initializer_range"]
            out[f"{prefix}.block_sparse_moe.gate.weight"] = router.to(weight.dtype)
    return out


def upcycle_to_moe(
    dense_dir: str | Path,
    out_dir: str | Path,
    num_experts: int = 8,
    top_k: int = 2,
    noise: float = 0.0,
    seed: int = 0,
) -> Path:
    """Write a Mixtral checkpoint to `out_dir` whose every MLP is `num_experts` copies of the
    dense Llama checkpoint's MLP in `dense_dir`, with a seeded random router picking `top_k`.

    `noise` (relative to each weight's standard deviation) perturbs every expert, seeded by
    `seed`; with `noise=0` the MoE model's logits equal the dense model's. Tokenizer files are
    copied. Returns `out_dir`.
    """
    if num_experts < 1 or not 1 <= top_k <= num_experts:
        raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, E={num_experts}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    src, out = Path(dense_dir), Path(out_dir)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {str(src)!r}: pass a checkpoint folder")
    config = mixtral_config(json.loads((src / "config.json").read_text()), num_experts, top_k)
    handles = _open_shards(src)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    groups = (
        _upcycled_tensors(names, handles, config, noise, gen)
        for names in _layer_groups(handles, config["num_hidden_layers"])
    )
    _save_sharded(groups, out)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    return out


def _save_sharded(groups: Iterator[dict[str, torch.Tensor]], out: Path) -> None:
    """Write the groups in order as one `model.safetensors`, or, past ~MAX_SHARD_BYTES, as HF
    shards plus `model.safetensors.index.json`; only one shard is held in memory at a time."""
    files: list[tuple[Path, list[str], int]] = []  # (written file, its tensor names, bytes)
    shard: dict[str, torch.Tensor] = {}

    def flush() -> None:
        file = out / f".shard-{len(files):05d}.safetensors.partial"
        save_file(shard, str(file), metadata={"format": "pt"})
        files.append((file, list(shard), sum(t.numel() * t.element_size() for t in shard.values())))
        shard.clear()

    for group in groups:
        shard_bytes = sum(t.numel() * t.element_size() for t in shard.values())
        group_bytes = sum(t.numel() * t.element_size() for t in group.values())
        if shard and shard_bytes + group_bytes > MAX_SHARD_BYTES:
            flush()
        shard.update(group)
    flush()
    if len(files) == 1:
        files[0][0].replace(out / "model.safetensors")
        return
    weight_map, total = {}, 0
    for i, (file, names, size) in enumerate(files):
        name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        file.replace(out / name)
        weight_map.update(dict.fromkeys(names, name))
        total += size
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
