"""How long a process's main thread sat ready to run while something else had its core."""

from __future__ import annotations


def run_queue_wait_s(pid: int) -> float | None:
    """Seconds the main thread of process `pid` has spent ready to run while another task ran
    on its core (Linux schedstat's run delay): host daemons, the engine, other workers. None
    where the OS does not say."""
    try:
        with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def run_queue_wait_since(pid: int, before: float | None) -> float | None:
    """`run_queue_wait_s(pid)` less an earlier reading of it; None if either is None."""
    now = run_queue_wait_s(pid)
    return None if now is None or before is None else now - before
