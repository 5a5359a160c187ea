"""Which worker computes each (token, expert) pair, redundant experts included.

An expert with a copy (see `ExpertPlacement`) may be computed by either of its two holders.
Routing is random from step to step, so with one holder per expert each layer leaves some
worker a few rows more than the others, and they wait for it at the combine all-to-all. Each
worker splits its own pairs for such experts so that every worker gets about as many rows
from it; the sum over senders is then even too, with no exchange of counts beforehand.

Legend: P pairs (tokens x top-k), E experts, W workers.
"""

from __future__ import annotations

import torch

from titanserve.moe.placement import ExpertPlacement


class PairDestinations:
    """Callable: expert id of each pair (any shape) -> the worker that computes it (int64, the
    same shape)."""

    def __init__(self, placement: ExpertPlacement, device: torch.device | None = None) -> None:
        self.world_size = placement.world_size
        self.owner = placement.owner_tensor(device)  # (E,) worker of each expert
        self.holder = placement.replica_tensor(device)  # (E,) worker with its copy
        self._owner_of, self._replica_of = list(placement.owner), list(placement.replica)
        self._with_copy = [e for e, r in enumerate(placement.replica) if r >= 0]
        self.has_copies = bool(self._with_copy)  # then a pair's worker depends on the step

    def __call__(
        self, ids: torch.Tensor, expert_counts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Each pair goes to its expert's owner; of the pairs of an expert with a copy, the
        owner keeps the first ones and the copy's holder takes the rest, in numbers that even
        out the rows each worker gets (greedy over those experts, busiest first).
        `expert_counts`: (E,) pairs of each expert, where the caller has counted them."""
        device = ids.device
        owner = self.owner.to(device)
        if not self._with_copy:
            return owner[ids]
        flat_ids = ids.reshape(-1).long()  # (P,)
        if expert_counts is None:
            expert_counts = torch.bincount(flat_ids, minlength=owner.numel())
        counts = expert_counts.tolist()  # (E,) pairs
        keep = self.owner_shares(counts)
        starts, at = [], 0
        for n in counts:
            starts.append(at)
            at += n
        by_expert = torch.argsort(flat_ids, stable=True)  # (P,) pairs grouped by expert
        sorted_ids = flat_ids[by_expert]  # (P,)
        bounds = torch.tensor([starts, keep], device=device)[:, sorted_ids]  # (2, P)
        position = torch.arange(flat_ids.numel(), device=device) - bounds[0]  # (P,) in expert
        to_copy = position >= bounds[1]
        dest = torch.empty_like(flat_ids)
        dest[by_expert] = torch.where(to_copy, self.holder.to(device)[sorted_ids],
                                      owner[sorted_ids])
        return dest.view(ids.shape)

    def owner_shares(self, counts: list[int]) -> list[int]:
        """How many of each expert's `counts[e]` pairs its owner computes (the rest go to
        the copy)."""
        loads = [0] * self.world_size  # rows for each worker so far
        for e, n in enumerate(counts):
            if self._replica_of[e] < 0:
                loads[self._owner_of[e]] += n
        keep = list(counts)
        for e in sorted(self._with_copy, key=counts.__getitem__, reverse=True):
            n, owner, copy = counts[e], self._owner_of[e], self._replica_of[e]
            to_copy = min(n, max(0, (loads[owner] + n - loads[copy] + 1) // 2))
            keep[e] = n - to_copy
            loads[owner] += n - to_copy
            loads[copy] += to_copy
        return keep
