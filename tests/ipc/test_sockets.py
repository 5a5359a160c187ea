"""recv_ready: a message's frames, or None after the timeout; never a blocking recv."""

import time

import zmq

from titanserve.ipc.sockets import recv_ready


def test_recv_ready_returns_frames_or_none_in_time(tmp_path):
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        router.bind(f"ipc://{tmp_path}/s")
        dealer.connect(f"ipc://{tmp_path}/s")
        t0 = time.monotonic()
        assert recv_ready(router, 100) is None
        assert 0.05 < time.monotonic() - t0 < 5.0
        dealer.send_multipart([b"a", b"b"])
        identity, *frames = recv_ready(router, 5000)
        assert frames == [b"a", b"b"]
        zero_copy = recv_ready(router, 0, copy=False)
        assert zero_copy is None
    finally:
        router.close(linger=0)
        dealer.close(linger=0)
        ctx.term()
