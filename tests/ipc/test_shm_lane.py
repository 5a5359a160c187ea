"""Shared-memory lane: arenas, zero-copy views, acks on release, fallback, growth, cleanup."""

from __future__ import annotations

import gc
import glob
from pathlib import Path

import torch

from titanserve.ipc.collectives.shm_lane import MAX_ARENAS_PER_PEER, ShmLane, arena_prefix


def make_pair(shm_dir: Path) -> tuple[ShmLane, ShmLane, str]:
    """Rank 0's and rank 1's lanes of one mesh, with arenas in `shm_dir`."""
    mesh_id = f"ipc://{shm_dir}/rank0.sock"
    prefix = arena_prefix(str(shm_dir), mesh_id)
    return ShmLane(str(shm_dir), mesh_id, 0), ShmLane(str(shm_dir), mesh_id, 1), prefix


def payload(size: int, seed: int) -> torch.Tensor:
    return (torch.arange(size) * 7 + seed).to(torch.uint8)


def test_receiver_view_is_zero_copy_and_acked_when_released(tmp_path: Path) -> None:
    sender, receiver, prefix = make_pair(tmp_path)
    ref = sender.write(1, payload(3000, 1))
    assert ref is not None and len(glob.glob(prefix + "*")) == 1
    view = torch.from_numpy(receiver.read(0, memoryview(ref)))
    assert glob.glob(prefix + "*") == []  # the receiver unlinks the name once mapped
    assert torch.equal(view, payload(3000, 1))
    alias = view[10:20]
    del view
    assert receiver.take_acks() == []  # `alias` still uses the arena
    del alias
    gc.collect()
    acks = receiver.take_acks()
    assert acks == [(0, 1)]
    sender.on_ack(1, acks[0][1])
    again = sender.write(1, payload(10, 2))
    assert again is not None and glob.glob(prefix + "*") == []  # the same arena, no new file
    assert torch.from_numpy(receiver.read(0, memoryview(again))).tolist() == payload(10, 2).tolist()
    sender.close(wait_s=0)
    receiver.close(wait_s=0)
    assert glob.glob(prefix + "*") == []


def test_held_arenas_force_fallback_then_grow_and_retire(tmp_path: Path) -> None:
    sender, receiver, prefix = make_pair(tmp_path)
    held = []
    for i in range(MAX_ARENAS_PER_PEER):
        ref = sender.write(1, payload(1000, i))
        held.append(torch.from_numpy(receiver.read(0, memoryview(ref))))
    assert sender.write(1, payload(1000, 99)) is None  # every arena is still held: no wait
    assert [t[:3].tolist() for t in held] == [payload(3, i).tolist() for i in range(4)]
    held.clear()
    for src, arena_id in receiver.take_acks():
        sender.on_ack(1 - src, arena_id)
    big = payload(3 << 20, 5)  # larger than any arena: the smallest free one is replaced
    view = torch.from_numpy(receiver.read(0, memoryview(sender.write(1, big))))
    assert torch.equal(view, big)
    del view
    sender.close(wait_s=0)
    receiver.close(wait_s=0)
    assert glob.glob(prefix + "*") == []


def test_close_removes_arenas_no_receiver_mapped(tmp_path: Path) -> None:
    sender, _, prefix = make_pair(tmp_path)
    sender.write(1, payload(100, 0))
    assert len(glob.glob(prefix + "*")) == 1
    sender.close(wait_s=0.05)
    assert glob.glob(prefix + "*") == []


def test_a_full_tmpfs_makes_write_decline_without_a_file(tmp_path: Path, monkeypatch) -> None:
    from titanserve.ipc.collectives import shm_lane

    def no_room(fd, offset, length):
        raise OSError(28, "No space left on device")

    sender, _, prefix = make_pair(tmp_path)
    monkeypatch.setattr(shm_lane.os, "posix_fallocate", no_room)
    assert sender.write(1, payload(100, 0)) is None  # the caller sends the bytes instead
    assert glob.glob(prefix + "*") == []
    monkeypatch.undo()
    assert sender.write(1, payload(100, 0)) is not None  # room again: arenas as usual
    sender.close(wait_s=0)
