"""The share of a lockstep step that the host alone costs: the floor under throughput.py's
"outside compute" with experts across workers.

    python benchmarks/lockstep_floor.py [--workers 2] [--meetings 60] [--segment-ms 4]
                                        [--steps 40] [--repeat 2]

W processes, each on its own cores as engine workers are, run identical compute segments (bf16
matmuls over a pool of weights larger than the caches, as a model step streams its weights) and
meet after each one at a barrier of the ZeroMQ mesh (shared-memory slots), `--meetings` times a
step: what workers do at each MoE all-to-all (the demo's 30-layer SmolLM2 MoE meets 60 times a
step), with nothing to route and nothing uneven. Whatever the slowest process spends outside its
segments is then host noise (preemption, interrupts, shared caches and memory bandwidth, a VM's
scheduling) plus the barriers' own work. Prints, per round, that share of step time in two
parts: waiting for the others, and the barriers' work; then, where Linux says, the largest
share of a process's run spent ready while something else had its core (run-queue wait); and
how much less the fastest process computed than the slowest, steps summed (compute apart: on
identical work, what the host alone sets apart, e.g. a core slowed down for a few steps).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from run_queue import run_queue_wait_s, run_queue_wait_since
from spawn_ranks import run_ranks

from titanserve.core.cpu_cores import allowed_cores, bind_to, threads_per_worker, worker_core_sets
from titanserve.core.cpu_malloc import with_huge_pages
from titanserve.core.engine import compute_apart
from titanserve.ipc.collectives.mesh_sockets import make_socket_dir
from titanserve.ipc.collectives.zmq_mesh import ZmqMeshCollective

WEIGHT_SHAPE = (1536, 576)  # one SmolLM2-MoE expert projection: 1.7 MB in bf16
POOL_BYTES = 128 << 20  # weights cycled through: more than the last-level cache
ROWS = 13  # activation rows per matmul: a decode batch of 32 spread over 8 experts, top-2


def run_rank(rank: int, world: int, socket_dir: str, args: argparse.Namespace, out) -> None:
    threads, cores = threads_per_worker(None, world), allowed_cores()
    if cores:  # as the engine places its workers
        bind_to(worker_core_sets(cores, world, threads)[rank])
    torch.set_num_threads(threads)
    mesh = ZmqMeshCollective(rank, world, socket_dir=socket_dir, timeout_s=120)
    num_weights = max(1, POOL_BYTES // (2 * WEIGHT_SHAPE[0] * WEIGHT_SHAPE[1]))
    pool = list(torch.randn(num_weights, *WEIGHT_SHAPE).bfloat16())  # one block, as in a model
    x = torch.randn(ROWS, WEIGHT_SHAPE[1]).bfloat16()
    used = 0

    def segment(n: int) -> None:
        nonlocal used
        for _ in range(n):
            torch.nn.functional.linear(x, pool[used % len(pool)])
            used += 1

    segment(len(pool))  # warm up, then calibrate: every rank takes rank 0's matmul count
    start = time.perf_counter()
    segment(len(pool))
    per_matmul = (time.perf_counter() - start) / len(pool)
    count = torch.tensor([max(1, round(args.segment_ms / 1e3 / per_matmul))])
    n = int(mesh.all_gather(count)[0].item())
    steps = []  # (wall, compute, waited, run-queue wait or None) per step
    for _ in range(args.steps):
        mesh.barrier()
        queued = run_queue_wait_s(os.getpid())  # read outside the timed step
        waited, compute, start = mesh.peer_wait_s, 0.0, time.perf_counter()
        for _ in range(args.meetings):
            t0 = time.perf_counter()
            segment(n)
            compute += time.perf_counter() - t0
            mesh.barrier()
        wall = time.perf_counter() - start
        steps.append((wall, compute, mesh.peer_wait_s - waited,
                      run_queue_wait_since(os.getpid(), queued)))
    mesh.close()
    out.put((rank, steps))


def run_round(world: int, args: argparse.Namespace) -> dict[str, float]:
    """One round: step time, the slowest process's shares (outside compute, waiting), the
    largest share any process sat ready to run while something else had its core (None
    where the OS does not say), and how much less the fastest process computed than the
    slowest (identical work: the host alone sets them apart)."""
    per_rank = run_ranks(run_rank, world, world, make_socket_dir(), args,
                         env=with_huge_pages(os.environ))  # as the engine's workers
    wall = compute = waited = fastest = 0.0
    for step in zip(*per_rank.values()):  # the slowest process's compute counts, as in Engine
        slowest = max(step, key=lambda s: s[1])
        wall += max(s[0] for s in step)
        compute += slowest[1]
        waited += slowest[2]
        fastest += min(s[1] for s in step)
    outside = max(0.0, 1 - compute / wall)
    queued = [[s[3] for s in steps] for steps in per_rank.values()]
    run_queue = None if any(None in q for q in queued) else max(map(sum, queued)) / wall
    return {"step_ms": 1e3 * wall / args.steps, "outside": outside, "wait": waited / wall,
            "run_queue": run_queue, "apart": compute_apart(compute, fastest)}


def run_queue_text(share: float | None) -> str:
    return "" if share is None else f", run-queue wait {100 * share:.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--meetings", type=int, default=60, help="barriers a step")
    parser.add_argument("--segment-ms", type=float, default=4.0, help="compute between two")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    for name in ("workers", "meetings", "steps", "repeat"):
        if getattr(args, name) < 1 or (name == "workers" and args.workers < 2):
            parser.error(f"--{name} must be at least {2 if name == 'workers' else 1}")
    if args.segment_ms <= 0:
        parser.error("--segment-ms must be positive")
    print(f"lockstep floor: {args.workers} processes, {args.meetings} barriers a step, "
          f"{args.segment_ms:g} ms of bf16 matmuls between two, {args.steps} steps; "
          f"{os.cpu_count()} CPU cores")  # fmt: skip
    for i in range(args.repeat):
        r = run_round(args.workers, args)
        print(f"round {i + 1}: step {r['step_ms']:.0f} ms, outside compute "
              f"{100 * r['outside']:.1f}% (waiting {100 * r['wait']:.1f}%, barrier work "
              f"{100 * max(0.0, r['outside'] - r['wait']):.1f}%)"
              + run_queue_text(r["run_queue"]) + f", compute apart {100 * r['apart']:.1f}%",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
