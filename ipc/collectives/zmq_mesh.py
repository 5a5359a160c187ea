"""ZeroMQ mesh collective: each rank binds one PULL socket and connects a PUSH to every peer.

A message is two frames: a head (op sequence number, source rank, op code, tensor header) and
the tensor's raw bytes, sent with copy=False and received as a zero-copy `torch.frombuffer` view.
Sends to every peer are queued before any receive, so ZeroMQ's IO thread moves all of them at
once. NOTE: per peer, ZeroMQ delivers in order; a message for a later op (a fast peer) is kept
until that op runs, a message for an earlier op is a protocol bug (assert).
"""

from __future__ import annotations

import struct
import time

import torch
import zmq

from titanserve.ipc.collectives import Collective
from titanserve.ipc.collectives import mesh_endpoints as ep
from titanserve.ipc.errors import WorkerLost
from titanserve.ipc.tensor_frames import decode_header, encode_tensor, tensor_from_buffer

_PREFIX = struct.Struct("<QHB")  # op sequence number, source rank, op code
_HELLO, _ALL_TO_ALL, _ALL_GATHER, _RING, _BARRIER = range(5)
_OP_NAMES = ("hello", "all_to_all_v", "all_gather", "ring_send_recv", "barrier")
_WORLD = struct.Struct("<I")

Frames = list[zmq.Frame]


class ZmqMeshCollective(Collective):
    """Collectives over a ZeroMQ mesh (the default backend).

    Give `socket_dir` (from `make_socket_dir()`, shared by all ranks on one host) for ipc://
    sockets, or `addresses` (``host:port`` per rank) for tcp://. Each receive waits at most
    `timeout_s` before raising `WorkerLost`; the start-up handshake waits `connect_timeout_s`
    for every peer. `curve_keys` encrypts and authenticates the mesh; it is required to bind a
    non-loopback address. close() removes this rank's socket file, and the directory once empty.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        *,
        socket_dir: str | None = None,
        addresses: list[str] | None = None,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 60.0,
        curve_keys: ep.CurveKeys | None = None,
        max_message_size_bytes: int = 1 << 34,
        io_threads: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.rank, self.world_size = rank, world_size
        self.timeout_s = timeout_s
        self._seq = 0
        self._stash: dict[tuple[int, int], Frames] = {}
        self._ctx: zmq.Context | None = None
        self._inbox: zmq.Socket | None = None
        self._outboxes: list[zmq.Socket | None] = [None] * world_size
        self._auth = None
        self._broken = False  # after WorkerLost, close() drops unsent messages at once
        self._socket_dir = socket_dir if addresses is None else None
        self._endpoints: list[str] = []
        if world_size == 1:
            return
        if addresses is not None:
            if len(addresses) != world_size:
                raise ValueError(f"{len(addresses)} mesh addresses for world_size {world_size}")
            self._endpoints = ep.tcp_endpoints(addresses)
        elif socket_dir is not None:
            self._endpoints = ep.ipc_endpoints(socket_dir, world_size)
        else:
            raise ValueError("pass socket_dir (from make_socket_dir()) or addresses (host:port)")
        ep.check_bind_allowed(self._endpoints[rank], curve_keys)
        try:
            self._open(curve_keys, max_message_size_bytes, io_threads)
            self._handshake(connect_timeout_s)
        except BaseException:
            self.close()
            raise

    def _open(self, curve_keys: ep.CurveKeys | None, max_size: int, io_threads: int) -> None:
        self._ctx = ctx = zmq.Context(io_threads)
        timeout_ms = max(1, int(self.timeout_s * 1000))
        for option, value in (
            (zmq.LINGER, min(timeout_ms, 2000)),  # flush the last op's sends, bounded if peers died
            (zmq.MAXMSGSIZE, max_size),
            (zmq.RCVTIMEO, timeout_ms),
            (zmq.SNDTIMEO, timeout_ms),
            (zmq.RECONNECT_IVL, 20),
            (zmq.IPV6, 1),
        ):
            ctx.setsockopt(option, value)
        if curve_keys is not None:
            self._auth = ep.start_authenticator(ctx, curve_keys, self.world_size)
        self._inbox = ctx.socket(zmq.PULL)
        if curve_keys is not None:
            self._inbox.curve_server = True
            self._inbox.curve_secretkey = curve_keys.secret_key
        self._inbox.bind(self._endpoints[self.rank])
        for peer in self._peers():
            outbox = ctx.socket(zmq.PUSH)
            if curve_keys is not None:
                outbox.curve_publickey = curve_keys.public_key
                outbox.curve_secretkey = curve_keys.secret_key
                outbox.curve_serverkey = curve_keys.peer_key(peer)
            outbox.connect(self._endpoints[peer])  # NOTE: queues sends until the peer binds
            self._outboxes[peer] = outbox

    def _peers(self) -> list[int]:
        """Other ranks, starting after this one so that ranks do not all hit rank 0 first."""
        return [(self.rank + i) % self.world_size for i in range(1, self.world_size)]

    def _handshake(self, connect_timeout_s: float) -> None:
        """Exchange hellos with every peer so that a missing peer fails here, not in op 1."""
        seq = self._next_seq()
        hello = _PREFIX.pack(seq, self.rank, _HELLO) + _WORLD.pack(self.world_size)
        for peer in self._peers():
            self._outboxes[peer].send(hello)
        deadline = time.monotonic() + connect_timeout_s
        waiting = set(self._peers())
        try:
            while waiting:
                remaining_ms = int((deadline - time.monotonic()) * 1000)
                if remaining_ms <= 0:
                    self._broken = True
                    missing = sorted(waiting)
                    raise WorkerLost(
                        missing[0], f"ranks {missing} did not join within {connect_timeout_s}s"
                    )
                self._inbox.rcvtimeo = remaining_ms
                try:
                    frames = self._recv_one(seq, _HELLO, waiting)
                except zmq.Again:
                    continue
                if frames is not None:
                    src = _PREFIX.unpack_from(frames[0].buffer)[1]
                    (peer_world,) = _WORLD.unpack_from(frames[0].buffer, _PREFIX.size)
                    if peer_world != self.world_size:
                        raise ValueError(f"rank {src} has world_size {peer_world}")
                    waiting.discard(src)
        finally:
            self._inbox.rcvtimeo = max(1, int(self.timeout_s * 1000))

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq += 1
        return seq

    def _recv_one(self, seq: int, op: int, waiting: set[int]) -> Frames | None:
        """Receive one message: its frames if it is op `seq`'s, else None (kept for later).

        Raises zmq.Again when nothing arrives within the receive timeout.
        """
        frames = self._inbox.recv_multipart(copy=False)
        head = frames[0].buffer
        if len(head) < _PREFIX.size:
            raise ValueError(f"malformed mesh message ({len(head)} byte head)")
        msg_seq, src, msg_op = _PREFIX.unpack_from(head)
        if msg_seq != seq:
            assert msg_seq > seq, f"rank {src} sent op #{msg_seq} after this rank finished it"
            assert (msg_seq, src) not in self._stash, f"rank {src} sent op #{msg_seq} twice"
            self._stash[(msg_seq, src)] = frames
            return None
        self._check_op(seq, op, src, msg_op)
        assert src in waiting, f"rank {src} sent op #{seq} twice"
        return frames

    def _check_op(self, seq: int, op: int, src: int, msg_op: int) -> None:
        assert msg_op == op, (
            f"collective #{seq}: rank {self.rank} runs {_OP_NAMES[op]} but rank {src} runs "
            f"{_OP_NAMES[msg_op]}; every rank must call the same collectives in the same order"
        )

    def _exchange(
        self, op: int, sends: list[tuple[int, bytes, object]], sources: list[int]
    ) -> dict[int, Frames]:
        """Send every (dst, tensor header, data) message, then receive one from each source."""
        seq = self._next_seq()
        prefix = _PREFIX.pack(seq, self.rank, op)
        trackers = []
        for dst, header, data in sends:
            try:
                tracker = self._outboxes[dst].send_multipart(
                    (prefix + header, data), copy=False, track=True
                )
            except zmq.Again:  # the queue to dst stayed full for timeout_s
                raise self._lost(seq, op, {dst}, "could not queue") from None
            if not tracker.done:
                trackers.append((dst, tracker))
        received: dict[int, Frames] = {}
        waiting = set(sources)
        for src in sources:
            frames = self._stash.pop((seq, src), None)
            if frames is not None:
                self._check_op(seq, op, src, _PREFIX.unpack_from(frames[0].buffer)[2])
                received[src] = frames
                waiting.discard(src)
        while waiting:
            try:
                frames = self._recv_one(seq, op, waiting)
            except zmq.Again:
                raise self._lost(seq, op, waiting, "no message") from None
            if frames is not None:
                src = _PREFIX.unpack_from(frames[0].buffer)[1]
                received[src] = frames
                waiting.discard(src)
        # NOTE: zero-copy sends read the caller's tensors; once the call returns they are free.
        for dst, tracker in trackers:
            try:
                tracker.wait(self.timeout_s)
            except zmq.NotDone:
                raise self._lost(seq, op, {dst}, "could not deliver") from None
        return received

    def _lost(self, seq: int, op: int, ranks: set[int], what: str) -> WorkerLost:
        self._broken = True
        missing = sorted(ranks)
        return WorkerLost(
            missing[0],
            f"{what} {_OP_NAMES[op]} (op #{seq}) to/from ranks {missing} within {self.timeout_s}s",
        )

    @staticmethod
    def _tensor(frames: Frames) -> torch.Tensor:
        if len(frames) != 2:
            raise ValueError(f"malformed mesh message ({len(frames)} frames, expected 2)")
        header = decode_header(frames[0].buffer[_PREFIX.size :])
        return tensor_from_buffer(header, frames[1])

    def all_to_all_v(self, send: list[torch.Tensor]) -> list[torch.Tensor]:
        """See `Collective.all_to_all_v`."""
        if len(send) != self.world_size:
            raise ValueError(f"all_to_all_v needs {self.world_size} tensors, got {len(send)}")
        mine = send[self.rank]
        peers = self._peers()
        sends = [(dst, *encode_tensor(send[dst])) for dst in peers]
        received = self._exchange(_ALL_TO_ALL, sends, peers)
        recv = [mine] * self.world_size
        for src, frames in received.items():
            tensor = self._tensor(frames)
            if tensor.dtype != mine.dtype or tensor.shape[1:] != mine.shape[1:]:
                raise ValueError(
                    f"all_to_all_v: rank {src} sent {tensor.dtype}{list(tensor.shape)}, "
                    f"rank {self.rank} sends {mine.dtype}{list(mine.shape)}; dtype and "
                    "trailing dims must match"
                )
            recv[src] = tensor.to(mine.device)
        return recv

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """See `Collective.all_gather`."""
        peers = self._peers()
        header, data = encode_tensor(tensor)
        received = self._exchange(_ALL_GATHER, [(dst, header, data) for dst in peers], peers)
        gathered = [tensor] * self.world_size
        for src, frames in received.items():
            gathered[src] = self._tensor(frames).to(tensor.device)
        return gathered

    def ring_send_recv(self, tensor: torch.Tensor) -> torch.Tensor:
        """See `Collective.ring_send_recv`."""
        if self.world_size == 1:
            return tensor
        nxt, prev = (self.rank + 1) % self.world_size, (self.rank - 1) % self.world_size
        received = self._exchange(_RING, [(nxt, *encode_tensor(tensor))], [prev])
        return self._tensor(received[prev]).to(tensor.device)

    def barrier(self) -> None:
        """See `Collective.barrier`."""
        if self.world_size > 1:
            peers = self._peers()
            self._exchange(_BARRIER, [(dst, b"", b"") for dst in peers], peers)

    def close(self) -> None:
        """Close the sockets, remove this rank's socket file and the directory once empty."""
        linger_ms = 0 if self._broken else None
        for i, outbox in enumerate(self._outboxes):
            if outbox is not None:
                outbox.close(linger=linger_ms)
                self._outboxes[i] = None
        if self._inbox is not None:
            self._inbox.close(linger=linger_ms)
            self._inbox = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self._endpoints:
            ep.remove_socket_file(self._endpoints[self.rank])
        if self._socket_dir is not None:
            ep.remove_dir_if_empty(self._socket_dir)
            self._socket_dir = None

