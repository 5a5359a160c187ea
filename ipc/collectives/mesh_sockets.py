"""The ZeroMQ mesh's sockets: where they live, how they open, the rule for binding them.

ipc:// endpoints sit in a private directory (mode 0700) on one host; tcp:// endpoints come from a
list of ``host:port`` per rank. NOTE (DESIGN.md §6): binding any address other than loopback or
ipc:// requires CurveZMQ keys.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import tempfile
from dataclasses import dataclass

import zmq

# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL
_MAX_IPC_PATH = 107


@dataclass(frozen=True)
class CurveKeys:
    """CurveZMQ keys (z85 bytes, from `zmq.curve_keypair()`) for an encrypted mesh.

    `peer_public_keys[r]` is rank r's public key; None means every rank shares this key pair.
    Only the listed public keys may connect to this rank.
    """

    public_key: bytes
    secret_key: bytes
    peer_public_keys: tuple[bytes, ...] | None = None

    def peer_key(self, rank: int) -> bytes:
        """The public key of `rank`."""
        return self.public_key if self.peer_public_keys is None else self.peer_public_keys[rank]


def make_socket_dir() -> str:
    """Create a private (0700) directory for a mesh's ipc:// sockets; pass it to every rank."""
    return tempfile.mkdtemp(prefix="titanserve-mesh-")


def mesh_endpoints(
    world_size: int, socket_dir: str | None, addresses: list[str] | None
) -> list[str]:
    """tcp:// endpoints if `addresses` (host:port per rank) are given, else ipc:// ones."""
    if addresses is not None:
        if len(addresses) != world_size:
            raise ValueError(f"{len(addresses)} mesh addresses for world_size {world_size}")
        return tcp_endpoints(addresses)
    if socket_dir is None:
        raise ValueError("pass socket_dir (from make_socket_dir()) or addresses (host:port)")
    return ipc_endpoints(socket_dir, world_size)


def ipc_endpoints(socket_dir: str, world_size: int) -> list[str]:
    """One ipc:// endpoint per rank inside `socket_dir`."""
    paths = [os.path.join(socket_dir, f"rank{r}.sock") for r in range(world_size)]
    if any(len(path.encode()) > _MAX_IPC_PATH for path in paths):
        raise ValueError(
            f"socket_dir {socket_dir!r} is too long for ipc:// sockets; use a shorter directory"
        )
    return [f"ipc://{path}" for path in paths]


def tcp_endpoints(addresses: list[str]) -> list[str]:
    """tcp:// endpoints from ``host:port`` strings (``[v6addr]:port`` for IPv6)."""
    endpoints = []
    for address in addresses:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"mesh address {address!r} is not host:port")
        endpoints.append(f"tcp://{host}:{port}")
    return endpoints


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for ipc:// endpoints and tcp:// endpoints on a loopback address."""
    if endpoint.startswith("ipc://"):
        return True
    host = endpoint.removeprefix("tcp://").rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name or an interface name: treat as exposed
        return False


def check_bind_allowed(endpoint: str, curve_keys: CurveKeys | None) -> None:
    """Refuse to bind a non-loopback endpoint without CurveZMQ keys."""
    if curve_keys is None and not is_loopback_endpoint(endpoint):
        raise ValueError(
            f"refusing to bind {endpoint} without CurveZMQ keys: pass curve_keys "
            "(see `titanserve keygen`) or use a loopback address"
        )


def remove_socket_file(endpoint: str) -> None:
    """Delete an ipc:// endpoint's file if it is still there."""
    if endpoint.startswith("ipc://"):
        try:
            os.unlink(endpoint.removeprefix("ipc://"))
        except FileNotFoundError:
            pass


def remove_dir_if_empty(path: str) -> None:
    """Remove `path` if it is an empty directory (the last rank to close removes it)."""
    try:
        os.rmdir(path)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
            raise


class MeshSockets:
    """One rank's sockets: a bound PULL inbox and a connected PUSH outbox per peer.

    Every receive and send gives up after `timeout_s` (zmq.Again). `copy_threshold`: smaller
    zero-copy sends are copied instead (pyzmq's bookkeeping costs more than the copy).
    """

    def __init__(
        self, endpoints: list[str], rank: int, *, curve_keys: CurveKeys | None, timeout_s: float,
        max_message_size_bytes: int, copy_threshold: int, io_threads: int,
    ) -> None:  # fmt: skip
        check_bind_allowed(endpoints[rank], curve_keys)
        self.ctx = zmq.Context(io_threads)
        self.auth = None
        self.outboxes: dict[int, zmq.Socket] = {}
        timeout_ms = max(1, int(timeout_s * 1000))
        self.ctx.setsockopt(zmq.LINGER, min(timeout_ms, 2000))  # flush the last op, bounded
        self.ctx.setsockopt(zmq.MAXMSGSIZE, max_message_size_bytes)
        self.ctx.setsockopt(zmq.RCVTIMEO, timeout_ms)
        self.ctx.setsockopt(zmq.SNDTIMEO, timeout_ms)
        self.ctx.setsockopt(zmq.RECONNECT_IVL, 20)
        self.ctx.setsockopt(zmq.IPV6, 1)
        self.inbox = self.ctx.socket(zmq.PULL)
        try:
            if curve_keys is not None:
                self.auth = start_authenticator(self.ctx, curve_keys, len(endpoints))
                self.inbox.curve_server = True
                self.inbox.curve_secretkey = curve_keys.secret_key
            self.inbox.bind(endpoints[rank])
            for peer in range(len(endpoints)):
                if peer == rank:
                    continue
                outbox = self.ctx.socket(zmq.PUSH, copy_threshold=copy_threshold)
                self.outboxes[peer] = outbox
                if curve_keys is not None:
                    outbox.curve_publickey = curve_keys.public_key
                    outbox.curve_secretkey = curve_keys.secret_key
                    outbox.curve_serverkey = curve_keys.peer_key(peer)
                outbox.connect(endpoints[peer])  # NOTE: queues sends until the peer binds
        except BaseException:
            self.close(linger_ms=0)
            raise

    def close(self, linger_ms: int | None) -> None:
        """Close every socket (waiting up to `linger_ms` to flush; None: the default)."""
        for outbox in self.outboxes.values():
            outbox.close(linger=linger_ms)
        self.inbox.close(linger=linger_ms)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()


def start_authenticator(ctx: zmq.Context, curve_keys: CurveKeys, world_size: int):
    """Start a ZAP handler on `ctx` that admits only the mesh's own public keys."""
    from zmq.auth.thread import ThreadAuthenticator

    allowed = {curve_keys.peer_key(r) for r in range(world_size)}
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback("*", credentials_provider=_KeyAllowList(allowed))
    return auth


class _KeyAllowList:
    """ZAP credentials callback: admit only the listed public keys."""

    def __init__(self, allowed: set[bytes]) -> None:
        self._allowed = allowed

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self._allowed
