"""Staged forwards: a model pass as a generator that pauses at each exchange it starts.

A staged forward yields right after it has started a collective (the all-to-all dispatch or
combine of an MoE layer) and, once resumed, receives it. `finish` runs one such pass alone:
it resumes at once, which is the plain forward. `interleave` runs several (the micro-batches
of one step) round-robin, so that one micro-batch's exchange is in flight while another one
computes: two-batch overlap, as SGLang's TBO and DeepSeek's dual micro-batch pipelines do.

NOTE: workers in lockstep must start the same collectives in the same order. Every micro-
batch (an empty one too) passes the same layers and so yields the same number of times;
round-robin then starts them in the same order on every worker, with at most one exchange of
each micro-batch in flight (the collective's limit, see `Collective.all_to_all_cat_start`).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TypeVar

Result = TypeVar("Result")
Staged = Generator[None, None, Result]  # yields with an exchange in flight, returns the result


def finish(staged: Staged[Result]) -> Result:
    """Run a staged forward to its end, alone."""
    while True:
        try:
            next(staged)
        except StopIteration as done:
            return done.value


def interleave(staged: list[Staged[Result]]) -> list[Result]:
    """Run staged forwards round-robin, each up to its next exchange in turn, until all have
    ended; returns their results in order. If one raises, the others are closed."""
    results: list = [None] * len(staged)
    running = list(range(len(staged)))
    try:
        while running:
            for i in list(running):
                try:
                    next(staged[i])
                except StopIteration as done:
                    results[i] = done.value
                    running.remove(i)
    finally:
        for i in running:  # only after a failure
            staged[i].close()
    return results
