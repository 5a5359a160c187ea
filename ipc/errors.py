"""Errors that cross titanserve's process boundaries.

Kept small and free of heavy imports: light clients import this module without torch.
"""

from __future__ import annotations


class TitanserveError(Exception):
    """Base class of every typed titanserve error."""


class WorkerLost(TitanserveError, RuntimeError):
    """A worker stopped answering (it exited, crashed or hung past a deadline).

    `rank` is the lost worker's rank, or None where it cannot be told which one.
    """

    def __init__(self, rank: int | None, detail: str = "") -> None:
        self.rank = rank
        self.detail = detail
        who = f"worker rank {rank}" if rank is not None else "a worker (rank unknown)"
        super().__init__(f"{who} lost: {detail}" if detail else f"{who} lost")

    def __reduce__(self):  # survive pickling by multiprocessing (tests, launcher), not the wire
        return (type(self), (self.rank, self.detail))


class Overloaded(TitanserveError, RuntimeError):
    """The server's queue is full: retry later (HTTP 503)."""


class Timeout(TitanserveError, TimeoutError):
    """No answer from the server within the client's deadline."""
