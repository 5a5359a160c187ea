"""Tokenizer: `tokenizer.json` through `tokenizers`, chat templates through jinja2.

No transformers import at run time. `IncrementalDetokenizer` turns a growing list of token
ids into text deltas and never emits half of a multi-byte character; `FinalDetokenizer` gives
the same text in one call, for an output nobody streams.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from titanserve.core.errors import ConfigError, InvalidRequest


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer_config files
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.exists():
            raise ConfigError(
                f"no tokenizer.json in {path}; the checkpoint needs a fast tokenizer file"
            )
        self._tok = HFTokenizer.from_file(str(file))
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        template = config.get("chat_template")
        jinja_file = path / "chat_template.jinja"
        if template is None and jinja_file.exists():
            template = jinja_file.read_text()
        if isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs
    ) -> str:
        """Render a conversation like transformers' `apply_chat_template(tokenize=False)`."""
        if not self.chat_template:
            raise InvalidRequest("this model has no chat template; send a plain prompt instead")
        if self._template is None:
            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(
                x, ensure_ascii=False, indent=indent
            )
            self._template = env.from_string(self.chat_template)
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **kwargs,
            )
        except jinja2.TemplateError as e:
            raise InvalidRequest(f"chat template failed: {e}") from None


def _raise(message: str):
    raise InvalidRequest(message)


PRIME_TOKENS = 6  # prompt tokens a detokenizer decodes as context (their text is not ours)
_MAX_HELD_TOKENS = 4  # a character is at most 4 bytes


class IncrementalDetokenizer:
    """Text deltas for a stream of token ids: `tokenizers`' DecodeStream (in Rust), primed
    with the prompt's last tokens so that the first output token's leading space survives."""

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True
    ):
        self._tok = tokenizer._tok
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        for token_id in prompt_token_ids[-PRIME_TOKENS:]:
            self._step(token_id)
        self.text = ""

    def push(self, token_id: int) -> str:
        """Append one token, return the new text it completes (possibly empty)."""
        delta = self._step(token_id)
        self.text += delta
        return delta

    def _step(self, token_id: int) -> str:
        return self._stream.step(self._tok, token_id) or ""  # None: waits for more bytes


class FinalDetokenizer:
    """An output's text in one decode once it ends, for outputs that nobody streams: one call
    instead of one a token (on the development machine, 64 streams cost ~0.2 ms of a tiny
    model's 15 ms decode step). Primed like `IncrementalDetokenizer`, it gives the text that
    the stream's deltas add up to, held-back bytes of an unfinished last character included."""

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True
    ):
        self._tokenizer, self._skip = tokenizer, skip_special_tokens
        self._prime = list(prompt_token_ids[-PRIME_TOKENS:])

    def text(self, output_ids: list[int]) -> str:
        prime = self._printed(self._prime)
        full = self._printed(self._prime + list(output_ids))
        if prime is not None and full is not None and full.startswith(prime):
            return full[len(prime) :]
        # A long unfinished run, or an output that changed the prime's printed text (a
        # decoder that looks across tokens): the stream itself says what it prints.
        stream = IncrementalDetokenizer(self._tokenizer, self._prime, self._skip)
        for token_id in output_ids:
            stream.push(token_id)
        return stream.text

    def _printed(self, token_ids: list[int]) -> str | None:
        """The text a stream of these tokens has printed: it holds back the tokens after the
        last one that left no character unfinished (no U+FFFD at the end). None when that
        is more than a few tokens back (a decode each: the stream is cheaper then)."""
        for end in range(len(token_ids), max(0, len(token_ids) - _MAX_HELD_TOKENS) - 1, -1):
            text = self._tokenizer.decode(token_ids[:end], self._skip) if end else ""
            if not text.endswith("\ufffd"):
                return text
        return None
