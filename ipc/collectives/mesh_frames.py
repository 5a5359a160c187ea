"""How mesh messages carry tensors: a head (op sequence number, source rank, op code, tensor
header length), the tensor header (dtype, shape) and the data, in one ZeroMQ frame, two, or a
shared-memory slot; decoding them, checking all-to-all parts, and joining them."""

from __future__ import annotations

import ctypes
import math
import struct

import torch

from titanserve.ipc.collectives.shm_lane import ShmLane
from titanserve.ipc.tensor_frames import (
    decode_header,
    header_bytes,
    parsed_header,
    tensor_from_buffer,
)

HEAD = struct.Struct("<QHBH")  # op sequence number, source rank, op code, tensor header bytes
IN_SHM = 0x80  # op code flag: the data frame is a reference into the sender's arena

Frames = list  # of zmq.Frame, or [prefix, data] SlotFrames for a message in a slot


class SlotFrame:
    """A view into a shared-memory slot, seen as a frame; valid until the op releases it."""

    more = False

    def __init__(self, data: memoryview, address: int = 0) -> None:
        self.buffer = data
        self.address = address  # of the data, for copying it out with one memmove


def wire(tensor: torch.Tensor) -> tuple[bytes, torch.Tensor]:
    """(tensor header bytes, the tensor as a contiguous CPU tensor): what a message carries.
    The data stays a tensor: a slot copies it by address, ZeroMQ takes a numpy view of it."""
    if not (tensor.is_cpu and tensor.is_contiguous()):
        tensor = tensor.detach().cpu().contiguous()
    return header_bytes(tensor.dtype, tuple(tensor.shape)), tensor


def to_device_of(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return tensor if like.is_cpu else tensor.to(like.device)  # no torch call in the CPU case


def decode(
    src: int, frames: Frames, lane: ShmLane | None
) -> tuple[torch.dtype, tuple, int, object]:
    """A received tensor as (dtype, shape, address of its bytes, owner): owner is a tensor
    viewing a frame or the sender's shared memory, or None for bytes in a slot (valid
    until the slots are released)."""
    head = frames[0].buffer
    _, _, op, header_len = HEAD.unpack_from(head)
    end = HEAD.size + header_len
    if len(frames) == 2 and isinstance(frames[1], SlotFrame) and not op & IN_SHM:
        dtype, shape, nbytes = parsed_header(bytes(head[HEAD.size : end]))
        if len(head) != end or len(frames[1].buffer) != nbytes:
            raise ValueError(f"malformed mesh message from rank {src}")
        return dtype, shape, frames[1].address, None
    header = decode_header(head[HEAD.size : end])
    if len(frames) == 1:
        tensor = tensor_from_buffer(header, head[end:])
    elif len(frames) != 2 or len(head) != end:
        raise ValueError(f"malformed mesh message from rank {src}")
    elif op & IN_SHM:
        if lane is None:
            raise ValueError(f"rank {src} sent a shared-memory reference over tcp://")
        tensor = tensor_from_buffer(header, lane.read(src, frames[1].buffer))
    else:
        tensor = tensor_from_buffer(header, frames[1].buffer)
    return tensor.dtype, header.shape, tensor.data_ptr(), tensor


def check_part(
    src: int, dtype: torch.dtype, shape: tuple, rank: int, mine: torch.Tensor | None
) -> None:
    """An all-to-all part from src must match this rank's dtype and trailing dims."""
    if mine is not None and (dtype != mine.dtype or tuple(shape[1:]) != tuple(mine.shape[1:])):
        raise ValueError(
            f"all_to_all_v: rank {src} sent {dtype}{list(shape)}, rank {rank} sends "
            f"{mine.dtype}{list(mine.shape)}; dtype and trailing dims must match"
        )


def concatenated(parts: list[tuple[int, int, object]], like: torch.Tensor) -> torch.Tensor:
    """(rows, address, owner) parts, each `like`'s dtype and trailing dims, copied into one new
    tensor in order (one memmove each)."""
    out = like.new_empty((sum(rows for rows, _, _ in parts), *like.shape[1:]))
    row_bytes = math.prod(like.shape[1:]) * like.element_size()
    at = out.data_ptr()
    for rows, address, _ in parts:
        if rows and row_bytes:
            ctypes.memmove(at, address, rows * row_bytes)
        at += rows * row_bytes
    return out
