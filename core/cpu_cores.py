"""Which CPU cores each worker process runs on, and where the engine thread does its work.

Each CPU worker is bound to its own cores (its torch threads among them), as inference
engines on CPU do (vLLM's CPU backend binds each worker's OpenMP threads, for one).
Where the workers' threads leave no core for the engine, the engine's work for a worker's
results runs on that worker's cores: on the development machine (2 cores, 2 workers) the
engine's ~1 ms of CPU a step otherwise lands on whichever core woke it, so one worker starts
each step ~1 ms late and the other waits that long at the step's first all-to-all.
"""

from __future__ import annotations

import os


def allowed_cores() -> list[int] | None:
    """The cores this process may run on (its affinity, e.g. a cgroup's cpuset), or None
    where the OS does not say (then nothing is bound)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    return sorted(os.sched_getaffinity(0))


def num_cores() -> int:
    cores = allowed_cores()
    return len(cores) if cores else (os.cpu_count() or 1)


def threads_per_worker(num_threads: int | None, num_workers: int) -> int:
    """torch threads per CPU worker: as configured, else an even share of the cores."""
    return num_threads or max(1, num_cores() // num_workers)


def worker_core_sets(cores: list[int], num_workers: int, threads: int) -> list[list[int]]:
    """Consecutive runs of `threads` cores per worker, wrapping around when the workers
    need more cores than there are (then some share them)."""
    n, per_worker = len(cores), min(threads, len(cores))
    return [[cores[(w * threads + i) % n] for i in range(per_worker)] for w in range(num_workers)]


def parse_core_list(text: str) -> list[int]:
    """`"0,1,5"` -> [0, 1, 5] (how a worker's cores travel on its command line)."""
    return [int(core) for core in text.split(",") if core]


def bind_to(cores: list[int]) -> bool:
    """Bind the calling thread (and the threads it starts later) to `cores`; False where the
    OS refuses (the cores are outside this process's cpuset) or cannot bind at all."""
    try:
        os.sched_setaffinity(0, cores)
    except (AttributeError, OSError, ValueError):
        return False
    return True


class EngineCoreFollower:
    """Moves the engine thread onto a worker's cores while it handles that worker's results,
    and back to where it was allowed to run once it has no work left."""

    def __init__(self, core_sets: list[list[int]]) -> None:
        self.core_sets = core_sets
        self.home = allowed_cores() or []
        self.at: int | None = None  # the worker whose cores the engine thread is on

    def move_to(self, rank: int) -> None:
        if self.at != rank and bind_to(self.core_sets[rank]):
            self.at = rank

    def release(self) -> None:
        if self.at is not None:
            bind_to(self.home)
            self.at = None
