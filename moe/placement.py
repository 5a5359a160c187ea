"""Which worker owns which experts (the expert-parallel map)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    """Expert e of every MoE layer lives on worker `owner[e]`, as local index `local[e]`.

    Contiguous by default: worker w owns experts [w*E/W, (w+1)*E/W) (the first E % W
    workers take one more when E does not divide evenly)."""

    num_experts: int
    world_size: int
    rank: int
    owner: tuple[int, ...]
    local: tuple[int, ...]

    @staticmethod
    def contiguous(num_experts: int, world_size: int = 1, rank: int = 0) -> ExpertPlacement:
        if num_experts and num_experts < world_size:
            raise ValueError(
                f"{num_experts} experts cannot be sharded over {world_size} workers; "
                "use at most as many workers as experts"
            )
        owner, local = [], []
        base, extra = divmod(num_experts, world_size) if num_experts else (0, 0)
        for w in range(world_size):
            count = base + (1 if w < extra else 0)
            owner += [w] * count
            local += list(range(count))
        return ExpertPlacement(num_experts, world_size, rank, tuple(owner), tuple(local))

    @property
    def local_experts(self) -> list[int]:
        """Global ids of this rank's experts, in local-index order."""
        return [e for e in range(self.num_experts) if self.owner[e] == self.rank]

    def expert_map(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(E,) int32: global expert id -> local index on this rank, or -1.

        With no device, on torch's current default one (a model built inside `with
        torch.device("cuda")` gets its map there)."""
        m = [self.local[e] if self.owner[e] == self.rank else -1 for e in range(self.num_experts)]
        return torch.tensor(m, dtype=torch.int32, device=device)

    def owner_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.tensor(self.owner, dtype=torch.int64, device=device)
