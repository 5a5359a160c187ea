"""Weights a module lists by name, laid out again once after loading (CPU kernels read some
weights faster in another layout than the checkpoint's)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def relayout_listed_weights(
    model: nn.Module,
    listing: str,
    takes: Callable[[torch.Tensor], bool],
    relayout: Callable[[torch.Tensor], torch.Tensor],
) -> int:
    """Replace, in place, every weight a module names in its class attribute `listing` and
    `takes` accepts by `relayout(weight)` (a parameter without grad); returns how many."""
    changed = 0
    for module in model.modules():
        for name in getattr(type(module), listing, ()):
            weight = getattr(module, name, None)
            if isinstance(weight, torch.Tensor) and takes(weight):
                setattr(module, name, nn.Parameter(relayout(weight), requires_grad=False))
                changed += 1
    return changed
