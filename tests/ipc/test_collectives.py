"""Worker collectives on real processes and real sockets, for both backends.

Each process group runs many checks (a process start costs more than the checks): exact
all_to_all_v / all_gather / ring / barrier results, then one rank exits and the others must
raise WorkerLost naming it within a few seconds.
"""

from __future__ import annotations

import glob
import multiprocessing as mp
import os
import queue
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from titanserve.ipc.collectives import Collective, create_collective
from titanserve.ipc.collectives.mesh_sockets import ipc_endpoints, make_socket_dir
from titanserve.ipc.collectives.shm_lane import arena_prefix
from titanserve.ipc.collectives.zmq_mesh import ZmqMeshCollective
from titanserve.ipc.errors import WorkerLost

REPO_ROOT = str(Path(__file__).resolve().parents[2])
TIMEOUT_S = 2.0  # per-receive deadline inside the groups; ops take milliseconds
EXITED = "exited"


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def backend_options(backend: str) -> dict[str, Any]:
    if backend == "zmq":
        return {"socket_dir": make_socket_dir(), "timeout_s": TIMEOUT_S}
    if backend == "zmq-small-slots":  # 256 KiB messages overflow: the lane's arenas, then frames
        return {"socket_dir": make_socket_dir(), "timeout_s": TIMEOUT_S, "shm_slot_bytes": 4096}
    return {"init_method": f"tcp://127.0.0.1:{free_tcp_port()}", "timeout_s": TIMEOUT_S}


def _run_rank(rank: int, world_size: int, backend: str, options: dict, fn: Callable, out) -> None:
    torch.set_num_threads(1)
    try:
        with create_collective(backend, rank, world_size, **options) as collective:
            result = fn(rank, collective)
    except BaseException as exc:  # reported to the parent, which fails the test
        out.put((rank, "error", f"{type(exc).__name__}: {exc}"))
        raise
    out.put((rank, "ok", result))


def spawn_collective_group(
    world_size: int, backend: str, fn: Callable[[int, Collective], Any], **options: Any
) -> dict[int, Any]:
    """Run fn(rank, collective) in `world_size` new processes; return results by rank.

    A rank that exits without reporting maps to EXITED. Fails the test after 60 s.
    """
    if REPO_ROOT not in sys.path:  # children import this module by its package name
        sys.path.insert(0, REPO_ROOT)
    ctx = mp.get_context("forkserver")
    # NOTE: one clean server process imports torch once; each rank is a fresh fork of it
    # (no threads, no sockets inherited), so a group starts in a fraction of a second.
    ctx.set_forkserver_preload(["titanserve.ipc.collectives.zmq_mesh",
                                "titanserve.ipc.collectives.torch_dist", fn.__module__])
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_run_rank, args=(rank, world_size, backend, options, fn, out))
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + 60
    try:
        while len(results) < world_size:
            try:
                rank, status, value = out.get(timeout=0.2)
                assert status == "ok", f"rank {rank} failed: {value}"
                results[rank] = value
            except queue.Empty:
                for rank, proc in enumerate(procs):
                    if rank not in results and proc.exitcode is not None and out.empty():
                        results[rank] = EXITED
                assert time.monotonic() < deadline, f"group hung; results so far: {results}"
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return results


def _split_rows(src: int, dst: int) -> int:
    return (src + 2 * dst) % 3  # 0, 1 or 2 rows: every group has zero-row splits


def _a2a_payload(src: int, dst: int, dtype: torch.dtype) -> torch.Tensor:
    rows = _split_rows(src, dst)
    return (torch.arange(rows * 3) + 100 * src + 10 * dst).reshape(rows, 3).to(dtype)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values, not contiguous (every other column of a wider tensor)."""
    return torch.stack([t, t], dim=-1).flatten(-2)[..., ::2]


def _dtype_of(rank: int) -> torch.dtype:
    return torch.float32 if rank == 0 else torch.float64


def exercise(rank: int, coll: Collective, die_rank: int | None) -> dict[str, Any]:
    """Every check in one group; returns plain values the parent compares exactly."""
    world = coll.world_size
    result: dict[str, Any] = {}
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        send = [_a2a_payload(rank, dst, dtype) for dst in range(world)]
        recv = coll.all_to_all_v(send)
        result[f"a2a_{dtype}"] = [(str(t.dtype), t.tolist()) for t in recv]
        result["self_is_identity"] = recv[rank] is send[rank]
    cats = [  # several held at once: each result is its own copy, not a view of a buffer
        coll.all_to_all_cat([_a2a_payload(rank, dst, torch.float32) + k for dst in range(world)])
        for k in range(3)
    ]
    result["a2a_cat"] = [(t.tolist(), counts) for t, counts in cats]
    # in two halves, with compute between; the zmq mesh refuses another op in between
    pending = coll.all_to_all_cat_start([2 * _a2a_payload(rank, dst, torch.float32)
                                         for dst in range(world)])  # fmt: skip
    torch.randn(64, 64) @ torch.randn(64, 64)
    if isinstance(coll, ZmqMeshCollective):
        try:
            coll.barrier()
            result["op_while_pending"] = None
        except RuntimeError as exc:
            result["op_while_pending"] = str(exc)
    # a second one in flight (two micro-batches); a third, or waits out of order, refused
    second = coll.all_to_all_cat_start([3 * _a2a_payload(rank, dst, torch.float32)
                                        for dst in range(world)])  # fmt: skip
    if isinstance(coll, ZmqMeshCollective):
        refused = []
        for attempt in (lambda: coll.all_to_all_cat_start([torch.ones(1, 3)] * world),
                        second.wait):  # fmt: skip
            try:
                attempt()
                refused.append(None)
            except RuntimeError as exc:
                refused.append(str(exc))
        result["third_and_out_of_order"] = refused
    split, split_counts = pending.wait()
    result["a2a_cat_split"] = (split.tolist(), split_counts, pending.wait()[0] is split)
    result["a2a_cat_second"] = second.wait()[0].tolist()
    strided = [_strided(_a2a_payload(rank, dst, torch.bfloat16)) for dst in range(world)]
    result["a2a_cat_bf16_strided"] = coll.all_to_all_cat(strided)[0].float().tolist()
    if isinstance(coll, ZmqMeshCollective):  # a peer's part of another dtype: a clear error
        try:
            coll.all_to_all_cat([torch.zeros(1, 3, dtype=_dtype_of(rank)) for _ in range(world)])
            result["a2a_cat_mismatch"] = None
        except ValueError as exc:
            result["a2a_cat_mismatch"] = str(exc)
    big_cat, big_counts = coll.all_to_all_cat([torch.full((1 << 15, 4), float(rank * world + dst))
                                               for dst in range(world)])  # fmt: skip
    result["a2a_cat_big"] = [(n, part.min().item(), part.max().item())
                             for n, part in zip(big_counts, big_cat.split(big_counts))]  # fmt: skip
    empty = coll.all_to_all_v([torch.empty(0, 4) for _ in range(world)])
    result["a2a_empty"] = [list(t.shape) for t in empty]
    big_rows = 1 << 15  # 512 KiB per peer: the zero-copy path
    big = coll.all_to_all_v([torch.full((big_rows, 4), float(rank * world + dst))
                             for dst in range(world)])  # fmt: skip
    result["a2a_big"] = [(t.shape[0], t.min().item(), t.max().item()) for t in big]
    held = [  # more results held than a peer has arenas: the rest travel as frames
        coll.all_to_all_v([torch.full((1 << 16,), float(100 * k + rank * world + dst))
                           for dst in range(world)])
        for k in range(6)
    ]  # fmt: skip
    result["held"] = [[(t.shape[0], t[0].item(), t[-1].item()) for t in recv] for recv in held]
    del held  # releases the arenas; the next ops ack them and the lane grows for 3 MiB
    grown = coll.all_to_all_v([torch.full((3 << 18,), float(rank + dst)) for dst in range(world)])
    result["grown"] = [(t.shape[0], t.min().item(), t.max().item()) for t in grown]
    for step in range(20):  # back-to-back ops: fast ranks run ahead of slow ones
        got = coll.all_to_all_v([torch.tensor([step, rank, dst]) for dst in range(world)])
        assert [t.tolist() for t in got] == [[step, src, rank] for src in range(world)]
    gathered = coll.all_gather(torch.arange(rank * 2, dtype=torch.int32).reshape(rank, 2))
    result["gather"] = [t.tolist() for t in gathered]
    ring_send = torch.full((rank + 1, 2), rank, dtype=torch.float16)
    result["ring"] = coll.ring_send_recv(ring_send).tolist()
    coll.barrier()
    del big, grown  # the last views into peers' arenas: acked at this rank's next ops
    result["arenas_acked"] = _arenas_acked(coll)
    if die_rank is not None:
        if rank == die_rank:
            time.sleep(0.5)  # let this rank's last sends reach the peers, then vanish
            os._exit(17)
        start = time.monotonic()
        try:
            coll.all_to_all_v([torch.ones(2, 3) for _ in range(world)])
            result["lost"] = None
        except WorkerLost as exc:
            result["lost"] = (exc.rank, str(exc), time.monotonic() - start)
    return result


def _arenas_acked(coll: Collective) -> bool:
    """Whether every arena this rank wrote has been acked, and the ack applied, after a few
    ops (acks wait in the inbox until an op drains it). True without a shared-memory lane."""
    for _ in range(5):  # the same number of barriers on every rank
        time.sleep(0.02)
        coll.barrier()
    lane = getattr(coll, "_shm", None)
    return lane is None or lane.num_busy == 0


def check_results(results: dict[int, Any], world: int, die_rank: int | None) -> None:
    for rank in range(world):
        if rank == die_rank:
            assert results[rank] == EXITED
            continue
        res = results[rank]
        for dtype in (torch.float32, torch.bfloat16, torch.int64):
            expected = [_a2a_payload(src, rank, dtype) for src in range(world)]
            assert res[f"a2a_{dtype}"] == [(str(dtype), t.tolist()) for t in expected]
        assert res["self_is_identity"]
        assert res["a2a_cat"] == [
            (torch.cat([_a2a_payload(src, rank, torch.float32) + k for src in range(world)])
             .tolist(), [_split_rows(src, rank) for src in range(world)])
            for k in range(3)
        ]  # fmt: skip
        assert res["a2a_cat_split"] == (
            torch.cat([2 * _a2a_payload(src, rank, torch.float32) for src in range(world)])
            .tolist(), [_split_rows(src, rank) for src in range(world)], True
        )  # fmt: skip
        assert res["a2a_cat_second"] == torch.cat(
            [3 * _a2a_payload(src, rank, torch.float32) for src in range(world)]).tolist()
        if "op_while_pending" in res:
            assert "1 all_to_all_cat_start(s) still pending" in res["op_while_pending"]
            third, out_of_order = res["third_and_out_of_order"]
            assert "2 all_to_all_cat_start(s) still pending" in third
            assert "waited for in the order started" in out_of_order
        expected_bf16 = [_a2a_payload(src, rank, torch.bfloat16) for src in range(world)]
        assert res["a2a_cat_bf16_strided"] == torch.cat(expected_bf16).float().tolist()
        if "a2a_cat_mismatch" in res:
            peer = 1 if rank == 0 else 0
            assert res["a2a_cat_mismatch"] == (
                f"all_to_all_v: rank {peer} sent {_dtype_of(peer)}[1, 3], rank {rank} sends "
                f"{_dtype_of(rank)}[1, 3]; dtype and trailing dims must match"
            )
        big_value = [float(src * world + rank) for src in range(world)]
        assert res["a2a_cat_big"] == [(1 << 15, v, v) for v in big_value]
        assert res["a2a_empty"] == [[0, 4]] * world
        assert res["a2a_big"] == [(1 << 15, float(src * world + rank), float(src * world + rank))
                                  for src in range(world)]  # fmt: skip
        assert res["held"] == [[(1 << 16, v, v) for v in (100.0 * k + src * world + rank
                                                          for src in range(world))]
                               for k in range(6)]  # fmt: skip
        assert res["grown"] == [(3 << 18, float(src + rank), float(src + rank))
                                for src in range(world)]  # fmt: skip
        assert res["gather"] == [list(torch.arange(src * 2).reshape(src, 2).tolist())
                                 for src in range(world)]  # fmt: skip
        prev = (rank - 1) % world
        assert res["ring"] == [[float(prev)] * 2] * (prev + 1)
        assert res["arenas_acked"]
        if die_rank is not None:
            lost_rank, message, elapsed_s = res["lost"]
            assert lost_rank == die_rank and f"rank {die_rank}" in message
            assert elapsed_s < TIMEOUT_S + 3


def exercise_clean(rank: int, coll: Collective) -> dict[str, Any]:
    return exercise(rank, coll, die_rank=None)


def exercise_last_dies(rank: int, coll: Collective) -> dict[str, Any]:
    return exercise(rank, coll, die_rank=coll.world_size - 1)


def exercise_first_dies(rank: int, coll: Collective) -> dict[str, Any]:
    return exercise(rank, coll, die_rank=0)


@pytest.mark.parametrize(
    "backend, world, fn, die_rank",
    [
        ("zmq", 2, exercise_clean, None),
        ("zmq-small-slots", 2, exercise_clean, None),
        ("zmq", 4, exercise_last_dies, 3),
        ("torch", 2, exercise_first_dies, 0),
        ("torch", 4, exercise_last_dies, 3),
    ],
    ids=["zmq-W2", "zmq-W2-small-slots", "zmq-W4-rank3-dies", "torch-W2-rank0-dies",
         "torch-W4-rank3-dies"],
)
def test_collectives_on_real_processes(backend: str, world: int, fn, die_rank: int | None) -> None:
    options = backend_options(backend)
    backend = backend.split("-")[0]
    results = spawn_collective_group(world, backend, fn, **options)
    check_results(results, world, die_rank)
    if backend == "zmq":
        socket_dir = options["socket_dir"]
        mesh_id = ipc_endpoints(socket_dir, world)[0]
        assert glob.glob(arena_prefix("/dev/shm", mesh_id) + "*") == [], "leaked arenas"
        if die_rank is None:
            assert not os.path.exists(socket_dir), "close() must remove socket files and the dir"
        else:  # survivors removed theirs; the crashed rank's file is the launcher's to clean
            assert os.listdir(socket_dir) == [f"rank{die_rank}.sock"]
            os.unlink(os.path.join(socket_dir, f"rank{die_rank}.sock"))
            os.rmdir(socket_dir)
