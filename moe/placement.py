"""Which worker holds which experts (the expert-parallel map), redundant copies included."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    """Expert e of every MoE layer lives on worker `owner[e]`, and a copy of it on worker
    `replica[e]` (-1: none). A token's pair for an expert with a copy may be computed by
    either worker; `ExpertParallel` picks, step by step, to even out the workers' rows.

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
            if world_size == 1 or redundant > base:
                raise ValueError(
                    f"{redundant} redundant experts per worker: with {num_experts} experts "
                    f"over {world_size} worker(s), use at most {base if world_size > 1 else 0}"
                )
            for w in range(world_size):
                nxt = (w + 1) % world_size
                for e in [e for e in range(num_experts) if owner[e] == nxt][:redundant]:
                    replica[e] = w
        return ExpertPlacement(num_experts, world_size, rank, tuple(owner), tuple(replica))

    @property
    def local_experts(self) -> list[int]:
        """Global ids of this rank's experts (its own and its copies), in local-index order."""
        return [e for e in range(self.num_experts) if self.rank in (self.owner[e], self.replica[e])]

    def expert_map(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(E,) int32: global expert id -> local index on this rank, or -1.

        With no device, on torch's current default one (a model built inside `with
        torch.device("cuda")` gets its map there)."""
        m = [-1] * self.num_experts
        for i, e in enumerate(self.local_experts):
            m[e] = i
        return torch.tensor(m, dtype=torch.int32, device=device)

    def owner_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.tensor(self.owner, dtype=torch.int64, device=device)

    def replica_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(E,) int64: the worker with a copy of each expert, or its owner where none has."""
        return torch.tensor(
            [r if r >= 0 else o for o, r in zip(self.owner, self.replica)],
            dtype=torch.int64,
            device=device,
        )
