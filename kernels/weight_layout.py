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
    relayout: Callable[[torch.Tensor], object],
) -> int:
    """Replace, in place, every weight a module names in its class attribute `listing` and
    `takes` accepts by `relayout(weight)`: a parameter without grad where that is a tensor,
    else a plain attribute (e.g. `cpu_experts.PackedExperts`); returns how many."""
    changed = 0
    for module in model.modules():
        for name in getattr(type(module), listing, ()):
            weight = getattr(module, name, None)
            if isinstance(weight, torch.Tensor) and takes(weight):
                new = relayout(weight)
                if isinstance(new, torch.Tensor):
                    new = nn.Parameter(new, requires_grad=False)
                else:
                    delattr(module, name)  # a registered parameter cannot become a non-tensor
                setattr(module, name, new)
                changed += 1
    return changed
