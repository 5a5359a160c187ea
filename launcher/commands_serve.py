"""`titanserve serve MODEL`: the scheduler process, serving the ZeroMQ client protocol."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from titanserve.ipc.collectives.mesh_sockets import is_loopback_endpoint
from titanserve.launcher.cli import UsageError
from titanserve.launcher.commands_run import open_engine


def needs_keys(address: str) -> bool:
    """Whether binding `address` exposes the server beyond this machine (the mesh's rule)."""
    if address.startswith("inproc://"):
        return False
    if not address.startswith(("tcp://", "ipc://")):
        raise UsageError(f"address {address!r}: use tcp://HOST:PORT or ipc://PATH")
    return not is_loopback_endpoint(address)


def serve(args: argparse.Namespace) -> int:
    """Load the model, bind, serve until SIGINT/SIGTERM, then shut everything down."""
    keys = None
    if args.keys is not None:
        from titanserve.launcher.keys import read_keypair

        try:
            keys = read_keypair(args.keys, args.key_name)
        except FileNotFoundError as e:
            raise UsageError(
                f"no key pair: {e.filename} (run `titanserve keygen --out DIR`)"
            ) from None
    elif needs_keys(args.address):
        raise UsageError(
            f"{args.address} is reachable from other machines: create keys with "
            "`titanserve keygen --out DIR` and pass --keys DIR (clients need server.public)"
        )
    if args.worker_processes is False:
        raise UsageError("serve always runs its workers in processes of their own: "
                         "drop --no-worker-processes")
    from titanserve.core.server import Server

    llm = open_engine(args, worker_processes=True)  # the scheduler never holds the model
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server = Server(llm.engine, args.address, curve_keys=keys, max_waiting=args.max_waiting)
        try:
            workers = llm.engine.config.num_workers
            print(
                f"titanserve: serving {args.model} on {server.address} "
                f"({workers} worker{'s' * (workers > 1)}{', CurveZMQ' if keys else ''})",
                file=sys.stderr,
                flush=True,
            )
            server.serve_forever(stop)
        finally:
            server.close()
    finally:
        llm.shutdown()
    print("titanserve: server stopped", file=sys.stderr)
    return 0
