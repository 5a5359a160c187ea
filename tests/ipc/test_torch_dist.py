"""torch.distributed backend specifics that need no process group (the groups are in
test_collectives.py)."""

from __future__ import annotations

import socket
import time

import pytest

from titanserve.ipc.collectives.torch_dist import TorchDistCollective
from titanserve.ipc.errors import WorkerLost


def test_missing_peer_fails_the_rendezvous_within_its_deadline() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(WorkerLost, match=r"rank 1 lost: ranks \[1\] did not join") as info:
        TorchDistCollective(0, 2, init_method=f"tcp://127.0.0.1:{port}", connect_timeout_s=0.5)
    assert info.value.rank == 1
    assert time.monotonic() - start < 3


@pytest.mark.parametrize("init_method", ["127.0.0.1:29500", "tcp://127.0.0.1", "env://"])
def test_init_method_must_be_tcp_host_port(init_method: str) -> None:
    with pytest.raises(ValueError, match="tcp://host:port"):
        TorchDistCollective(0, 2, init_method=init_method)
