"""Backend selection: torch on CPU tensors, forcing by env var or context, and Triton set up to
interpret on CPU-only torch builds (checked in fresh processes)."""

import os
import subprocess
import sys

import pytest
import torch

from titanserve.kernels import backend, forced_backend


def run_python(code, **env):
    """Run `code` in a fresh interpreter with `env` added; returns (returncode, output)."""
    environ = {k: v for k, v in os.environ.items()
               if k not in ("TITANSERVE_KERNELS", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "-c", code], env={**environ, **env},
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def test_cpu_tensors_use_torch():
    if os.environ.get("TITANSERVE_KERNELS"):
        pytest.skip("TITANSERVE_KERNELS forces a backend in this run")
    assert backend(torch.zeros(1)) == "torch"
    assert backend() == ("triton" if torch.cuda.is_available() else "torch")


def test_forced_backend_nests_and_restores():
    before = backend(torch.zeros(1))
    with forced_backend("triton"):
        assert backend(torch.zeros(1)) == "triton"
        with forced_backend("torch"):
            assert backend(torch.zeros(1)) == "torch"
        assert backend(torch.zeros(1)) == "triton"
    assert backend(torch.zeros(1)) == before
    with pytest.raises(ValueError, match="unknown kernel backend"):
        with forced_backend("cuda"):
            pass


def test_env_var_forces_a_backend():
    code = "import torch; from titanserve.kernels import backend; print(backend(torch.zeros(1)))"
    rc, out = run_python(code, TITANSERVE_KERNELS="triton")
    assert rc == 0 and out.strip().endswith("triton"), out


def test_bad_env_var_says_what_to_use():
    rc, out = run_python("import titanserve.kernels", TITANSERVE_KERNELS="cuda")
    assert rc != 0 and "use one of ('triton', 'torch')" in out


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA build of torch compiles")
def test_cpu_torch_build_makes_triton_interpret():
    code = ("import titanserve.kernels, triton; from titanserve.kernels.launch import interpreting;"
            " print(interpreting())")
    rc, out = run_python(code)
    assert rc == 0 and out.strip().endswith("True"), out
