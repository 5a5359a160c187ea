"""CPU core binding: each worker's cores, and the engine thread moving onto a worker's cores
and back (real affinity calls on this machine's cores)."""

from __future__ import annotations

import os

import pytest

from titanserve.core.cpu_cores import (
    EngineCoreFollower,
    allowed_cores,
    bind_to,
    parse_core_list,
    threads_per_worker,
    worker_core_sets,
)


@pytest.mark.parametrize(
    "cores, workers, threads, expected",
    [
        ([0, 1], 2, 1, [[0], [1]]),
        ([0, 1, 2, 3], 2, 2, [[0, 1], [2, 3]]),
        ([0, 1], 4, 1, [[0], [1], [0], [1]]),  # more workers than cores: they share
        ([2, 5, 7], 1, 3, [[2, 5, 7]]),  # a cpuset's cores, not 0..n-1
        ([0, 1], 1, 4, [[0, 1]]),  # more threads than cores: every core, once
        ([0, 1, 2], 2, 1, [[0], [1]]),  # core 2 is left to the engine
    ],
)
def test_worker_core_sets(cores, workers, threads, expected) -> None:
    assert worker_core_sets(cores, workers, threads) == expected


def test_threads_per_worker_share_the_allowed_cores(monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    assert threads_per_worker(None, 2) == 2
    assert threads_per_worker(None, 8) == 1
    assert threads_per_worker(3, 2) == 3  # as configured


def test_core_lists_travel_as_text() -> None:
    assert parse_core_list(",".join(map(str, [0, 3, 12]))) == [0, 3, 12]
    assert parse_core_list("") == []


def test_the_engine_thread_follows_a_worker_and_comes_back() -> None:
    home = allowed_cores()
    sets = [[home[0]], [home[-1]]]
    follower = EngineCoreFollower(sets)
    try:
        follower.move_to(1)
        assert os.sched_getaffinity(0) == {home[-1]} and follower.at == 1
        follower.move_to(0)
        assert os.sched_getaffinity(0) == {home[0]} and follower.at == 0
    finally:
        follower.release()
    assert sorted(os.sched_getaffinity(0)) == home and follower.at is None


def test_binding_outside_the_cpuset_is_refused_and_changes_nothing() -> None:
    home = os.sched_getaffinity(0)
    assert not bind_to([max(home) + 4096])
    assert os.sched_getaffinity(0) == home
