"""Rebuild a Hugging Face `tokenizer.json` from the vocabulary a GGUF file carries.

A GGUF has no `tokenizer.json`: llama.cpp stores the vocabulary, the BPE merges, a type per token
(normal, control, user-defined, ...) and the special token ids as metadata. For byte-level BPE
vocabularies (`tokenizer.ggml.model == "gpt2"`: GPT-2, SmolLM2, Llama 3, Qwen2, ...) that is
everything the `tokenizers` library needs, plus the way text is split before BPE, which the file
only names (`tokenizer.ggml.pre`) and which llama.cpp hard-codes per name (`llama-vocab.cpp`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# llama.cpp token types (`gguf.TokenType`).
_CONTROL = 3
_USER_DEFINED = 4

# Split regexes of llama.cpp's pre-tokenizers, by `tokenizer.ggml.pre`. Names not listed split
# like GPT-2 (the ByteLevel pre-tokenizer's built-in regex).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_REGEX_SPLITS = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# NOTE: these split every digit off on its own, then split the rest like GPT-2. This is
# llama.cpp's `\p{N}` expression and the `Digits(individual_digits=True)` step of the original
# SmolLM2/StarCoder `tokenizer.json`.
_DIGIT_SPLITS = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to the printable character that spells it in the vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    spelling = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer llama.cpp uses for the `tokenizer.ggml.pre` name `pre`."""
    if pre in _REGEX_SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_REGEX_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in _DIGIT_SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def build_tokenizer(metadata: Mapping[str, Any]) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` from a GGUF file's `tokenizer.ggml.*` metadata."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"GGUF tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2') "
            "vocabularies can be converted. Use a Hugging Face checkpoint folder instead."
        )
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    token_types = list(metadata.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ")) for m in metadata["tokenizer.ggml.merges"]]
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())

    def spelled(token: str, token_type: int) -> str:
        # Added tokens match raw text; vocabulary tokens are written in the byte alphabet already,
        # except in files whose converter wrote raw text for them.
        if token_type in (_CONTROL, _USER_DEFINED) or set(token) <= alphabet:
            return token
        return "".join(spelling[b] for b in token.encode("utf-8"))

    vocab = {spelled(t, ty): i for i, (t, ty) in enumerate(zip(tokens, token_types))}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF vocabulary has duplicate tokens; the file is damaged")
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tokenizer.pre_tokenizer = _pre_tokenizer(str(metadata.get("tokenizer.ggml.pre", "default")))
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    kinds = list(zip(tokens, token_types))
    tokenizer.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t, ty in kinds if ty == _CONTROL]
    )
    tokenizer.add_tokens(
        [AddedToken(t, normalized=False, special=False) for t, ty in kinds if ty == _USER_DEFINED]
    )
    assert tokenizer.get_vocab_size() == len(tokens), "added tokens must reuse vocabulary ids"
    return tokenizer


def _token(metadata: Mapping[str, Any], key: str) -> str | None:
    """The text of the special token whose id is stored under `tokenizer.ggml.<key>`."""
    token_id = metadata.get(f"tokenizer.ggml.{key}")
    return None if token_id is None else metadata["tokenizer.ggml.tokens"][int(token_id)]


def tokenizer_config(metadata: Mapping[str, Any], tokenizer: Tokenizer) -> dict[str, Any]:
    """The `tokenizer_config.json` dict: special tokens, BOS/EOS flags and the chat template."""
    added = {
        str(token_id): {
            "content": tok.content,
            "lstrip": tok.lstrip,
            "normalized": tok.normalized,
            "rstrip": tok.rstrip,
            "single_word": tok.single_word,
            "special": tok.special,
        }
        for token_id, tok in sorted(tokenizer.get_added_tokens_decoder().items())
    }
    config: dict[str, Any] = {
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        "added_tokens_decoder": added,
        "bos_token": _token(metadata, "bos_token_id"),
        "eos_token": _token(metadata, "eos_token_id"),
        "pad_token": _token(metadata, "padding_token_id"),
        "unk_token": _token(metadata, "unknown_token_id"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(metadata.get("llama.context_length", 2048)),
        # The fast tokenizer class loads `tokenizer.json` as written (a GPT2Tokenizer would
        # replace the pre-tokenizer with GPT-2's own).
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if "tokenizer.chat_template" in metadata:
        config["chat_template"] = str(metadata["tokenizer.chat_template"])
    return config


def write_tokenizer_files(metadata: Mapping[str, Any], out_dir: Path) -> Tokenizer:
    """Write `tokenizer.json` and `tokenizer_config.json` for the GGUF vocabulary into `out_dir`."""
    tokenizer = build_tokenizer(metadata)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = tokenizer_config(metadata, tokenizer)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return tokenizer
