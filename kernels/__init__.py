"""titanserve.kernels: Triton kernels, their torch implementations, and backend selection.

Use the ops (`from titanserve.kernels import ops`); they run Triton on CUDA tensors and torch
elsewhere (see `backend`).
"""

# backend first: it configures Triton before any kernel module imports it.
from titanserve.kernels.backend import backend, forced_backend  # isort: skip
from titanserve.kernels import ops  # isort: skip

__all__ = ["backend", "forced_backend", "ops"]
