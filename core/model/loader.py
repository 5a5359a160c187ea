"""Safetensors weight loader: single file or sharded, per-expert or fused expert tensors.

Checkpoint names are mapped onto the decoder's parameters by a short rule table; each
worker reads only the experts it owns (fused tensors are sliced through mmap).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from titanserve.core.errors import ConfigError
from titanserve.core.model.decoder import DecoderModel
from titanserve.moe.layer import MoELayer

_MLP = r"(?P<layer>model\.layers\.\d+)\.(?:mlp|block_sparse_moe)"
# (pattern, handler name); the first match wins.
_RULES = [
    (
        re.compile(
            r"(?P<layer>model\.layers\.\d+)\.self_attn\.(?P<p>[qkv])_proj\.(?P<kind>weight|bias)$"
        ),
        "qkv",
    ),
    (re.compile(r"(?P<layer>model\.layers\.\d+)\.self_attn\.o_proj\.(?P<kind>weight|bias)$"), "o"),
    (re.compile(r"(?P<layer>model\.layers\.\d+)\.self_attn\.(?P<p>[qk])_norm\.weight$"), "qk_norm"),
    (re.compile(_MLP + r"\.(?P<shared>shared_expert\.)?(?P<p>gate|up)_proj\.weight$"), "gate_up"),
    (re.compile(_MLP + r"\.(?P<shared>shared_expert\.)?down_proj\.weight$"), "down"),
    (re.compile(_MLP + r"\.gate\.weight$"), "router"),
    (re.compile(_MLP + r"\.shared_expert_gate\.weight$"), "shared_gate"),
    (
        re.compile(
            _MLP + r"\.experts\.(?P<e>\d+)\.(?P<p>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
        ),
        "expert",
    ),
    (re.compile(_MLP + r"\.experts\.(?P<p>gate_up_proj|down_proj)$"), "fused_experts"),
]
_DIRECT = {
    "model.embed_tokens.weight": "embed_tokens",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head",
}
_LAYER_DIRECT = re.compile(
    r"(?P<layer>model\.layers\.\d+)\.(?P<p>input_layernorm|post_attention_layernorm)\.weight$"
)


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (sharded index or a single file)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / f for f in sorted(set(weight_map.values()))]
    elif (path / "model.safetensors").exists():
        files = [path / "model.safetensors"]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no *.safetensors weights in {path}")
    for f in files:
        if not f.exists():
            raise ConfigError(
                f"checkpoint shard {f.name} listed in the index is missing from {path}"
            )
    return files


def load_weights(model: DecoderModel, path: Path, progress: bool = True) -> None:
    """Fill every parameter of `model` from the checkpoint at `path`, or name what is missing.
    A MoE layer gets the experts of its own placement (layers may differ, moe.expert_loads)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    filled: set[tuple[str, object]] = set()
    local_of = {  # MoE layer index -> {global expert id: weight slot}
        i: {e: slot for slot, e in enumerate(layer.mlp.slot_experts)}
        for i, layer in enumerate(model.layers)
        if isinstance(layer.mlp, MoELayer)
    }
    files = checkpoint_files(path)
    bar = tqdm(total=len(files), desc="loading weights", unit="file", disable=not progress)
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                m = _LAYER_INDEX.match(name)
                experts = local_of.get(int(m[1]), {}) if m else {}
                for target, part, read in _targets(name, model, experts, f):
                    target = target.removeprefix("model.")
                    if target not in params:
                        continue
                    _copy(params[target], part, read(), name, model)
                    filled.add((target, part))
        bar.update(1)
    bar.close()
    if model.cfg.tie_word_embeddings:
        filled.add(("lm_head", None))
    _check_complete(model, params, filled)


_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


def load_expert_weights(
    model: DecoderModel, path: Path, experts: dict[int, list[int]], stacks: dict[str, torch.Tensor]
) -> None:
    """Read the given experts of some MoE layers (layer index -> global expert ids) from the
    checkpoint into `stacks` ("layers.{i}.mlp.w_gate_up" / "...w_down" -> dense (n, N, K)
    stacks, row j for the layer's j-th id); nothing else is read or touched."""
    if not any(experts.values()):  # a re-placement that brings this worker no expert
        return
    local_of = {layer: {e: i for i, e in enumerate(ids)} for layer, ids in experts.items()}
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                m = _LAYER_INDEX.match(name)
                if m is None or int(m[1]) not in local_of:
                    continue
                for target, part, read in _targets(name, model, local_of[int(m[1])], f):
                    target = target.removeprefix("model.")
                    if target in stacks:
                        _copy(stacks[target], part, read(), name, model)


def _targets(
    name: str, model: DecoderModel, local_of: dict[int, int], f
) -> Iterator[tuple[str, object, Callable]]:
    """(parameter name, part, reader) for one checkpoint tensor; nothing for unknown names."""
    full = lambda: f.get_tensor(name)  # noqa: E731
    if name in _DIRECT:
        if name == "lm_head.weight" and model.cfg.tie_word_embeddings:
            return
        yield _DIRECT[name], None, full
        return
    m = _LAYER_DIRECT.match(name)
    if m:
        yield f"{m['layer']}.{m['p']}.weight", None, full
        return
    for pattern, kind in _RULES:
        m = pattern.match(name)
        if m is None:
            continue
        layer = m["layer"]
        if kind == "qkv":
            yield f"{layer}.self_attn.qkv_{m['kind']}", m["p"], full
        elif kind == "o":
            yield f"{layer}.self_attn.o_{m['kind']}", None, full
        elif kind == "qk_norm":
            yield f"{layer}.self_attn.{m['p']}_norm", None, full
        elif kind in ("gate_up", "down"):
            prefix = f"{layer}.mlp.{m['shared'] or ''}"
            if kind == "gate_up":
                yield prefix + "gate_up_proj", m["p"], full
            else:
                yield prefix + "down_proj", None, full
        elif kind == "router":
            yield f"{layer}.mlp.gate", None, full
        elif kind == "shared_gate":
            yield f"{layer}.mlp.shared_expert_gate", None, full
        elif kind == "expert":
            e = int(m["e"])
            if e in local_of:
                p = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up"}.get(m["p"])
                target = f"{layer}.mlp.w_gate_up" if p else f"{layer}.mlp.w_down"
                yield target, (local_of[e], p), full
        elif kind == "fused_experts":
            target = f"{layer}.mlp.w_gate_up" if m["p"] == "gate_up_proj" else f"{layer}.mlp.w_down"
            sliced = f.get_slice(name)
            for e, local in local_of.items():
                yield target, (local, "all"), (lambda e=e, s=sliced: s[e : e + 1][0])
        return


def _copy(param: torch.Tensor, part, tensor: torch.Tensor, name: str, model: DecoderModel) -> None:
    dst = param.data
    if part in ("q", "k", "v"):
        attn_q = model.cfg.num_heads * model.cfg.head_dim
        kv = model.cfg.num_kv_heads * model.cfg.head_dim
        start, size = {"q": (0, attn_q), "k": (attn_q, kv), "v": (attn_q + kv, kv)}[part]
        dst = dst.narrow(0, start, size)
    elif part in ("gate", "up"):
        half = dst.shape[0] // 2
        dst = dst.narrow(0, 0 if part == "gate" else half, half)
    elif isinstance(part, tuple):
        local, p = part
        dst = dst[local]
        if p in ("gate", "up"):
            half = dst.shape[0] // 2
            dst = dst.narrow(0, 0 if p == "gate" else half, half)
    if name.endswith("shared_expert_gate.weight"):
        tensor = tensor.reshape(dst.shape)
    if tuple(dst.shape) != tuple(tensor.shape):
        raise ConfigError(
            f"tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}: "
            "config.json does not match the weights"
        )
    dst.copy_(tensor)


def _check_complete(model: DecoderModel, params: dict, filled: set) -> None:
    cfg = model.cfg
    kv = ["q", "k", "v"]
    for name, param in params.items():
        if name.endswith("qkv_weight") or name.endswith("qkv_bias"):
            need = [(name, p) for p in kv]
        elif name.endswith("gate_up_proj"):
            need = [(name, p) for p in ("gate", "up")]
        elif name.endswith("mlp.w_gate_up"):
            need = [[(name, (i, "all")), (name, (i, "gate"))] for i in range(param.shape[0])] + [
                [(name, (i, "all")), (name, (i, "up"))] for i in range(param.shape[0])
            ]
            for alternatives in need:
                if not any(a in filled for a in alternatives):
                    raise ConfigError(_missing(name, cfg))
            continue
        elif name.endswith("mlp.w_down"):
            for i in range(param.shape[0]):
                if (name, (i, "all")) not in filled and (name, (i, None)) not in filled:
                    raise ConfigError(_missing(name, cfg))
            continue
        else:
            need = [(name, None)]
        for n in need:
            if n not in filled:
                raise ConfigError(_missing(f"{n[0]}[{n[1]}]" if n[1] else n[0], cfg))


def checkpoint_name(name: str) -> str:
    """The Hugging Face tensor name that fills our parameter `name` (for error messages)."""
    m = re.fullmatch(r"(.*)\.self_attn\.qkv_(weight|bias)\[([qkv])\]", name)
    if m:
        return f"model.{m[1]}.self_attn.{m[3]}_proj.{m[2]}"
    m = re.fullmatch(r"(.*)\.self_attn\.o_(weight|bias)", name)
    if m:
        return f"model.{m[1]}.self_attn.o_proj.{m[2]}"
    m = re.fullmatch(r"(.*)\.gate_up_proj\[(gate|up)\]", name)
    if m:
        return f"model.{m[1]}.{m[2]}_proj.weight"
    m = re.fullmatch(r"(.*)\.mlp\.w_(gate_up|down)", name)
    if m:
        kind = "gate_proj/up_proj" if m[2] == "gate_up" else "down_proj"
        return f"model.{m[1]}.mlp.experts.*.{kind}"
    if name in ("embed_tokens", "lm_head"):
        return "lm_head.weight" if name == "lm_head" else "model.embed_tokens.weight"
    return f"model.{name}"


def _missing(name: str, cfg) -> str:
    return (
        f"checkpoint is missing tensor {checkpoint_name(name)} (for {name}, "
        f"{cfg.architecture}): incomplete or mismatched weights"
    )
