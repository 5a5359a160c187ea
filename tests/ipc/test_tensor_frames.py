"""Tensor frames: round trips through real ZeroMQ frames, and garbage headers."""

import itertools
import warnings

import msgspec
import pytest
import torch
import zmq

from titanserve.ipc.tensor_frames import (
    TensorHeader,
    decode_tensor,
    encode_header,
    encode_tensor,
    tensor_from_buffer,
)

_endpoint_ids = itertools.count()


def round_trip(tensor: torch.Tensor) -> torch.Tensor:
    """Send `tensor` over a real inproc PAIR socket (copy=False both ways) and decode it."""
    ctx = zmq.Context.instance()
    endpoint = f"inproc://tensor-frames-{next(_endpoint_ids)}"  # a closed name frees lazily
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind(endpoint)
    b.connect(endpoint)
    try:
        a.send_multipart(encode_tensor(tensor), copy=False)
        header, data = b.recv_multipart(copy=False)
        return decode_tensor(header.buffer, data)
    finally:
        a.close(linger=0)
        b.close(linger=0)


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(5, 7),
        torch.randn(3, 4, 2).to(torch.bfloat16),
        torch.randn(6, 3).to(torch.float16),
        torch.arange(-50, 50, dtype=torch.int32).reshape(10, 10),
        torch.arange(1 << 40, (1 << 40) + 9, dtype=torch.int64),
        torch.tensor([True, False, True, True]),
        torch.empty(0, 16),
        torch.empty(3, 0, dtype=torch.bfloat16),
        torch.tensor(3.5),
        torch.randn(1 << 17, 4),  # 2 MiB: over pyzmq's copy threshold, a true zero-copy frame
    ],
    ids=["fp32", "bf16", "fp16", "int32", "int64", "bool", "0-rows", "0-cols", "scalar", "2MiB"],
)
def test_round_trip_is_exact(tensor: torch.Tensor) -> None:
    out = round_trip(tensor)
    assert out.dtype == tensor.dtype
    assert out.shape == tensor.shape
    assert torch.equal(out, tensor)


def test_non_contiguous_input_is_sent_contiguous() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    out = round_trip(base.t()[1:, ::2])
    assert torch.equal(out, base.t()[1:, ::2])
    assert out.is_contiguous()


def test_decode_is_a_view_of_the_frame() -> None:
    tensor = torch.arange(1024, dtype=torch.float32)
    header, data = encode_tensor(tensor)
    frame = zmq.Frame(bytes(data))
    out = decode_tensor(header, frame)
    assert out.data_ptr() == torch.frombuffer(frame.buffer, dtype=torch.uint8).data_ptr()
    assert torch.equal(out, tensor)


def test_encode_does_not_copy_contiguous_tensor() -> None:
    tensor = torch.arange(64, dtype=torch.int64)
    _, data = encode_tensor(tensor)
    assert data.ctypes.data == tensor.data_ptr()


def test_read_only_buffer_is_copied_not_shared() -> None:
    header, data = encode_tensor(torch.arange(6, dtype=torch.int32).reshape(2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it wraps read-only memory
        out = decode_tensor(header, bytes(data))
    out += 1  # writable: it owns a copy
    assert out.tolist() == [[1, 2, 3], [4, 5, 6]]


def test_misaligned_buffer_is_copied_to_aligned_memory() -> None:
    raw = bytearray(1 + 8 * 4)
    raw[1:] = torch.arange(4, dtype=torch.int64).numpy().tobytes()
    out = tensor_from_buffer(TensorHeader("int64", (4,)), memoryview(raw)[1:])
    assert out.data_ptr() % 8 == 0
    assert out.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "header, data, match",
    [
        (b"\xc1garbage", b"", "malformed tensor header"),
        (msgspec.msgpack.encode({"dtype": "float32"}), b"", "malformed tensor header"),
        (msgspec.msgpack.encode(["float32", [2, "x"]]), b"", "malformed tensor header"),
        (encode_header(TensorHeader("pickle", (1,))), b"\0" * 4, "unknown tensor dtype"),
        (encode_header(TensorHeader("float32", (2, 3))), b"\0" * 20, "needs 24"),
        (encode_header(TensorHeader("float32", (-1, 4))), b"\0" * 16, "invalid tensor shape"),
        (encode_header(TensorHeader("int8", (1,) * 17)), b"\0", "invalid tensor shape"),
        (encode_header(TensorHeader("int64", (1 << 62,))), b"\0" * 8, "needs"),
    ],
    ids=["not-msgpack", "wrong-type", "bad-dim", "bad-dtype", "short", "negative", "ndim", "huge"],
)
def test_garbage_raises_value_error(header: bytes, data: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        decode_tensor(header, data)
