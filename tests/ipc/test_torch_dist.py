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


@pytest.mark.parametrize("devices,nccl", [((0, 1), True), ((0, 0), False)])
def test_nccl_only_when_every_rank_has_its_own_gpu(devices, nccl, monkeypatch) -> None:
    """Two workers on one GPU (more workers than GPUs) cannot use NCCL ("Duplicate GPU
    detected"); they fall back to gloo with CUDA tensors staged through the host."""
    import torch
    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False)
    ranks = []
    for rank in range(2):
        collective = TorchDistCollective.__new__(TorchDistCollective)
        collective.rank, collective.world_size, collective._store = rank, 2, store
        ranks.append(collective)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for collective, device in zip(ranks, devices):  # each rank publishes before any reads
        monkeypatch.setattr(torch.cuda, "current_device", lambda d=device: d)
        store.set(f"gpu/{collective.rank}", f"{socket.gethostname()}:{device}")
    for collective, device in zip(ranks, devices):
        monkeypatch.setattr(torch.cuda, "current_device", lambda d=device: d)
        assert collective._gpu_per_rank() is nccl
        collective._nccl = nccl
        on_gpu = torch.empty(0, device="meta")  # stands for a CUDA tensor: not on the host
        assert (collective._wire(on_gpu).type == "meta") is nccl
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ranks[0]._gpu_per_rank() is False
