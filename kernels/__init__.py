"""titanserve.kernels."""
