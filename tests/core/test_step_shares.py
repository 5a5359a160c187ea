"""The arithmetic behind the engine's step accounting: the share of step time outside model
compute, in parts, and how far apart the workers' compute is."""

from __future__ import annotations

import pytest

from titanserve.core.engine import compute_apart, outside_compute


def test_outside_compute_splits_the_share_into_its_parts() -> None:
    share, parts = outside_compute(10.0, 8.0, 1.5, 0.5)
    assert share == pytest.approx(0.2)
    assert parts["all-to-all wait"] == pytest.approx(0.05)
    assert parts["all-to-all work"] == pytest.approx(0.1)
    assert parts["engine + IPC"] == pytest.approx(0.05)
    assert outside_compute(0.0, 0.0) == (0.0, dict.fromkeys(parts, 0.0))


def test_compute_apart_is_the_fastest_workers_shortfall() -> None:
    assert compute_apart(8.0, 6.0) == pytest.approx(0.25)
    assert compute_apart(8.0, 8.0) == 0.0  # one worker, or perfectly even ones
    assert compute_apart(0.0, 0.0) == 0.0  # no steps
