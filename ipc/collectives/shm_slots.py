"""Shared-memory slots: the fast path for small collective messages between ranks on one host.

A message over ipc:// wakes the sender's ZeroMQ I/O thread, the receiver's I/O thread and then
the receiver itself: ~100 µs per all-to-all on the development machine, where an MoE decode
step runs eight. Here the sender copies the message into a slot in shared memory and then
publishes its tag; the receiver polls the tag (yielding the CPU between polls, then sleeping
once the wait passes `SPIN_S`) and copies the message out. `benchmarks/collectives.py`, two
ranks on the development machine: a 4-64 KiB all-to-all takes 25-60 µs this way, 120-180 µs
through ZeroMQ.

Every rank owns one region (a tmpfs file all ranks map, unlinked once they have): per
destination an ack word and two slots, so a sender can run one op ahead of a receiver. A slot
is `[tag u64 | prefix size u64 | data size u64 | pad | prefix | pad | data]`, the data 64-byte
aligned so that a reader can view it as a tensor in place; tag = op sequence number + 1,
written last. The destination writes its ack word (the last op it released + 1) into the
sender's region. A message that travels through ZeroMQ instead leaves an OVERFLOW prefix size.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time

import numpy as np
import torch

from titanserve.ipc.collectives.shm_lane import map_shared_file

SLOT_BYTES = 1 << 20  # payload capacity of one slot
SPIN_S = 0.002  # poll with sched_yield this long, then sleep between polls
POLL_SLEEP_S = 1e-4
OVERFLOW = (1 << 64) - 1  # size of a message that did not fit: it comes through ZeroMQ
_HEADER_BYTES = 64  # tag, size, padding to a cache line
_SLOTS = 2
_ALIGN = 64  # a message's data starts this aligned in its slot: readers view it in place
_NOTHING = memoryview(b"")

_fence_lock = threading.Lock()


def _fence() -> None:
    """A full memory barrier (a lock's acquire and release): the payload is visible before its
    tag on every architecture, not only under x86's store order."""
    with _fence_lock:
        pass


def region_path(prefix: str, rank: int) -> str:
    return f"{prefix}-slots{rank}"


class ShmSlots:
    """This rank's slot region (it writes) and its peers' (it reads). Create every rank's
    `ShmSlots` before any calls `attach`; call `unlink` once every rank has attached. Raises
    OSError when the region does not fit in the tmpfs (then no file is left)."""

    def __init__(
        self, prefix: str, rank: int, world_size: int, slot_bytes: int = SLOT_BYTES
    ) -> None:
        self.rank, self.world_size, self.slot_bytes = rank, world_size, slot_bytes
        self._prefix = prefix
        self._stride = _HEADER_BYTES + _aligned(slot_bytes)  # one slot
        self._per_dst = _HEADER_BYTES + _SLOTS * self._stride  # ack line + slots
        size = world_size * self._per_dst
        path = region_path(prefix, rank)
        self._mine = map_shared_file(path, size, create=True)
        self._path: str | None = path
        self._regions: dict[int, mmap.mmap] = {rank: self._mine}
        # (seq of the message in each slot to dst, -1: never used), kept by the sender
        self._written = {dst: [-1] * _SLOTS for dst in range(world_size)}
        self._bytes: dict[int, memoryview] = {rank: memoryview(self._mine)}
        # each region as u64 words (tags, sizes, acks): a memoryview item costs less than a
        # numpy scalar, which matters when a step's compute has just evicted the code for it
        self._words: dict[int, memoryview] = {rank: self._bytes[rank].cast("Q")}
        # base address of each region, for copies by memmove (one C call, no array objects)
        self._anchors = {rank: ctypes.c_char.from_buffer(self._mine)}
        self._address = {rank: ctypes.addressof(self._anchors[rank])}

    def attach(self) -> None:
        """Map every peer's region (they must all exist by now)."""
        for src in range(self.world_size):
            if src not in self._regions:
                self._regions[src] = map_shared_file(region_path(self._prefix, src), 0, False)
                self._bytes[src] = memoryview(self._regions[src])
                self._words[src] = self._bytes[src].cast("Q")
                self._anchors[src] = ctypes.c_char.from_buffer(self._regions[src])
                self._address[src] = ctypes.addressof(self._anchors[src])

    def unlink(self) -> None:
        """Remove this rank's file (the mappings stay); safe to call twice."""
        if self._path is not None:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass
            self._path = None

    # ------------------------------------------------------------------ layout
    def _ack_index(self, dst: int) -> int:
        """The word, in a sender's region, where dst acks the messages it released."""
        return dst * self._per_dst // 8

    def _slot_offset(self, dst: int, seq: int) -> int:
        return dst * self._per_dst + _HEADER_BYTES + (seq % _SLOTS) * self._stride

    # ------------------------------------------------------------------ ops
    def put(self, dst: int, seq: int, message: tuple | None, deadline: float) -> bool:
        """Write op `seq`'s message `(prefix, data)` to dst (data lands 64-byte aligned), or
        with `message` None a note that it comes through ZeroMQ. The prefix is bytes; the data
        is bytes-like (a contiguous numpy array too) or a contiguous CPU tensor (copied from
        its storage). Returns False, writing nothing, when it is larger than a slot. Raises
        TimeoutError when dst has not freed the slot by `deadline`."""
        prefix, data = (_NOTHING, _NOTHING) if message is None else message
        tensor = isinstance(data, torch.Tensor)
        if tensor:
            assert data.is_cpu and data.is_contiguous(), "a slot copies a tensor's storage as is"
        else:
            data = _flat_bytes(data)
        data_size = data.nbytes
        data_start = _aligned(len(prefix))
        if data_start + data_size > self.slot_bytes:
            return False
        k = seq % _SLOTS
        previous = self._written[dst][k]
        if previous >= 0:  # dst must have released the message this slot holds
            _wait_at_least(self._words[self.rank], self._ack_index(dst), previous + 1, deadline)
        start = self._slot_offset(dst, seq) + _HEADER_BYTES
        self._mine[start : start + len(prefix)] = prefix
        if tensor:
            if data_size:
                ctypes.memmove(self._address[self.rank] + start + data_start, data.data_ptr(),
                               data_size)  # fmt: skip
        else:
            self._mine[start + data_start : start + data_start + data_size] = data
        # the header: tag, then prefix size and data size
        words, tag = self._words[self.rank], (start - _HEADER_BYTES) // 8
        words[tag + 1] = OVERFLOW if message is None else len(prefix)
        words[tag + 2] = data_size
        _fence()
        words[tag] = seq + 1
        self._written[dst][k] = seq
        return True

    def get(self, src: int, seq: int, deadline: float) -> tuple[memoryview, memoryview, int] | None:
        """Op `seq`'s message from src as `(prefix, data)` views into the slot and the data's
        address, valid until `release(src, seq)`; None when it travels through ZeroMQ (release
        it too). Raises TimeoutError when it has not come by `deadline`."""
        offset = self._slot_offset(self.rank, seq)
        words, tag = self._words[src], offset // 8
        _wait_at_least(words, tag, seq + 1, deadline)
        _fence()
        prefix_size, data_size = words[tag + 1], words[tag + 2]
        if prefix_size == OVERFLOW:
            return None
        data_start = _aligned(prefix_size)
        if data_start + data_size > self.slot_bytes:
            raise ValueError(f"rank {src} wrote {data_start + data_size} bytes into a slot")
        start = offset + _HEADER_BYTES
        slot = self._bytes[src][start : offset + self._stride]
        address = self._address[src] + start + data_start
        return slot[:prefix_size], slot[data_start : data_start + data_size], address

    def release(self, src: int, seq: int) -> None:
        """Hand op `seq`'s slot back to src (after `get`; its views must no longer be read)."""
        self._words[src][self._ack_index(self.rank)] = seq + 1

    def close(self) -> None:
        self.unlink()
        self._anchors.clear()
        self._address.clear()
        for view in (*self._words.values(), *self._bytes.values()):
            _unless_in_use(view.release)
        for region in self._regions.values():
            _unless_in_use(region.close)
        self._words.clear()
        self._bytes.clear()
        self._regions.clear()


def _unless_in_use(close) -> None:
    """Release a view or unmap a region, unless a view into it is still alive somewhere: the
    GC does it then."""
    try:
        close()
    except BufferError:
        pass


def _aligned(size: int) -> int:
    return -(-size // _ALIGN) * _ALIGN


def _flat_bytes(part) -> memoryview:
    """A flat byte view of bytes or of a contiguous numpy array (of any shape, empty too)."""
    if isinstance(part, np.ndarray):
        return memoryview(part.reshape(-1).view(np.uint8))
    return memoryview(part).cast("B")


def _wait_at_least(words: memoryview, index: int, value: int, deadline: float) -> None:
    """Poll `words[index]` until it is >= value: yielding the CPU at first, then sleeping."""
    if words[index] >= value:
        return
    spin_until = time.monotonic() + SPIN_S
    while words[index] < value:
        now = time.monotonic()
        if now < spin_until:
            os.sched_yield()
        elif now < deadline:
            time.sleep(POLL_SLEEP_S)
        else:
            raise TimeoutError
