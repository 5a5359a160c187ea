"""Tokenizer, incremental detokenizer and chat template against transformers; clear errors
for broken checkpoints (config.json, architecture, weights)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from titanserve import LLM, SamplingParams
from titanserve.core.config import ModelConfig
from titanserve.core.errors import ConfigError
from titanserve.core.tokenizer import FinalDetokenizer, IncrementalDetokenizer, Tokenizer

FAMILY = "qwen3"
# Characters the tiny BPE never merged: each is split over 2-4 byte-level tokens.
MULTI_BYTE = "你好世界 🎉🚀 über ∑ 😀 naïve"
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Héllo 東京 😀?"},
        {"role": "assistant", "content": "Bonjour."},
        {"role": "user", "content": "Again,\nplease"},
    ],
]


def make_llm(path: Path, **kwargs) -> LLM:
    return LLM(str(path), **{"dtype": "float32", "progress": False, **kwargs})


def copy_checkpoint(tiny_model, tmp_path: Path) -> Path:
    return shutil.copytree(tiny_model(FAMILY), tmp_path / "model")


def stream_text(tokenizer: Tokenizer, prompt_ids: list[int], output_ids: list[int]) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas = [detokenizer.push(token_id) for token_id in output_ids]
    assert "".join(deltas) == detokenizer.text
    return deltas


def test_incremental_detokenization_never_splits_a_character(tiny_model):
    path = tiny_model(FAMILY)
    tokenizer = Tokenizer(path)
    ids = tokenizer.encode(MULTI_BYTE)
    partial = [k for k in range(1, len(ids)) if tokenizer.decode(ids[:k]).endswith("\ufffd")]
    assert len(partial) >= 8  # the text really is split inside characters
    deltas = stream_text(tokenizer, tokenizer.encode("Say: "), ids)
    assert "".join(deltas) == MULTI_BYTE
    assert not any("\ufffd" in delta for delta in deltas)
    assert [i + 1 for i, delta in enumerate(deltas) if delta == ""] == partial
    assert "".join(deltas) == AutoTokenizer.from_pretrained(path).decode(ids)


def test_incremental_detokenization_skips_special_tokens_like_decode(tiny_model):
    tokenizer = Tokenizer(tiny_model(FAMILY))
    im_end = tokenizer.encode("<|im_end|>")
    assert im_end == [2]
    ids = tokenizer.encode("😀 one") + im_end + tokenizer.encode(" 东 two") + [0]
    deltas = stream_text(tokenizer, tokenizer.encode("<|im_start|>assistant\n"), ids)
    assert "".join(deltas) == tokenizer.decode(ids) == "😀 one 东 two"


def test_final_text_is_the_streamed_text_in_one_decode(tiny_model):
    tokenizer = Tokenizer(tiny_model(FAMILY))
    ids = tokenizer.encode(MULTI_BYTE)
    cases = [
        (tokenizer.encode("Say: "), ids),
        (tokenizer.encode("<|im_start|>assistant\n"), ids[:5] + [2] + ids[5:] + [0]),
        (tokenizer.encode("x" * 40), tokenizer.encode(" spaced out")),
        ([], ids),
    ]
    # a prompt that ends inside a character the output completes: the prime's text changes
    cut = next(k for k in range(1, len(ids)) if tokenizer.decode(ids[:k]).endswith("\ufffd"))
    cases.append((ids[:cut], ids[cut:]))
    for prompt_ids, output_ids in cases:
        streamed = "".join(stream_text(tokenizer, prompt_ids, output_ids))
        assert FinalDetokenizer(tokenizer, prompt_ids).text(output_ids) == streamed
    # an output that ends inside a character: held back, as a stream holds it
    assert tokenizer.decode(ids[:cut]).endswith("\ufffd")
    assert FinalDetokenizer(tokenizer, []).text(ids[:cut]) == tokenizer.decode(ids[:cut])[:-1]
    # a long run of bytes that never make a character: the stream's answer, nothing held
    stray = [i for i in ids if tokenizer.decode([i]) == "\ufffd"][:1] * 12
    streamed = "".join(stream_text(tokenizer, [], ids[:3] + stray))
    assert FinalDetokenizer(tokenizer, []).text(ids[:3] + stray) == streamed


def sentencepiece_style_tokenizer(out: Path) -> Tokenizer:
    """A byte-fallback BPE with Llama-2's Metaspace decoder (strips the leading space)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, trainers

    tok = HFTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog über café"] * 20,
                            trainers.BpeTrainer(vocab_size=320, special_tokens=specials))
    out.mkdir()
    tok.save(str(out / "tokenizer.json"))
    return Tokenizer(out)


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece-style"])
def test_final_text_equals_the_stream_on_random_tokens(kind, tiny_model, tmp_path):
    import random

    if kind == "byte-level":
        tokenizer = Tokenizer(tiny_model(FAMILY))
    else:
        tokenizer = sentencepiece_style_tokenizer(tmp_path / "spm")
    rng = random.Random(0)
    texts = ["the quick", " fox 你好 😀", "über café", "  spaced  out "]
    for _ in range(200):
        prompt_ids = tokenizer.encode(rng.choice(texts))
        output_ids = tokenizer.encode(rng.choice(texts), add_special_tokens=False)
        if rng.random() < 0.6:  # what a random model writes: stray bytes, specials, anything
            output_ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 24))]
        streamed = "".join(stream_text(tokenizer, prompt_ids, output_ids))
        assert FinalDetokenizer(tokenizer, prompt_ids).text(output_ids) == streamed


def test_chat_template_renders_like_transformers(tiny_model):
    path = tiny_model(FAMILY)
    ours, theirs = Tokenizer(path), AutoTokenizer.from_pretrained(path)
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            expected = theirs.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            rendered = ours.apply_chat_template(messages, add_generation_prompt)
            assert rendered == expected
            assert (
                ours.encode(rendered, add_special_tokens=False)
                == theirs(expected, add_special_tokens=False).input_ids
            )


def test_llm_chat_prompt_is_transformers_chat_template_ids(tiny_model):
    path = tiny_model(FAMILY)
    theirs = AutoTokenizer.from_pretrained(path)
    with make_llm(path) as llm:
        outs = llm.chat(CONVERSATIONS, SamplingParams(max_tokens=2, temperature=0.0))
    for out, messages in zip(outs, CONVERSATIONS):
        expected = theirs.apply_chat_template(messages, add_generation_prompt=True)
        assert out.prompt_token_ids == expected["input_ids"]


# ---------------------------------------------------------------- broken checkpoints


def assert_one_line(error: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message


def test_missing_config_json(tmp_path):
    with pytest.raises(ConfigError) as error:
        ModelConfig.from_hf(tmp_path)
    assert_one_line(error, f"no config.json at {tmp_path}")


def test_config_json_that_is_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError) as error:
        ModelConfig.from_hf(tmp_path)
    assert_one_line(error, "config.json is not valid JSON")


def test_unknown_architecture_is_named(tiny_model, tmp_path):
    path = copy_checkpoint(tiny_model, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as error:
        make_llm(path)
    assert_one_line(error, "unsupported architecture ['GPT2LMHeadModel']", "Qwen3ForCausalLM")


def test_missing_model_path(tmp_path):
    with pytest.raises(ConfigError) as error:
        make_llm(tmp_path / "nowhere")
    assert_one_line(error, f"model path '{tmp_path / 'nowhere'}' does not exist")


def test_missing_weights_file(tiny_model, tmp_path):
    path = copy_checkpoint(tiny_model, tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(ConfigError) as error:
        make_llm(path)
    assert_one_line(error, f"no *.safetensors weights in {path}")


def test_missing_shard_listed_in_the_index(tiny_model, tmp_path):
    path = copy_checkpoint(tiny_model, tmp_path)
    tensors = load_file(path / "model.safetensors")
    (path / "model.safetensors").rename(path / "model-00001-of-00002.safetensors")
    weight_map = {name: "model-00001-of-00002.safetensors" for name in tensors}
    weight_map["lm_head.weight"] = "model-00002-of-00002.safetensors"
    index = {"metadata": {}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError) as error:
        make_llm(path)
    assert_one_line(error, "model-00002-of-00002.safetensors listed in the index is missing")


def test_missing_tensor_is_named(tiny_model, tmp_path):
    path = copy_checkpoint(tiny_model, tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError) as error:
        make_llm(path)
    assert_one_line(error, "missing tensor", "model.layers.1.self_attn.k_proj.weight")


def test_tensor_of_the_wrong_shape_is_named(tiny_model, tmp_path):
    path = copy_checkpoint(tiny_model, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 96  # the weights have 128
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as error:
        make_llm(path)
    assert_one_line(
        error,
        "tensor model.layers.0.mlp.down_proj.weight has shape (64, 128), expected (64, 96)",
        "config.json does not match the weights",
    )
