"""Fixtures shared by every test folder."""

from __future__ import annotations

import pytest

from titanserve.kernels import cpu_experts, cpu_linear


@pytest.fixture
def pack_every_weight(monkeypatch):
    """The CPU runner packs every weight oneDNN takes, whatever its size: a tiny model's
    weights are all below the sizes under which weights stay dense
    (`cpu_linear.MIN_PACKED_ELEMENTS`, `cpu_experts.MIN_PACKED_EXPERT_ELEMENTS`)."""
    monkeypatch.setattr(cpu_linear, "MIN_PACKED_ELEMENTS", 0)
    monkeypatch.setattr(cpu_experts, "MIN_PACKED_EXPERT_ELEMENTS", 0)
