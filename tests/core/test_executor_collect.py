"""MultiProcExecutor.collect with two steps in flight (async scheduling): a worker a step
ahead has its result kept for the next collect, and a late result of an abandoned step is
dropped. The worker sockets are replaced by a scripted arrival order (the fault to inject:
real processes rarely produce every order on demand)."""

from __future__ import annotations

from collections import deque

from titanserve.core.multiproc_executor import MultiProcExecutor
from titanserve.ipc.messages import SeqResult, StepResult


def scripted_executor(arrivals: list[tuple[int, int]], in_flight: list[int]) -> MultiProcExecutor:
    """An executor of 2 workers whose results arrive as (rank, step id), in this order."""
    executor = MultiProcExecutor.__new__(MultiProcExecutor)
    executor.world_size, executor.lost = 2, None
    executor.in_flight, executor.early = deque(in_flight), {}
    executor.follower = None
    queue = deque(arrivals)

    def recv():
        rank, step_id = queue.popleft()
        result = StepResult(step_id=step_id, seqs=[SeqResult(request_id=f"r{rank}.{step_id}")])
        return rank, result, [None]

    executor._recv = recv
    return executor


def collected(executor: MultiProcExecutor) -> list[tuple[int, int, str]]:
    return [(rank, r.step_id, r.seqs[0].request_id) for rank, r, _ in executor.collect()]


def test_a_worker_a_step_ahead_keeps_its_result_for_the_next_collect():
    arrivals = [(0, 5), (0, 6), (1, 5), (1, 6)]
    executor = scripted_executor(arrivals, in_flight=[5, 6])
    assert collected(executor) == [(0, 5, "r0.5"), (1, 5, "r1.5")]
    assert collected(executor) == [(0, 6, "r0.6"), (1, 6, "r1.6")]
    assert not executor.in_flight and not executor.early


class RecordingFollower:
    def __init__(self) -> None:
        self.moves: list[int] = []

    def move_to(self, rank: int) -> None:
        self.moves.append(rank)


def test_the_engine_handles_each_result_on_its_workers_cores_then_plans_on_the_firsts():
    executor = scripted_executor([(1, 5), (0, 6), (0, 5), (1, 6)], in_flight=[5, 6])
    executor.follower = follower = RecordingFollower()
    for rank, _, _ in executor.collect():
        assert follower.moves[-1] == rank  # on its cores while its result is handled
    assert follower.moves == [1, 0, 1]  # then back to the first to come, to plan
    collected(executor)  # worker 0's step-6 result came early: it is first this time
    assert follower.moves[3:] == [0, 1, 0]


def test_a_late_result_of_an_abandoned_step_is_dropped():
    arrivals = [(0, 5), (1, 5), (0, 6), (1, 6)]
    executor = scripted_executor(arrivals, in_flight=[5, 6])
    next(executor.collect())  # step 5 abandoned after worker 0's result
    assert collected(executor) == [(0, 6, "r0.6"), (1, 6, "r1.6")]
