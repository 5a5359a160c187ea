"""Run one function in W spawned processes (ranks) and gather what each returns: the harness of
the multi-process benchmarks (collectives.py, lockstep_floor.py)."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
from collections.abc import Callable, Mapping


def run_ranks(
    target: Callable, world: int, *args, env: Mapping[str, str] | None = None
) -> dict[int, object]:
    """Start `target(rank, *args, out)` for every rank in a process of its own (with `env` as
    its environment, if given); each puts `(rank, result)` on `out`. Returns the results by
    rank. A process that fails ends the benchmark (its traceback is above) instead of leaving
    the others waiting."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(rank, *args, out)) for rank in range(world)]
    saved = dict(os.environ)
    try:
        if env is not None:  # a spawned process starts with this process's environment
            os.environ.clear()
            os.environ.update(env)
        for proc in procs:
            proc.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    results: dict[int, object] = {}
    while len(results) < world:
        try:
            rank, result = out.get(timeout=1)
            results[rank] = result
        except queue.Empty:
            if any(proc.exitcode not in (None, 0) for proc in procs):
                for proc in procs:
                    proc.kill()
                raise SystemExit("a benchmark process failed; see its traceback above") from None
    for proc in procs:
        proc.join()
    return results
