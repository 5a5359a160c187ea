"""Helpers shared by the Triton launchers: argument checks and tile arithmetic."""

from __future__ import annotations

import torch
import triton


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return bool(triton.knobs.runtime.interpret)


def require(ok: bool, message: str) -> None:
    """Raise ValueError(message) unless `ok`: argument checks in launchers."""
    if not ok:
        raise ValueError(message)


def require_launchable(op: str, *tensors: torch.Tensor | None) -> None:
    """All tensors on one device, and one that Triton can run on (CUDA, or CPU when
    interpreting)."""
    devices = {t.device for t in tensors if t is not None}
    require(len(devices) <= 1, f"{op}: all tensors must be on one device, got {devices}")
    require(
        interpreting() or all(d.type == "cuda" for d in devices),
        f"{op}: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 set before triton "
        "is imported); use the torch backend on CPU",
    )


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): Triton block sizes."""
    return triton.next_power_of_2(max(1, n))


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative ints: grid sizes."""
    return -(-a // b)
