"""ZeroMQ mesh specifics, with ranks as threads of this process (real sockets, no spawn cost)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import zmq

from titanserve.ipc.collectives import create_collective
from titanserve.ipc.collectives.mesh_sockets import CurveKeys, make_socket_dir
from titanserve.ipc.collectives.zmq_mesh import ZmqMeshCollective
from titanserve.ipc.errors import WorkerLost


def run_ranks(world: int, make: Callable[[int], Any], body: Callable[[int, Any], Any]) -> list:
    """Run body(rank, make(rank)) on one thread per rank; return results or exceptions by rank."""
    results: list[Any] = [None] * world

    def run(rank: int) -> None:
        try:
            with make(rank) as coll:
                results[rank] = body(rank, coll)
        except Exception as exc:  # handed to the test, which asserts on it
            results[rank] = exc

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive()
    return results


def ring_and_gather(rank: int, coll: ZmqMeshCollective) -> tuple[list, list, list]:
    ring = coll.ring_send_recv(torch.tensor([rank, rank]))
    gathered = coll.all_gather(torch.full((rank,), rank))
    big = coll.all_to_all_v([torch.full((1 << 19,), 10 * rank + dst) for dst in range(3)])
    return ring.tolist(), [t.tolist() for t in gathered], [t.unique().tolist() for t in big]


def test_tcp_mesh_with_curve_keys() -> None:
    public, secret = zmq.curve_keypair()
    port = _free_ports(3)
    addresses = [f"127.0.0.1:{p}" for p in port]
    keys = CurveKeys(public, secret)
    results = run_ranks(
        3,
        lambda r: ZmqMeshCollective(r, 3, addresses=addresses, curve_keys=keys, timeout_s=5),
        ring_and_gather,
    )
    for rank, (ring, gathered, big) in enumerate(results):  # big: 4 MiB zero-copy frames
        assert ring == [(rank - 1) % 3] * 2
        assert gathered == [[], [1], [2, 2]]
        assert big == [[10 * src + rank] for src in range(3)]


def test_peer_with_unknown_curve_key_is_refused() -> None:
    (pub0, sec0), (pub1, _), (intruder_pub, intruder_sec) = (zmq.curve_keypair() for _ in range(3))
    addresses = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    keys = [
        CurveKeys(pub0, sec0, (pub0, pub1)),
        CurveKeys(intruder_pub, intruder_sec, (pub0, pub1)),  # claims rank 1 with its own key
    ]
    results = run_ranks(
        2,
        lambda r: ZmqMeshCollective(
            r, 2, addresses=addresses, curve_keys=keys[r], connect_timeout_s=1.0
        ),
        lambda rank, coll: None,
    )
    assert isinstance(results[0], WorkerLost) and results[0].rank == 1
    assert isinstance(results[1], WorkerLost) and results[1].rank == 0


@pytest.mark.parametrize("address", ["10.1.2.3:5555", "0.0.0.0:5555", "node7:5555"])
def test_non_loopback_bind_without_keys_is_refused(address: str) -> None:
    with pytest.raises(ValueError, match="CurveZMQ"):
        ZmqMeshCollective(0, 2, addresses=[address, "127.0.0.1:5556"])


def test_late_starter_loses_no_message() -> None:
    socket_dir = make_socket_dir()

    def make(rank: int) -> ZmqMeshCollective:
        time.sleep(0.5 * rank)  # rank 0 sends its first op before rank 1 has even bound
        return ZmqMeshCollective(rank, 2, socket_dir=socket_dir, timeout_s=5)

    results = run_ranks(2, make, lambda rank, c: [t.tolist() for t in c.all_to_all_v(
        [torch.tensor([rank * 10 + dst]) for dst in range(2)])])  # fmt: skip
    assert results == [[[0], [10]], [[1], [11]]]
    assert not os.path.exists(socket_dir)


def test_missing_peer_fails_the_handshake_and_cleans_up() -> None:
    socket_dir = make_socket_dir()
    start = time.monotonic()
    with pytest.raises(WorkerLost, match=r"rank 1 lost: ranks \[1, 2\] did not join"):
        ZmqMeshCollective(0, 3, socket_dir=socket_dir, connect_timeout_s=0.5)
    assert time.monotonic() - start < 2
    assert not os.path.exists(socket_dir)


def test_mismatched_collectives_are_detected() -> None:
    socket_dir = make_socket_dir()
    results = run_ranks(
        2,
        lambda r: ZmqMeshCollective(r, 2, socket_dir=socket_dir, timeout_s=1),
        lambda rank, c: c.all_gather(torch.ones(1)) if rank == 0 else c.barrier(),
    )
    for exc in results:
        assert isinstance(exc, AssertionError) and "same order" in str(exc)


def test_world_of_one_needs_no_sockets() -> None:
    with create_collective("zmq", 0, 1) as coll:
        tensor = torch.arange(3)
        assert coll.all_to_all_v([tensor])[0] is tensor
        assert coll.all_gather(tensor)[0] is tensor
        assert coll.ring_send_recv(tensor) is tensor
        coll.barrier()


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown collective backend 'mpi'"):
        create_collective("mpi", 0, 2)


def _free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.mark.parametrize("slot_bytes", [1 << 20, 0], ids=["slots", "zeromq"])
def test_peer_wait_is_the_time_spent_waiting_for_a_late_peer(slot_bytes: int) -> None:
    """Rank 1 comes 0.3 s late to an all-to-all: rank 0 counts that wait, rank 1 (whose
    message from rank 0 is already there) nearly nothing."""
    socket_dir = make_socket_dir()

    def late_rank_1(rank: int, coll: ZmqMeshCollective) -> float:
        coll.barrier()
        before = coll.peer_wait_s
        if rank == 1:
            time.sleep(0.3)
        out, counts = coll.all_to_all_cat([torch.full((2, 3), float(rank))] * 2)
        assert counts == [2, 2] and out[:2].eq(0).all() and out[2:].eq(1).all()
        return coll.peer_wait_s - before

    waits = run_ranks(2, lambda r: ZmqMeshCollective(
        r, 2, socket_dir=socket_dir, timeout_s=5, shm_slot_bytes=slot_bytes), late_rank_1)
    assert waits[0] >= 0.25, waits
    assert waits[1] < 0.1, waits


def _slots_and_a2a(rank: int, coll: ZmqMeshCollective) -> tuple[bool, list]:
    got = coll.all_to_all_v([torch.tensor([rank * 10 + dst]) for dst in range(2)])
    return coll._slots is not None, [t.tolist() for t in got]


def test_shared_memory_slots_are_used_only_when_every_rank_has_them(monkeypatch) -> None:
    """Rank 1 without slots (its option, or no room in the tmpfs): the hello tells rank 0,
    and both do without; with slots on both, both use them."""
    from titanserve.ipc.collectives import zmq_mesh

    expected = [[[0], [10]], [[1], [11]]]
    socket_dir = make_socket_dir()
    results = run_ranks(2, lambda r: ZmqMeshCollective(
        r, 2, socket_dir=socket_dir, timeout_s=5, shm_slot_bytes=0 if r else 1 << 20),
        _slots_and_a2a)  # fmt: skip
    assert results == [(False, expected[0]), (False, expected[1])]

    real = zmq_mesh.ShmSlots

    def no_room_for_rank_1(prefix, rank, *args):
        if rank == 1:
            raise OSError(28, "No space left on device")
        return real(prefix, rank, *args)

    monkeypatch.setattr(zmq_mesh, "ShmSlots", no_room_for_rank_1)
    socket_dir = make_socket_dir()
    results = run_ranks(2, lambda r: ZmqMeshCollective(r, 2, socket_dir=socket_dir, timeout_s=5),
                        _slots_and_a2a)  # fmt: skip
    assert results == [(False, expected[0]), (False, expected[1])]

    monkeypatch.undo()
    socket_dir = make_socket_dir()
    results = run_ranks(2, lambda r: ZmqMeshCollective(r, 2, socket_dir=socket_dir, timeout_s=5),
                        _slots_and_a2a)  # fmt: skip
    assert results == [(True, expected[0]), (True, expected[1])]
    assert not os.path.exists(socket_dir)
