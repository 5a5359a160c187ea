"""Receiving from a ZeroMQ socket without ever blocking past a poll."""

from __future__ import annotations

import zmq


def recv_ready(sock: zmq.Socket, timeout_ms: int, copy: bool = True) -> list | None:
    """The frames of the next message if one arrives within `timeout_ms`, else None.

    NOTE: poll can report a socket readable that has no message after all (a ROUTER whose
    peer's pipe closed, e.g. after a failed CurveZMQ handshake), so recv never blocks here:
    None also means "look again", and callers recheck their deadlines and peers.
    """
    if not sock.poll(timeout_ms):
        return None
    try:
        return sock.recv_multipart(zmq.NOBLOCK, copy=copy)
    except zmq.Again:
        return None
