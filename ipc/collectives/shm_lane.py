"""Shared-memory lane for large tensors between mesh ranks on one host.

Over ipc:// a large tensor costs two kernel copies and many wake-ups per socket buffer's worth
of bytes. Instead the sender copies it into an arena (a tmpfs file both ranks map) and the
ZeroMQ message carries only a reference. The receiver's tensor is a view of the arena: no copy
at all on receive. When every tensor viewing it is gone, the receiver acks and the sender may
write that arena again. A sender keeps at most `MAX_ARENAS_PER_PEER` arenas per receiver; when
all of them are still held, the tensor travels in the ZeroMQ message instead (never a wait).

The receiver unlinks an arena's file as soon as it has mapped it, so no file outlives a crash.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import time
import weakref

import numpy as np
import torch

_REF = struct.Struct("<IQI")  # arena id, bytes, id of an arena the receiver may unmap (0: none)
MAX_ARENAS_PER_PEER = 4
_MIN_ARENA_BYTES = 1 << 20


def default_shm_dir() -> str | None:
    """/dev/shm where it exists (tmpfs: no disk writeback), else None (lane disabled)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def arena_prefix(shm_dir: str, mesh_id: str) -> str:
    """The path prefix of every arena file of the mesh `mesh_id` (its rank 0 endpoint)."""
    return os.path.join(shm_dir, f"titanserve-{hashlib.sha1(mesh_id.encode()).hexdigest()[:16]}")


def map_shared_file(path: str, size: int, create: bool) -> mmap.mmap:
    """Map a tmpfs file shared between ranks (an arena, a slot region): all of it, or with
    `create` a new one of `size` bytes, its pages reserved up front: a full tmpfs then raises
    OSError here (and leaves no file) instead of a SIGBUS on a later write."""
    fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
    try:
        if create:
            os.posix_fallocate(fd, 0, size)
        return mmap.mmap(fd, size if create else os.fstat(fd).st_size)
    except OSError:
        if create:
            os.unlink(path)
        raise
    finally:
        os.close(fd)


class _Arena:
    """An arena this rank writes; `busy` while the receiver may still read it."""

    def __init__(self, arena_id: int, path: str, size: int) -> None:
        self.id, self.path, self.size = arena_id, path, size
        self.mmap = map_shared_file(path, size, create=True)
        self.bytes = torch.frombuffer(self.mmap, dtype=torch.uint8)  # (size,)
        self.busy = False

    def close(self) -> None:
        del self.bytes  # release the buffer export before unmapping
        self.mmap.close()
        try:
            os.unlink(self.path)  # still there only if the receiver never mapped it
        except FileNotFoundError:
            pass


class ShmLane:
    """The arenas this rank writes (per receiver) and maps (per sender), and their acks."""

    def __init__(self, shm_dir: str, mesh_id: str, rank: int) -> None:
        self._prefix = arena_prefix(shm_dir, mesh_id)
        self.rank = rank
        self._next_id = 1
        self._out: dict[int, list[_Arena]] = {}  # dst -> arenas
        self._retired: dict[int, int] = {}  # dst -> arena id it may unmap
        self._in: dict[tuple[int, int], mmap.mmap] = {}  # (src, arena id) -> mapping
        self._acks: list[tuple[int, int]] = []  # (src, arena id), appended by finalizers
        self.num_busy = 0  # arenas written and not acked yet

    def _path(self, src: int, dst: int, arena_id: int) -> str:
        return f"{self._prefix}-{src}to{dst}-a{arena_id}"

    def write(self, dst: int, data: torch.Tensor) -> bytes | None:
        """Copy the bytes of `data` (a contiguous CPU tensor) into a free arena for dst and
        return the reference to send; None when every arena for dst is still held, or the
        tmpfs has no room for a new one (send the bytes another way)."""
        data = data.detach().reshape(-1).view(torch.uint8)
        size = data.numel()
        arenas = self._out.setdefault(dst, [])
        free = [arena for arena in arenas if not arena.busy]
        fits = [arena for arena in free if arena.size >= size]
        if fits:
            arena = min(fits, key=lambda a: a.size)
        elif free or len(arenas) < MAX_ARENAS_PER_PEER:
            if free:  # too small: replace the smallest free arena
                old = min(free, key=lambda a: a.size)
                arenas.remove(old)
                old.close()
                self._retired[dst] = old.id
            capacity = max(_MIN_ARENA_BYTES, 1 << (size - 1).bit_length())
            try:
                arena = _Arena(self._next_id, self._path(self.rank, dst, self._next_id), capacity)
            except OSError:  # the tmpfs is full: this tensor goes another way
                return None
            self._next_id += 1
            arenas.append(arena)
        else:
            return None
        arena.bytes[:size].copy_(data)
        arena.busy = True
        self.num_busy += 1
        return _REF.pack(arena.id, size, self._retired.pop(dst, 0))

    def on_ack(self, dst: int, arena_id: int) -> None:
        """dst no longer reads arena `arena_id`."""
        for arena in self._out.get(dst, ()):
            if arena.id == arena_id:
                assert arena.busy, f"rank {dst} acked arena {arena_id} twice"
                arena.busy = False
                self.num_busy -= 1
                return
        raise AssertionError(f"rank {dst} acked unknown arena {arena_id}")

    def read(self, src: int, ref: memoryview) -> np.ndarray:
        """A flat uint8 view of the bytes `ref` points at in src's arena (no copy).

        The arena is acked once this array and everything built on it (tensors) are gone.
        """
        if len(ref) != _REF.size:
            raise ValueError(f"malformed shared-memory reference from rank {src}")
        arena_id, size, retired = _REF.unpack(ref)
        if retired:
            self._in.pop((src, retired), None)  # unmapped once the last view of it is gone
        mapping = self._in.get((src, arena_id))
        if mapping is None:
            path = self._path(src, self.rank, arena_id)
            mapping = self._in[(src, arena_id)] = map_shared_file(path, 0, create=False)
            os.unlink(path)  # both sides hold a mapping; the name is no longer needed
        if size > len(mapping):
            raise ValueError(f"rank {src} refers to {size} bytes past its arena's end")
        view = np.frombuffer(mapping, dtype=np.uint8, count=size)
        weakref.finalize(view, self._ack, src, arena_id)
        return view

    def _ack(self, src: int, arena_id: int) -> None:
        self._acks.append((src, arena_id))  # only this: finalizers run at arbitrary points

    def take_acks(self) -> list[tuple[int, int]]:
        """(src, arena id) of arenas whose every view is gone since the last call."""
        acks, self._acks = self._acks, []
        return acks

    def close(self, wait_s: float) -> None:
        """Unmap every arena. Waits up to `wait_s` for receivers to map (and so unlink) the
        arenas they have not mapped yet, then removes what is left."""
        deadline = time.monotonic() + wait_s
        for arenas in self._out.values():
            for arena in arenas:
                while os.path.exists(arena.path) and time.monotonic() < deadline:
                    time.sleep(0.001)  # the receiver is still reading our last op's message
                arena.close()
        self._out.clear()
        self._in.clear()  # peers' mappings go when their last view does
