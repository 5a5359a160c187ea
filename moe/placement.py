"""Which worker holds which experts (the expert-parallel map), redundant copies included."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    """Expert e of a MoE layer lives on worker `owner[e]`, and a copy of it on worker
    `replica[e]` (-1: none). A token's pair for an expert with a copy may be computed by
    either worker; `moe.balance` picks, step by step, to even out the workers' rows. Every
    layer starts with the same placement; `moe.rebalance` re-places each by its loads.

    Contiguous by default: worker w owns experts [w*E/W, (w+1)*E/W) (the first E % W
    workers take one more when E does not divide evenly). With `redundant` r, worker w also
    holds copies of the first r experts that worker w+1 (mod W) owns."""

    num_experts: int
    world_size: int
    rank: int
    owner: tuple[int, ...]
    replica: tuple[int, ...]

    @staticmethod
    def contiguous(
        num_experts: int, world_size: int = 1, rank: int = 0, redundant: int = 0
    ) -> ExpertPlacement:
        if num_experts and num_experts < world_size:
            raise ValueError(
                f"{num_experts} experts cannot be sharded over {world_size} workers; "
                "use at most as many workers as experts"
            )
        owner = []
        base, extra = divmod(num_experts, world_size) if num_experts else (0, 0)
        for w in range(world_size):
            owner += [w] * (base + (1 if w < extra else 0))
        replica = [-1] * num_experts
        if redundant and num_experts:
            if world_size == 1:
                raise ValueError("redundant experts need more than one worker; use 0")
            if redundant > base:
                raise ValueError(
                    f"{redundant} redundant experts per worker is more than the {base} experts "
                    f"each worker owns ({num_experts} experts over {world_size} workers); "
                    f"use at most {base}"
                )
            for w in range(world_size):
                nxt = (w + 1) % world_size
                for e in [e for e in range(num_experts) if owner[e] == nxt][:redundant]:
                    replica[e] = w
        return ExpertPlacement(num_experts, world_size, rank, tuple(owner), tuple(replica))

    def worker_loads(self, loads: list[int]) -> list[float]:
        """The rows each worker computes for these expert loads, a copied expert's split
        evenly between its two holders (as `moe.balance` splits them)."""
        rows = [0.0] * self.world_size
        for e, n in enumerate(loads):
            if self.replica[e] >= 0:
                rows[self.owner[e]] += n / 2
                rows[self.replica[e]] += n / 2
            else:
                rows[self.owner[e]] += n
        return rows

    def slots(self, rank: int | None = None) -> int:
        """How many experts worker `rank` (default: this one) holds: what its weight stacks
        are sized for, kept when the experts are re-placed."""
        rank = self.rank if rank is None else rank
        return sum(1 for e in range(self.num_experts) if rank in (self.owner[e], self.replica[e]))

    def balanced(self, loads: list[int]) -> ExpertPlacement:
        """The placement for these measured `loads` (pairs routed to each expert): the most
        loaded experts get the copies, and each expert (or each copy, at half the load) goes,
        heaviest first, to the least loaded worker with a free slot that does not hold it yet
        (least-processing-time packing). Workers keep their slot counts; on ties an expert
        stays where it is. Deterministic: every worker computes the same placement from the
        same loads."""
        E, W = self.num_experts, self.world_size
        copies = sum(r >= 0 for r in self.replica)
        hottest = sorted(range(E), key=lambda e: (-loads[e], e))[:copies]
        items = [(loads[e] / 2, e) for e in hottest for _ in range(2)]
        items += [(loads[e], e) for e in range(E) if e not in hottest]
        items.sort(key=lambda item: (-item[0], item[1]))
        free = [self.slots(w) for w in range(W)]
        load = [0.0] * W
        holders: list[list[int]] = [[] for _ in range(E)]
        for weight, e in items:
            fits = [w for w in range(W) if free[w] and w not in holders[e]]
            if not fits:  # only a worker already holding it has room: one holder is enough
                continue
            # ties go to a worker that holds the expert now (nothing to load), then the lowest
            w = min(fits, key=lambda w: (load[w], w not in (self.owner[e], self.replica[e]), w))
            holders[e].append(w)
            free[w] -= 1
            load[w] += weight
        owner = tuple(h[0] for h in holders)
        replica = tuple(h[1] if len(h) > 1 else -1 for h in holders)
        return ExpertPlacement(E, W, self.rank, owner, replica)

    @property
    def local_experts(self) -> list[int]:
        """Global ids of this rank's experts (its own and its copies), in local-index order."""
        return [e for e in range(self.num_experts) if self.rank in (self.owner[e], self.replica[e])]

    def expert_map(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(E,) int32: global expert id -> local index on this rank, or -1.

        With no device, on torch's current default one (a model built inside `with
        torch.device("cuda")` gets its map there)."""
        return slot_map(self.local_experts, self.num_experts, device)

    def owner_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.tensor(self.owner, dtype=torch.int64, device=device)

    def replica_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(E,) int64: the worker with a copy of each expert, or its owner where none has."""
        return torch.tensor(
            [r if r >= 0 else o for o, r in zip(self.owner, self.replica)],
            dtype=torch.int64,
            device=device,
        )


def slot_map(
    slot_experts: list[int], num_experts: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """(E,) int32: global expert id -> the weight slot holding it (`slot_experts[i]` is the
    expert in slot i, -1 for none), or -1 where no slot does."""
    m = [-1] * num_experts
    for slot, e in enumerate(slot_experts):
        if e >= 0:
            m[e] = slot
    return torch.tensor(m, dtype=torch.int32, device=device)


def with_no_expert(expert_map: torch.Tensor) -> torch.Tensor:
    """(E,) map -> (E + 1,): a -1 appended, which id -1 (no expert) reads as id E would."""
    return torch.cat([expert_map, expert_map.new_full((1,), -1)])
