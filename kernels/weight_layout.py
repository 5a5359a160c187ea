"""Weights a module lists by name, laid out again once after loading (CPU kernels read some
weights faster in another layout than the checkpoint's)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn


def listed_weights(model: nn.Module, listing: str) -> Iterator[tuple[nn.Module, str, object]]:
    """(module, name, attribute) for every name a module lists in its class attribute
    `listing` (the attribute may be None, a tensor, or a relayout of one)."""
    for module in model.modules():
        for name in getattr(type(module), listing, ()):
            yield module, name, getattr(module, name, None)


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
    for module, name, weight in listed_weights(model, listing):
        if isinstance(weight, torch.Tensor) and takes(weight):
            new = relayout(weight)
            if isinstance(new, torch.Tensor):
                new = nn.Parameter(new, requires_grad=False)
            else:
                delattr(module, name)  # a registered parameter cannot become a non-tensor
            setattr(module, name, new)
            changed += 1
    return changed
