"""Shared-memory slots: round trips, the overflow note, slot reuse waiting on the reader's ack,
deadlines, and no file left behind. Two ranks' ShmSlots in one process map the same files,
as two processes would."""

from __future__ import annotations

import ctypes
import glob
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from titanserve.ipc.collectives import shm_slots
from titanserve.ipc.collectives.shm_slots import ShmSlots


def make_pair(tmp_path: Path, slot_bytes: int = 256) -> tuple[ShmSlots, ShmSlots, str]:
    prefix = str(tmp_path / "mesh")
    a, b = ShmSlots(prefix, 0, 2, slot_bytes), ShmSlots(prefix, 1, 2, slot_bytes)
    a.attach()
    b.attach()
    return a, b, prefix


def soon(seconds: float = 1.0) -> float:
    return time.monotonic() + seconds


def take(slots: ShmSlots, src: int, seq: int, deadline: float | None = None) -> bytes | None:
    """Read op `seq`'s message from src as prefix + data bytes, then release its slot."""
    got = slots.get(src, seq, soon() if deadline is None else deadline)
    slots.release(src, seq)
    return None if got is None else bytes(got[0]) + bytes(got[1])


def test_messages_round_trip_in_order_and_files_go(tmp_path: Path) -> None:
    a, b, prefix = make_pair(tmp_path)
    assert len(glob.glob(prefix + "*")) == 2
    a.unlink()
    b.unlink()
    assert glob.glob(prefix + "*") == []  # the mappings outlive the names
    for seq in range(5):  # both slots, each reused
        payload = np.arange(seq * 3, dtype=np.int32)  # seq 0: an empty array
        assert a.put(1, seq, (b"head", payload), soon())
        prefix_view, data_view, address = b.get(0, seq, soon())
        assert bytes(prefix_view) == b"head"
        assert np.array_equal(np.frombuffer(data_view, np.int32), payload)
        # the data is viewed in place, 64-byte aligned: a tensor can be built on it as is
        assert np.frombuffer(data_view, np.uint8).ctypes.data == address
        assert address % 64 == 0
        b.release(0, seq)
        assert b.put(0, seq, (bytes([seq]), b""), soon())
        assert take(a, 1, seq) == bytes([seq])
    a.close()
    b.close()


def test_a_view_holds_until_released_and_then_the_slot_is_reused(tmp_path: Path) -> None:
    a, b, _ = make_pair(tmp_path)
    a.put(1, 0, (b"", b"first"), soon())
    a.put(1, 1, (b"", b"second"), soon())
    _, first, _ = b.get(0, 0, soon())
    with pytest.raises(TimeoutError):  # slot 0 is still lent out to the reader
        a.put(1, 2, (b"", b"third!"), soon(0.05))
    assert bytes(first) == b"first"
    b.release(0, 0)
    a.put(1, 2, (b"", b"third!"), soon())  # slot 0 again
    assert take(b, 0, 1) == b"second"
    assert take(b, 0, 2) == b"third!"


def test_a_tensor_is_copied_from_its_storage(tmp_path: Path) -> None:
    a, b, _ = make_pair(tmp_path, slot_bytes=256)
    for seq, tensor in enumerate([
        torch.arange(12, dtype=torch.float32).view(3, 4),
        torch.empty(0, 4),
        torch.tensor([1.5, -2.0], dtype=torch.bfloat16),  # a dtype numpy lacks
    ]):  # fmt: skip
        assert a.put(1, seq, (b"t", tensor), soon())
        _, data, address = b.get(0, seq, soon())
        assert len(data) == tensor.nbytes
        copy = torch.empty_like(tensor)
        ctypes.memmove(copy.data_ptr(), address, tensor.nbytes)
        assert torch.equal(copy, tensor)
        b.release(0, seq)
    assert not a.put(1, 3, (b"t", torch.zeros(49, dtype=torch.float32)), soon())  # 64 + 196


def test_too_big_writes_nothing_and_the_note_says_zeromq(tmp_path: Path) -> None:
    a, b, _ = make_pair(tmp_path, slot_bytes=80)
    assert not a.put(1, 0, (b"p", b"x" * 17), soon())  # 64 (prefix, aligned) + 17 > 80
    with pytest.raises(TimeoutError):  # nothing was published for op 0
        b.get(0, 0, time.monotonic())
    assert a.put(1, 0, None, soon())  # the note: comes by ZeroMQ
    assert take(b, 0, 0) is None
    assert a.put(1, 1, (b"p", b"y" * 16), soon())  # exactly a slot's worth fits
    assert take(b, 0, 1) == b"p" + b"y" * 16
    assert a.put(1, 2, (b"", b"z" * 80), soon())  # no prefix: the data starts the slot
    assert take(b, 0, 2) == b"z" * 80


def test_a_sender_two_ops_ahead_waits_for_the_readers_release(tmp_path: Path) -> None:
    a, b, _ = make_pair(tmp_path)
    a.put(1, 0, (b"", b"op0"), soon())
    a.put(1, 1, (b"", b"op1"), soon())
    with pytest.raises(TimeoutError):  # slot 0 still holds op 0, unread
        a.put(1, 2, (b"", b"op2"), soon(0.05))
    reader = threading.Timer(0.1, lambda: take(b, 0, 0))
    reader.start()
    start = time.monotonic()
    assert a.put(1, 2, (b"", b"op2"), soon())  # returns once op 0 is released
    assert time.monotonic() - start >= 0.05
    reader.join()
    assert take(b, 0, 1) == b"op1"
    assert take(b, 0, 2) == b"op2"


def test_a_reader_past_its_deadline_raises_and_a_late_message_still_comes(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(shm_slots, "SPIN_S", 0.001)  # then sleep-polling: still delivered
    a, b, _ = make_pair(tmp_path)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        b.get(0, 0, soon(0.1))
    assert 0.09 < time.monotonic() - start < 1.0
    writer = threading.Timer(0.05, lambda: a.put(1, 0, (b"late", b""), soon()))
    writer.start()
    assert take(b, 0, 0) == b"late"
    writer.join()


def test_a_region_name_taken_is_refused(tmp_path: Path) -> None:
    prefix = str(tmp_path / "mesh")
    first = ShmSlots(prefix, 0, 2)
    with pytest.raises(FileExistsError):
        ShmSlots(prefix, 0, 2)
    first.close()
    assert glob.glob(prefix + "*") == []


def test_a_full_tmpfs_fails_at_creation_and_leaves_no_file(tmp_path: Path, monkeypatch) -> None:
    def no_room(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shm_slots.os, "posix_fallocate", no_room)
    prefix = str(tmp_path / "mesh")
    with pytest.raises(OSError, match="No space"):
        ShmSlots(prefix, 0, 2)
    assert glob.glob(prefix + "*") == []
