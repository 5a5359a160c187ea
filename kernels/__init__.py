"""titanserve.kernels: Triton kernels, their torch implementations, and backend selection.

Use the ops (`from titanserve.kernels import ops`); they run Triton on CUDA tensors and torch
elsewhere (see `backend`).
"""

from titanserve.kernels import ops
from titanserve.kernels.backend import backend, forced_backend

__all__ = ["backend", "forced_backend", "ops"]
