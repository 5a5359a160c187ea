"""All-to-all latency: titanserve's ZeroMQ mesh vs gloo's all_to_all_single, same sizes, same run.

    python benchmarks/collectives.py [--sizes-kib 4 64 1024 4096 16384] [--worlds 2 4] [--cold]

Each world size starts W processes that hold a ZeroMQ mesh (ipc://, with its shared-memory
slots for messages up to 1 MiB), a second mesh without the slots, and a gloo process group, and
time them in alternation at every size: each rank sends `size` bytes to every peer per op (gloo
into a preallocated output; the meshes return new tensors). Prints µs per op (slowest rank,
best of 3 rounds), the ratio gloo/zmq, and what the slots gain (no slots / slots).

`--cold` times ops as a model step meets them instead: before each op every rank streams
COLD_FLUSH_BYTES through its caches (as a step's weights and KV cache do), and the last rank
arrives LATE_S after the others. Prints the median time of the last rank's call, i.e. what an
op costs once everyone is there, with code and data evicted (the tiny Mixtral's decode step
runs 8).
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from spawn_ranks import run_ranks

from titanserve.ipc.collectives.mesh_sockets import make_socket_dir
from titanserve.ipc.collectives.zmq_mesh import ZmqMeshCollective

MIN_ITERS, MAX_ITERS, TARGET_S, ROUNDS = 5, 400, 0.15, 3
COLD_FLUSH_BYTES, COLD_ITERS, LATE_S = 48 << 20, 200, 500e-6


def iterations(op) -> int:
    """Iterations for about TARGET_S per round; every rank takes rank 0's count."""
    for _ in range(3):  # warm up: connections, arenas, allocator
        op()
    dist.barrier()
    start = time.perf_counter()
    op()
    once = max(time.perf_counter() - start, 1e-6)
    count = torch.tensor([int(min(MAX_ITERS, max(MIN_ITERS, TARGET_S / once)))])
    dist.broadcast(count, 0)
    return int(count.item())


def time_op(op, iters: int) -> float:
    """Seconds per call of op(), run `iters` times in lockstep with the peers."""
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        op()
    return (time.perf_counter() - start) / iters


def time_cold(op, iters: int, late: bool) -> float:
    """Median seconds of op() with the caches flushed before each call; `late`: this rank
    arrives LATE_S after the others, so that its call measures the op, not the wait."""
    flush = torch.zeros(COLD_FLUSH_BYTES // 4)
    times = []
    dist.barrier()
    for _ in range(iters):
        flush.add_(1.0)
        if late:
            until = time.perf_counter() + LATE_S
            while time.perf_counter() < until:
                pass
        start = time.perf_counter()
        op()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def bench_size(
    meshes: list[ZmqMeshCollective], world: int, size: int, cold: bool = False
) -> tuple[float, float, float]:
    """(zmq, zmq without slots, gloo) seconds per all-to-all of `size` bytes to every peer,
    checked equal.

    They alternate for ROUNDS rounds and each keeps its best round: on a shared machine,
    other processes only ever add time. With `cold`, each is timed by `time_cold` instead.
    """
    send = torch.randn(world, size // 4)  # (W, n): row i goes to rank i
    recv = torch.empty_like(send)
    send_list = list(send.unbind(0))
    ops = [lambda mesh=mesh: mesh.all_to_all_v(send_list) for mesh in meshes]
    ops.append(lambda: dist.all_to_all_single(recv, send))
    if cold:  # every rank joins every op; only the last to arrive times the op itself
        late = dist.get_rank() == world - 1
        best = [time_cold(op, COLD_ITERS, late) for op in ops]
        best = best if late else [0.0] * len(ops)
    else:
        iters = [iterations(op) for op in ops]
        best = [float("inf")] * len(ops)
        for _ in range(ROUNDS):
            best = [min(b, time_op(op, n)) for b, op, n in zip(best, ops, iters)]
    dist.all_to_all_single(recv, send)
    for mesh in meshes:
        check = mesh.all_to_all_v(send_list)
        assert all(torch.equal(check[j], recv[j]) for j in range(world))
    return tuple(best)


def run_rank(
    rank: int, world: int, socket_dirs: list[str], port: int, sizes: list[int], cold: bool, out
) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))  # fmt: skip
    meshes = [
        ZmqMeshCollective(rank, world, socket_dir=socket_dirs[0], timeout_s=60),
        ZmqMeshCollective(rank, world, socket_dir=socket_dirs[1], timeout_s=60, shm_slot_bytes=0),
    ]
    rows = [(size, *bench_size(meshes, world, size, cold)) for size in sizes]
    for mesh in meshes:
        mesh.close()
    dist.destroy_process_group()
    out.put((rank, rows))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_world(
    world: int, sizes: list[int], cold: bool = False
) -> list[tuple[int, float, float, float]]:
    """Per size: (size, zmq, zmq without slots, gloo seconds), each the slowest rank's (with
    `cold`, the last rank's: the others report 0)."""
    per_rank = run_ranks(run_rank, world, world, [make_socket_dir(), make_socket_dir()],
                         free_port(), sizes, cold)  # fmt: skip
    return [
        (size, *(max(per_rank[r][i][k] for r in range(world)) for k in (1, 2, 3)))
        for i, size in enumerate(sizes)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-kib", type=int, nargs="+", default=[4, 64, 1024, 4096, 16384])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--cold", action="store_true",
                        help="flush the caches before each op and time the last rank to arrive")
    args = parser.parse_args()
    sizes = [kib * 1024 for kib in args.sizes_kib]
    timing = "cold, last rank's call, median" if args.cold else "slowest rank"
    print(f"all-to-all, bytes per peer; {os.cpu_count()} CPU cores; µs per op, {timing}")
    print(f"{'W':>2} {'per peer':>9} {'zmq µs':>9} {'no slots':>9} {'gloo µs':>9} "
          f"{'gloo/zmq':>9} {'slots gain':>10}")  # fmt: skip
    for world in args.worlds:
        for size, zmq_s, plain_s, gloo_s in bench_world(world, sizes, args.cold):
            label = f"{size // 1024} KiB" if size < 1 << 20 else f"{size >> 20} MiB"
            print(f"{world:>2} {label:>9} {zmq_s * 1e6:>9.0f} {plain_s * 1e6:>9.0f} "
                  f"{gloo_s * 1e6:>9.0f} {gloo_s / zmq_s:>8.2f}x {plain_s / zmq_s:>9.2f}x",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
