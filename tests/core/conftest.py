"""Shared factories of the core tests: tiny random checkpoints (built once per session) and
random prompts drawn from ordinary token ids only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from titanserve.launcher.tiny_models import make_tiny

TINY_VOCAB_SIZE = 384
FIRST_ORDINARY_ID = 3  # ids 0..2 are <|endoftext|>, <|im_start|>, <|im_end|>


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """`tiny_model(family) -> Path`: a tiny random checkpoint (`make_tiny`), one per family
    and session. Tests must not modify it; copy it first."""
    built: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in built:
            built[family] = make_tiny(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return built[family]

    return make


@pytest.fixture(scope="session")
def random_prompts():
    """`random_prompts(lengths, seed) -> list[list[int]]`: ids in [3, vocab), so no special
    token (and no eos) ever appears in a prompt."""

    def make(lengths: list[int], seed: int = 0) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        return [
            torch.randint(FIRST_ORDINARY_ID, TINY_VOCAB_SIZE, (n,), generator=g).tolist()
            for n in lengths
        ]

    return make
