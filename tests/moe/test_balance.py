"""PairDestinations: every pair goes to a worker holding its expert, and copies even out the
rows each worker gets."""

from __future__ import annotations

import pytest
import torch

from titanserve.moe.balance import PairDestinations
from titanserve.moe.placement import ExpertPlacement


def routed(tokens: int, experts: int, top_k: int, seed: int) -> torch.Tensor:
    """(tokens * top_k,) expert ids, top-k distinct per token, skewed like a real router."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(tokens, experts, generator=g) + torch.linspace(0, 1, experts)
    return scores.topk(top_k, dim=1).indices.reshape(-1)


def rows_per_worker(dest: torch.Tensor, world: int) -> list[int]:
    return torch.bincount(dest, minlength=world).tolist()


def test_without_copies_every_pair_goes_to_its_owner():
    placement = ExpertPlacement.contiguous(8, 2)
    ids = routed(64, 8, 2, seed=0)
    assert torch.equal(PairDestinations(placement)(ids), placement.owner_tensor()[ids])


@pytest.mark.parametrize(("world", "redundant"), [(2, 1), (2, 4), (3, 2), (4, 1)])
@pytest.mark.parametrize("seed", range(5))
def test_pairs_go_to_a_holder_and_rows_even_out(world, redundant, seed):
    placement = ExpertPlacement.contiguous(8, world, 0, redundant=redundant)
    ids = routed(64, 8, 2, seed)
    dest = PairDestinations(placement)(ids)
    counted = torch.bincount(ids, minlength=8)  # as an MoE layer counting its loads has
    assert torch.equal(PairDestinations(placement)(ids, counted), dest)
    owner, copy = placement.owner_tensor()[ids], torch.tensor(placement.replica)[ids]
    assert bool(((dest == owner) | (dest == copy)).all())
    balanced = rows_per_worker(dest, world)
    alone = rows_per_worker(owner, world)
    assert max(balanced) <= max(alone) and sum(balanced) == ids.numel()
    if world == 2:  # every expert with a copy is shared by the two: at most one row apart
        counts = torch.bincount(ids, minlength=8)
        movable = int(counts[[e for e in range(8) if placement.replica[e] >= 0]].sum())
        if movable >= abs(alone[0] - alone[1]):
            assert abs(balanced[0] - balanced[1]) <= 1, (alone, balanced)


@pytest.mark.parametrize("redundant", [0, 1])
def test_a_routers_int32_ids_keep_their_shape(redundant):
    """The dispatch passes the router's (T, K) int32 ids as they are."""
    placement = ExpertPlacement.contiguous(8, 2, 0, redundant=redundant)
    destinations = PairDestinations(placement)
    ids = routed(64, 8, 2, seed=3)
    dest = destinations(ids.view(64, 2).int())
    assert dest.shape == (64, 2) and dest.dtype == torch.int64
    assert torch.equal(dest.reshape(-1), destinations(ids))
    assert destinations.has_copies == bool(redundant)


def test_an_imbalance_larger_than_the_copies_moves_them_all():
    placement = ExpertPlacement.contiguous(8, 2, 0, redundant=1)  # 0 <-> 1, 4 <-> 0
    ids = torch.tensor([1, 2, 3] * 10 + [0] * 4)  # 30 fixed rows for worker 0, 4 movable
    dest = PairDestinations(placement)(ids)
    assert rows_per_worker(dest, 2) == [30, 4]
    assert bool((dest[ids == 0] == 1).all())


def test_the_owner_keeps_an_experts_first_pairs():
    placement = ExpertPlacement.contiguous(4, 2, 0, redundant=2)  # both hold everything
    ids = torch.tensor([0, 0, 0, 0, 0, 0])
    assert PairDestinations(placement)(ids).tolist() == [0, 0, 0, 1, 1, 1]
    assert PairDestinations(placement)(ids[:0]).tolist() == []  # no tokens: nothing to place
