"""Kernel backend selection: Triton on CUDA tensors, torch everywhere else.

`TITANSERVE_KERNELS=triton|torch` forces one backend for the whole process; it is read once,
here. Forcing `triton` on CPU tensors runs the Triton kernels in Triton's interpreter (slow;
that is how the tests check them without a GPU).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

BACKENDS = ("triton", "torch")

_ENV_BACKEND = os.environ.get("TITANSERVE_KERNELS", "").strip().lower() or None
if _ENV_BACKEND is not None and _ENV_BACKEND not in BACKENDS:
    raise ValueError(
        f"TITANSERVE_KERNELS={_ENV_BACKEND!r} is not a kernel backend; use one of {BACKENDS}"
    )
# Extra folder searched for tuned fused-MoE config tables (JSON files written by
# `python -m titanserve.kernels.tune_fused_moe`), before the package's own `configs/`.
MOE_CONFIG_DIR: Path | None = (
    Path(os.environ["TITANSERVE_MOE_CONFIG_DIR"])
    if os.environ.get("TITANSERVE_MOE_CONFIG_DIR")
    else None
)

_forced: str | None = _ENV_BACKEND

# NOTE: Triton decides between compiling and interpreting when it and the kernels are imported,
# not per launch. A torch build without CUDA can only interpret, so turn the interpreter on
# before any kernel module imports triton; forcing the triton backend on CPU then just works.
if torch.version.cuda is None and torch.version.hip is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def backend(t: torch.Tensor | None = None) -> str:
    """The backend that runs ops on `t`: "triton" for CUDA tensors, "torch" otherwise.

    With no tensor, answers for the default device (CUDA when available). A backend forced by
    `TITANSERVE_KERNELS` or `forced_backend()` wins over both.
    """
    if _forced is not None:
        return _forced
    if t is None:
        return "triton" if torch.cuda.is_available() else "torch"
    return "triton" if t.is_cuda else "torch"


@contextlib.contextmanager
def forced_backend(name: str | None) -> Iterator[None]:
    """Force `name` ("triton", "torch", or None for automatic) inside a `with` block."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; use one of {BACKENDS} or None")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous
