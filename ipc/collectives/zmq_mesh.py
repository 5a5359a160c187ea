"""ZeroMQ mesh collective: each rank binds one PULL socket and connects a PUSH to every peer.

A message starts with a head: op sequence number, source rank, op code, tensor header length,
tensor header (dtype, shape). Small tensors ride in the head's frame (one frame, one copy);
larger ones follow as a second frame, zero-copy over tcp://, or as a reference into the
shared-memory lane (`shm_lane`) over ipc://. On one host, ops skip ZeroMQ altogether: a
message up to a slot's size goes through shared-memory slots (`shm_slots`), a larger one into
the lane with its reference in the slot; only when every arena is still held does the slot
say that the message comes by ZeroMQ. Sends to every peer are queued before any receive, so all
transfers overlap.
NOTE: per peer, ZeroMQ delivers in order; a message for a later op (from a fast peer) is kept
until that op runs, a message for an op already finished is a protocol bug (assert).
"""

from __future__ import annotations

import ctypes
import struct
import time
from collections import deque

import torch
import zmq

from titanserve.ipc.collectives import Collective, PendingAllToAll
from titanserve.ipc.collectives import mesh_sockets as ms
from titanserve.ipc.collectives.mesh_frames import (
    HEAD,
    IN_SHM,
    Frames,
    SlotFrame,
    check_part,
    concatenated,
    decode,
    to_device_of,
    wire,
)
from titanserve.ipc.collectives.shm_lane import ShmLane, arena_prefix, default_shm_dir
from titanserve.ipc.collectives.shm_slots import ShmSlots
from titanserve.ipc.errors import WorkerLost
from titanserve.ipc.tensor_frames import tensor_buffer

_HELLO, _ALL_TO_ALL, _ALL_GATHER, _RING, _BARRIER, _ACK = range(6)
_OP_NAMES = ("hello", "all_to_all_v", "all_gather", "ring_send_recv", "barrier", "ack")
_INLINE_MAX_BYTES = 128 << 10  # up to this, one frame (a copy) beats shared memory + ack
_ZMQ_COPY_BELOW_BYTES = 256 << 10  # below this a copy beats zero-copy's release bookkeeping
_EMPTY = torch.empty(0, dtype=torch.uint8)
# all_to_all_cat_start ops in flight at once: two slots per peer take a sender one op ahead
MAX_IN_FLIGHT = 2
_HELLO_BODY = struct.Struct("<IB")  # world size, whether the sender made its slot region

class ZmqMeshCollective(Collective):
    """Collectives over a ZeroMQ mesh (the default backend).

    Give `socket_dir` (from `make_socket_dir()`, shared by all ranks on one host) for ipc://
    sockets, or `addresses` (``host:port`` per rank) for tcp://. Each receive waits at most
    `timeout_s` before raising `WorkerLost`; the start-up handshake waits `connect_timeout_s`
    for every peer. `curve_keys` encrypts and authenticates the mesh; it is required to bind a
    non-loopback address. Over ipc://, messages up to `shm_slot_bytes` (0: none) go through
    shared-memory slots and larger tensors through the shared-memory lane, unless `use_shm` is
    False. close() removes this rank's socket file, and the directory once it is empty.
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
        curve_keys: ms.CurveKeys | None = None,
        use_shm: bool = True,
        max_message_size_bytes: int = 1 << 34,
        io_threads: int = 1,
        shm_slot_bytes: int = 1 << 20,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.rank, self.world_size = rank, world_size
        self.timeout_s = timeout_s
        self._seq = 0
        self.peer_wait_s = 0.0
        self._stash: dict[tuple[int, int], Frames] = {}  # (seq, src) -> frames not yet used
        self._sockets: ms.MeshSockets | None = None
        self._shm: ShmLane | None = None
        self._slots: ShmSlots | None = None
        self._borrowed: list[tuple[int, int]] = []  # (src, seq) of slots read, not yet released
        self._broken = False  # after WorkerLost, close() drops unsent messages at once
        self._in_flight: deque[int] = deque()  # seqs of all_to_all_cat_starts not waited for
        self._socket_dir = socket_dir if addresses is None else None
        self._endpoints: list[str] = []
        if world_size == 1:
            return
        self._endpoints = ms.mesh_endpoints(world_size, socket_dir, addresses)
        shm_dir = default_shm_dir()
        same_host = addresses is None and shm_dir is not None and use_shm
        try:
            if same_host:
                self._shm = ShmLane(shm_dir, self._endpoints[0], rank)
            if same_host and shm_slot_bytes > 0:
                prefix = arena_prefix(shm_dir, self._endpoints[0])
                try:
                    self._slots = ShmSlots(prefix, rank, world_size, shm_slot_bytes)
                except OSError:  # no room in the tmpfs: every rank does without (hello)
                    self._slots = None
            self._sockets = ms.MeshSockets(
                self._endpoints, rank, curve_keys=curve_keys, timeout_s=timeout_s,
                max_message_size_bytes=max_message_size_bytes,
                copy_threshold=_ZMQ_COPY_BELOW_BYTES, io_threads=io_threads,
            )  # fmt: skip
            self._inbox, self._outboxes = self._sockets.inbox, self._sockets.outboxes
            every_rank_has_slots = self._handshake(connect_timeout_s)
            if self._slots is not None:
                slots, self._slots = self._slots, None
                if every_rank_has_slots:  # each made its region before its hello
                    slots.attach()
                    self.barrier()  # over ZeroMQ: every rank has mapped every region
                    slots.unlink()
                    self._slots = slots
                else:
                    slots.close()
        except BaseException:
            self.close()
            raise

    def _peers(self) -> list[int]:
        """Other ranks, starting after this one so that ranks do not all hit rank 0 first."""
        return [(self.rank + i) % self.world_size for i in range(1, self.world_size)]

    def _handshake(self, connect_timeout_s: float) -> bool:
        """Exchange hellos with every peer so that a missing peer fails here, not in op 1.
        Returns whether every rank, this one included, made its slot region."""
        seq, self._seq = self._seq, self._seq + 1
        every_rank_has_slots = self._slots is not None
        body = _HELLO_BODY.pack(self.world_size, every_rank_has_slots)
        hello = HEAD.pack(seq, self.rank, _HELLO, 0) + body
        for outbox in self._outboxes.values():
            outbox.send(hello)
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
                    msg_seq, src, _, frames = self._recv_message()
                except zmq.Again:
                    continue
                if msg_seq != seq:  # a fast peer's first op
                    self._keep(msg_seq, src, frames)
                    continue
                world_size, has_slots = _HELLO_BODY.unpack_from(frames[0].buffer, HEAD.size)
                if world_size != self.world_size:
                    raise ValueError(f"rank {src} runs with another world_size")
                every_rank_has_slots = every_rank_has_slots and bool(has_slots)
                waiting.discard(src)
        finally:
            self._inbox.rcvtimeo = max(1, int(self.timeout_s * 1000))
        return every_rank_has_slots

    def _recv_message(self, flags: int = 0) -> tuple[int, int, int, Frames]:
        """The next (seq, src, op, frames) from any peer; acks are applied on the way.

        Raises zmq.Again when nothing arrives within the receive timeout (at once with
        zmq.NOBLOCK in `flags`).
        """
        while True:
            frames = [self._inbox.recv(flags, copy=False)]
            while frames[-1].more:
                frames.append(self._inbox.recv(copy=False))
            head = frames[0].buffer
            if len(head) < HEAD.size:
                raise ValueError(f"malformed mesh message ({len(head)} byte head)")
            msg_seq, src, msg_op, _ = HEAD.unpack_from(head)
            if msg_op != _ACK:
                return msg_seq, src, msg_op, frames
            if self._shm is None:
                raise ValueError(f"rank {src} acked shared memory over tcp://")
            self._shm.on_ack(src, msg_seq)  # an ack's seq field holds the arena id

    def _keep(self, msg_seq: int, src: int, frames: Frames) -> None:
        """Keep a fast peer's message for an op this rank has not started yet."""
        assert msg_seq >= self._seq, f"rank {src} sent op #{msg_seq}, which this rank ended"
        assert (msg_seq, src) not in self._stash, f"rank {src} sent op #{msg_seq} twice"
        self._stash[(msg_seq, src)] = frames

    def _check_op(self, seq: int, op: int, src: int, msg_op: int) -> None:
        assert msg_op & ~IN_SHM == op, (
            f"collective #{seq}: rank {self.rank} runs {_OP_NAMES[op]} but rank {src} runs "
            f"{_OP_NAMES[msg_op & ~IN_SHM]}; all ranks must call the same collectives in the "
            "same order"
        )

    def _send_large(self, seq: int, op: int, dst: int, header: bytes, data: torch.Tensor):
        """Send a tensor too big to inline: by shared memory if possible, else as a frame.
        With slots, `_put_in_slot` has already tried the lane for it: straight to a frame."""
        if self._shm is not None and self._slots is None:
            ref = self._shm.write(dst, data)
            if ref is not None:  # else every arena for dst is still held: send the bytes
                head = HEAD.pack(seq, self.rank, op | IN_SHM, len(header)) + header
                return self._outboxes[dst].send_multipart((head, ref))
        head = HEAD.pack(seq, self.rank, op, len(header)) + header
        frame = tensor_buffer(data)
        return self._outboxes[dst].send_multipart((head, frame), copy=False, track=True)

    def _exchange(
        self, op: int, sends: list[tuple[int, bytes, torch.Tensor]], sources: list[int]
    ) -> dict[int, Frames]:
        """Send every (dst, tensor header, data) message (data from `_wire`), then receive one
        from each source.
        Messages that came through slots are views into them: call `_release_slots` once
        they are copied out."""
        return self._receive(op, sources, *self._send(op, sends))

    def _send(
        self, op: int, sends: list[tuple[int, bytes, torch.Tensor]], started: bool = False
    ) -> tuple[int, float, list]:
        """`_exchange`'s first half: queue the messages of a new op; returns (its sequence
        number, its deadline, trackers of zero-copy sends still reading their tensors).
        `started`: an all_to_all_cat_start, which may go while others are in flight."""
        if self._in_flight and (not started or len(self._in_flight) >= MAX_IN_FLIGHT):
            raise RuntimeError(
                f"{len(self._in_flight)} all_to_all_cat_start(s) still pending on this mesh: "
                "call wait() first"
            )
        # Only acks need draining (an early message waits for its op's receive), and asking
        # ZeroMQ costs ~50 µs in a model step (cold caches): ask only when an ack is due.
        acks_due = self._slots is not None and self._shm.num_busy > 0
        if acks_due and self._inbox.get(zmq.EVENTS) & zmq.POLLIN:
            self._drain_inbox()
        seq, self._seq = self._seq, self._seq + 1
        deadline = time.monotonic() + self.timeout_s
        if self._shm is not None:
            for src, arena_id in self._shm.take_acks():
                self._outboxes[src].send(HEAD.pack(arena_id, self.rank, _ACK, 0))
        trackers = []
        try:
            for dst, header, data in sends:
                head = HEAD.pack(seq, self.rank, op, len(header))
                if self._slots is not None and self._put_in_slot(dst, seq, op, head, header, data,
                                                                 deadline):  # fmt: skip
                    continue
                if data.nbytes <= _INLINE_MAX_BYTES:  # one frame: head, header, bytes
                    self._outboxes[dst].send(b"".join((head, header, tensor_buffer(data))))
                    continue
                tracker = self._send_large(seq, op, dst, header, data)
                if tracker is not None and not tracker.done:
                    trackers.append((dst, tracker))
        except (zmq.Again, TimeoutError):  # dst kept its slot, or its queue stayed full
            raise self._lost(seq, op, {dst}, "could not queue") from None
        return seq, deadline, trackers

    def _receive(
        self, op: int, sources: list[int], seq: int, deadline: float, trackers: list
    ) -> dict[int, Frames]:
        """`_exchange`'s second half: op `seq`'s message from every source."""
        received: dict[int, Frames] = {}
        waited_from = time.perf_counter()
        by_zmq = sources
        if self._slots is not None:
            by_zmq = []
            for src in sources:
                try:
                    data = self._slots.get(src, seq, deadline)
                except TimeoutError:
                    raise self._lost(seq, op, {src}, "nothing") from None
                self._borrowed.append((src, seq))
                if data is None:
                    by_zmq.append(src)
                    continue
                prefix, payload, address = data
                self._check_op(seq, op, src, HEAD.unpack_from(prefix)[2])
                received[src] = [SlotFrame(prefix), SlotFrame(payload, address)]
        for src in by_zmq:
            frames = self._stash.pop((seq, src), None)
            if frames is not None:
                self._check_op(seq, op, src, HEAD.unpack_from(frames[0].buffer)[2])
                received[src] = frames
        while len(received) < len(sources):
            try:
                msg_seq, src, msg_op, frames = self._recv_message()
            except zmq.Again:
                raise self._lost(seq, op, set(sources) - received.keys(), "nothing") from None
            if msg_seq != seq:
                self._keep(msg_seq, src, frames)
                continue
            assert src in by_zmq and src not in received, f"rank {src} sent op #{seq} wrongly"
            self._check_op(seq, op, src, msg_op)
            received[src] = frames
        self.peer_wait_s += time.perf_counter() - waited_from
        # NOTE: zero-copy sends read the caller's tensors; once the call returns they are free.
        for dst, tracker in trackers:
            try:
                tracker.wait(self.timeout_s)
            except zmq.NotDone:
                raise self._lost(seq, op, {dst}, "could not deliver") from None
        return received

    def _put_in_slot(self, dst, seq, op, head, header, data, deadline) -> bool:
        """Put op `seq`'s message to dst in its slot: the message itself, or a reference to a
        copy in the shared-memory lane. False (with a note in the slot) when neither goes:
        then it must be sent through ZeroMQ."""
        if self._slots.put(dst, seq, (head + header, data), deadline):
            return True
        ref = self._shm.write(dst, data)
        if ref is not None:  # else every arena for dst is still held
            shm_head = HEAD.pack(seq, self.rank, op | IN_SHM, len(header))
            if self._slots.put(dst, seq, (shm_head + header, ref), deadline):
                return True
        self._slots.put(dst, seq, None, deadline)
        return False

    def _drain_inbox(self) -> None:
        """Apply the arena acks (and keep early messages) waiting in the inbox: with slots
        carrying most ops, it is otherwise read only when a message overflows a slot."""
        while True:
            try:
                msg_seq, src, _, frames = self._recv_message(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._keep(msg_seq, src, frames)

    def _lost(self, seq: int, op: int, ranks: set[int], what: str) -> WorkerLost:
        self._broken = True
        missing = sorted(ranks)
        detail = f"{what} from/to ranks {missing} in {_OP_NAMES[op]} #{seq} in {self.timeout_s}s"
        return WorkerLost(missing[0], detail)

    def _release_slots(self) -> None:
        """Hand back the slots this op read (their views are copied out by now)."""
        for src, seq in self._borrowed:
            self._slots.release(src, seq)
        self._borrowed.clear()

    def _tensor(self, src: int, frames: Frames) -> torch.Tensor:
        """Decode a received tensor: a view of the frame or of the sender's shared memory, or
        a copy of a slot's bytes."""
        dtype, shape, address, owner = decode(src, frames, self._shm)
        if owner is not None:
            return owner
        tensor = torch.empty(shape, dtype=dtype)
        if tensor.nbytes:
            ctypes.memmove(tensor.data_ptr(), address, tensor.nbytes)
        return tensor

    def _send_all_to_all(
        self, send: list[torch.Tensor], started: bool = False
    ) -> tuple[list[int], tuple]:
        """Send an all-to-all's messages; returns (the peers, what `_receive` takes next)."""
        if len(send) != self.world_size:
            raise ValueError(f"all_to_all_v needs {self.world_size} tensors, got {len(send)}")
        peers = self._peers()
        return peers, self._send(_ALL_TO_ALL, [(dst, *wire(send[dst])) for dst in peers],
                                 started)  # fmt: skip

    def all_to_all_v(self, send: list[torch.Tensor]) -> list[torch.Tensor]:
        """See `Collective.all_to_all_v`."""
        mine = send[self.rank] if len(send) == self.world_size else None
        out = list(send)
        try:
            peers, sent = self._send_all_to_all(send)
            for src, frames in self._receive(_ALL_TO_ALL, peers, *sent).items():
                tensor = self._tensor(src, frames)
                check_part(src, tensor.dtype, tensor.shape, self.rank, mine)
                out[src] = to_device_of(tensor, mine)
        finally:
            self._release_slots()
        return out

    def all_to_all_cat(self, send: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """See `Collective.all_to_all_cat`: each received message is copied once, into the
        result (one memmove per part, straight out of a slot where it came by one)."""
        return self.all_to_all_cat_start(send).wait()

    def all_to_all_cat_start(self, send: list[torch.Tensor]) -> PendingAllToAll:
        """See `Collective.all_to_all_cat_start`: the messages are queued (in the peers' slots
        on one host) before it returns; `wait()` receives. Up to `MAX_IN_FLIGHT` may be in
        flight, waited for in the order they started; no other op may run in between."""
        if len(send) == self.world_size and not send[self.rank].is_cpu:
            parts = self.all_to_all_v(send)
            return PendingAllToAll(result=(torch.cat(parts), [p.shape[0] for p in parts]))
        peers, sent = self._send_all_to_all(send, started=True)
        self._in_flight.append(sent[0])
        # NOTE: `send` stays referenced until wait(): zero-copy sends may still read it.
        return PendingAllToAll(finish=lambda: self._finish_cat(send, peers, sent))

    def _finish_cat(
        self, send: list[torch.Tensor], peers: list[int], sent: tuple
    ) -> tuple[torch.Tensor, list[int]]:
        if self._in_flight[0] != sent[0]:
            raise RuntimeError("all_to_all_cat_start ops must be waited for in the order started")
        try:
            self._in_flight.popleft()
            received = self._receive(_ALL_TO_ALL, peers, *sent)
            mine = send[self.rank].contiguous()
            parts = []  # (rows, address, owner) in rank order
            for src in range(self.world_size):
                if src == self.rank:
                    parts.append((mine.shape[0], mine.data_ptr(), mine))
                    continue
                dtype, shape, address, owner = decode(src, received[src], self._shm)
                check_part(src, dtype, shape, self.rank, mine)
                parts.append((shape[0], address, owner))
            return concatenated(parts, mine), [rows for rows, _, _ in parts]
        finally:
            self._release_slots()

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """See `Collective.all_gather`."""
        peers = self._peers()
        header, data = wire(tensor)
        gathered = [tensor] * self.world_size
        try:
            received = self._exchange(_ALL_GATHER, [(dst, header, data) for dst in peers], peers)
            for src, frames in received.items():
                gathered[src] = to_device_of(self._tensor(src, frames), tensor)
        finally:
            self._release_slots()
        return gathered

    def ring_send_recv(self, tensor: torch.Tensor) -> torch.Tensor:
        """See `Collective.ring_send_recv`."""
        if self.world_size == 1:
            return tensor
        nxt, prev = (self.rank + 1) % self.world_size, (self.rank - 1) % self.world_size
        try:
            received = self._exchange(_RING, [(nxt, *wire(tensor))], [prev])
            return to_device_of(self._tensor(prev, received[prev]), tensor)
        finally:
            self._release_slots()

    def barrier(self) -> None:
        """See `Collective.barrier`."""
        if self.world_size > 1:
            peers = self._peers()
            try:
                self._exchange(_BARRIER, [(dst, b"", _EMPTY) for dst in peers], peers)
            finally:
                self._release_slots()

    def close(self) -> None:
        """Close the sockets, remove this rank's socket file and the directory once empty."""
        if self._sockets is not None:
            self._sockets.close(linger_ms=0 if self._broken else None)
            self._sockets = None
        if self._shm is not None:
            self._shm.close(wait_s=0 if self._broken else min(self.timeout_s, 2.0))
            self._shm = None
        if self._slots is not None:
            self._slots.close()
            self._slots = None
        if self._endpoints:
            ms.remove_socket_file(self._endpoints[self.rank])
        if self._socket_dir is not None:
            ms.remove_dir_if_empty(self._socket_dir)
            self._socket_dir = None

