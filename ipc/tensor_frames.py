"""Tensors as ZeroMQ frames: a small msgpack header (dtype, shape) and one raw data frame.

`encode_tensor` does not copy a contiguous CPU tensor: the data frame is a byte view of its
storage, meant for ``send(..., copy=False)``. `decode_tensor` returns a ``torch.frombuffer``
view of the received frame (``recv(copy=False)``), also without a copy. Every dtype travels as
raw bytes, so dtypes numpy lacks (bfloat16, float8) need nothing special. No pickle.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import msgspec
import numpy as np
import torch

MAX_NDIM = 16

_DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
        torch.uint16, torch.uint32, torch.uint64, torch.complex64, torch.complex128,
        torch.float8_e4m3fn, torch.float8_e5m2,
    )
}  # fmt: skip
_DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in _DTYPES.items()}
_NUMPY_CARRIERS = {  # dtypes numpy lacks travel as integers of the same size
    torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8, torch.float8_e5m2: torch.uint8,
}
# name -> (dtype, numpy dtype of its bytes, whether the tensor must be viewed back to dtype)
_DECODE: dict[str, tuple[torch.dtype, np.dtype, bool]] = {
    name: (dtype, torch.empty(0, dtype=_NUMPY_CARRIERS.get(dtype, dtype)).numpy().dtype,
           dtype in _NUMPY_CARRIERS)
    for name, dtype in _DTYPES.items()
}  # fmt: skip


class TensorHeader(msgspec.Struct, array_like=True, frozen=True):
    """What a receiver needs to rebuild a tensor from its data frame."""

    dtype: str
    shape: tuple[int, ...]


_header_encoder = msgspec.msgpack.Encoder()
_header_decoder = msgspec.msgpack.Decoder(TensorHeader)


def tensor_header(tensor: torch.Tensor) -> TensorHeader:
    """The header describing `tensor` (dtype name and shape)."""
    return _header(tensor.dtype, tuple(tensor.shape))


def _header(dtype: torch.dtype, shape: tuple[int, ...]) -> TensorHeader:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        raise ValueError(f"tensor dtype {dtype} cannot travel as a frame")
    return TensorHeader(name, shape)


def tensor_buffer(tensor: torch.Tensor) -> np.ndarray:
    """A numpy array over `tensor`'s bytes, usable as a zero-copy ZeroMQ frame.

    Contiguous CPU tensors are viewed, not copied; the array keeps the storage alive. Other
    tensors (non-contiguous, on a GPU) are first copied into a contiguous CPU tensor. Dtypes
    numpy lacks are viewed as integers of the same size: only the bytes matter.
    NOTE: a frame sent with copy=False reads the storage until ZeroMQ has sent it; do not
    write to the tensor in place before then.
    """
    if tensor.requires_grad:
        tensor = tensor.detach()
    if not tensor.is_cpu:
        tensor = tensor.cpu()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    carrier = _NUMPY_CARRIERS.get(tensor.dtype)
    return (tensor if carrier is None else tensor.view(carrier)).numpy()


def encode_tensor(tensor: torch.Tensor) -> tuple[bytes, np.ndarray]:
    """Encode `tensor` as (header bytes, data buffer); send both, the data with copy=False."""
    return encode_header(tensor_header(tensor)), tensor_buffer(tensor)


def encode_header(header: TensorHeader) -> bytes:
    """The msgpack bytes of `header`."""
    return _header_encoder.encode(header)


def decode_header(data: Any) -> TensorHeader:
    """Parse header bytes (any bytes-like object); raise ValueError on garbage."""
    try:
        return _header_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"malformed tensor header: {exc}") from exc


def checked_dtype(header: TensorHeader, nbytes: int) -> torch.dtype:
    """The dtype of the tensor `header` describes, checked against its data's size `nbytes`;
    raises ValueError for an unknown dtype, a bad shape, or a size that does not match."""
    expected = checked_size(header)
    if nbytes != expected:
        raise ValueError(
            f"tensor frame holds {nbytes} bytes but header {header.dtype}{list(header.shape)} "
            f"needs {expected}"
        )
    return _DECODE[header.dtype][0]


def checked_size(header: TensorHeader) -> int:
    """The data bytes the tensor `header` describes; raises ValueError for an unknown dtype or
    a bad shape."""
    entry = _DECODE.get(header.dtype)
    if entry is None:
        raise ValueError(f"unknown tensor dtype {header.dtype!r} in frame header")
    shape = header.shape
    if len(shape) > MAX_NDIM or any(dim < 0 for dim in shape):
        raise ValueError(f"invalid tensor shape {shape} in frame header")
    return math.prod(shape) * entry[1].itemsize


@functools.lru_cache(maxsize=1024)
def header_bytes(dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    """`encode_header` of a tensor of `dtype` and `shape`, memoized: a collective's messages
    repeat a few shapes, and a lookup costs far less than building and encoding a header
    when a step's compute has just evicted the code that does it (cold caches)."""
    return encode_header(_header(dtype, shape))


@functools.lru_cache(maxsize=1024)
def parsed_header(data: bytes) -> tuple[torch.dtype, tuple[int, ...], int]:
    """(dtype, shape, data bytes it needs) of header bytes, checked once per distinct header
    and memoized (see `header_bytes`); raises ValueError on garbage."""
    header = decode_header(data)
    nbytes = checked_size(header)
    return _DECODE[header.dtype][0], header.shape, nbytes


def tensor_from_buffer(header: TensorHeader, data: Any) -> torch.Tensor:
    """View `data` (bytes-like, e.g. a zmq.Frame) as the tensor `header` describes.

    Zero-copy, unless the buffer is read-only or not aligned to the dtype's item size. The
    tensor shares memory with `data` and keeps it alive. Raises ValueError if the header and
    buffer disagree.
    """
    dtype = checked_dtype(header, memoryview(data).nbytes)
    _, np_dtype, view_back = _DECODE[header.dtype]
    # NOTE: numpy, not torch, does the reshaping: one torch call per tensor is much cheaper
    # than several when a receive has just woken this process (cold caches).
    array = np.frombuffer(data, dtype=np_dtype).reshape(header.shape)
    if not (array.flags.aligned and array.flags.writeable):
        array = array.copy()  # ZeroMQ may hand out small messages at odd addresses
    tensor = torch.from_numpy(array)
    return tensor.view(dtype) if view_back else tensor


def decode_tensor(header: Any, data: Any) -> torch.Tensor:
    """Rebuild a tensor from (header bytes, data buffer) as produced by `encode_tensor`."""
    return tensor_from_buffer(decode_header(header), data)
