"""Kernel tests. Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors.

NOTE: Triton decides between interpreting and compiling when it is imported (its standard
library and every `@triton.jit` are built then), not per launch; so TRITON_INTERPRET must be
set before anything imports triton. On a torch build without CUDA, importing
`titanserve.kernels` sets it too (see kernels/backend.py), which covers test runs where other
test folders import the kernels first. On a GPU machine the interpreter tests skip and the
`gpu` tests run the same comparisons compiled.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
