"""ExpertPlacement: contiguous shards, redundant copies, the local map, clear errors."""

from __future__ import annotations

import pytest

from titanserve.moe.placement import ExpertPlacement


def test_contiguous_shards_give_the_first_workers_the_remainder():
    placements = [ExpertPlacement.contiguous(8, 3, rank) for rank in range(3)]
    assert placements[0].owner == (0, 0, 0, 1, 1, 1, 2, 2)
    assert [p.local_experts for p in placements] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert placements[2].expert_map().tolist() == [-1, -1, -1, -1, -1, -1, 0, 1]
    assert placements[0].replica == (-1,) * 8


def test_each_worker_holds_copies_of_its_next_neighbours_first_experts():
    first, second = (ExpertPlacement.contiguous(8, 2, rank, redundant=1) for rank in range(2))
    assert first.replica == (1, -1, -1, -1, 0, -1, -1, -1)
    assert first.local_experts == [0, 1, 2, 3, 4]
    assert second.local_experts == [0, 4, 5, 6, 7]
    assert second.expert_map().tolist() == [0, -1, -1, -1, 1, 2, 3, 4]
    assert first.replica_tensor().tolist() == [1, 0, 0, 0, 0, 1, 1, 1]  # else the owner

    three = [ExpertPlacement.contiguous(8, 3, rank, redundant=2) for rank in range(3)]
    assert three[0].local_experts == [0, 1, 2, 3, 4]  # + 3, 4 of worker 1
    assert three[1].local_experts == [3, 4, 5, 6, 7]  # + 6, 7 of worker 2
    assert three[2].local_experts == [0, 1, 6, 7]  # + 0, 1 of worker 0 (wraps around)

    everything = ExpertPlacement.contiguous(8, 2, 1, redundant=4)
    assert everything.local_experts == list(range(8))


@pytest.mark.parametrize(
    ("experts", "world", "redundant", "message"),
    [
        (2, 4, 0, "cannot be sharded over 4 workers"),
        (8, 2, 5, "use at most 4"),
        (8, 3, 3, "use at most 2"),  # worker 2 owns only 2 experts to copy
        (8, 1, 1, "need more than one worker"),
    ],
)
def test_impossible_placements_say_why(experts, world, redundant, message):
    with pytest.raises(ValueError, match=message):
        ExpertPlacement.contiguous(experts, world, 0, redundant=redundant)


def test_balanced_placement_packs_hot_experts_apart():
    start = ExpertPlacement.contiguous(8, 2, 0)
    loads = [627, 3805, 4471, 557, 8, 70, 7, 33]  # a real layer: worker 0 had 99% of the rows
    assert start.worker_loads(loads) == [9460, 118]
    new = start.balanced(loads)
    rows = new.worker_loads(loads)
    assert rows == [4471 + 70 + 33 + 8, 3805 + 627 + 557 + 7]  # 52% for the busier
    assert [new.slots(w) for w in range(2)] == [4, 4]
    assert sorted(new.owner) == [0] * 4 + [1] * 4 and new.replica == (-1,) * 8
    assert ExpertPlacement.contiguous(8, 2, 1).balanced(loads).owner == new.owner  # same map
    assert new.balanced(loads) == new  # stable: nothing moves a second time


def test_balanced_placement_copies_the_hottest_experts():
    start = ExpertPlacement.contiguous(8, 2, 0, redundant=1)
    loads = [100, 100, 100, 100, 100, 100, 100, 2000]
    new = start.balanced(loads)
    assert new.replica[7] >= 0 and {new.owner[7], new.replica[7]} == {0, 1}
    assert sum(r >= 0 for r in new.replica) == 2  # as many copies as before
    assert [new.slots(w) for w in range(2)] == [5, 5]
    rows = new.worker_loads(loads)
    assert max(rows) - min(rows) <= 100, rows
