"""The decode GEMV kernel body (csrc/gemm/gemv_kernels.cuh) and the transposed
tensor-core kernel body (csrc/gemm/gemm_t_kernels.cuh) run on the host by the
warp emulator of tests/cpp/gemv_emulator.cu, against a float64 reference:
every kernel variant, every blocksize class, plain and nested scales, odd N,
K (or N) split across warps and blocks, cp.async landing early or late. Needs
nvcc (not a GPU); skipped without it."""
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    cand = os.path.join(home, "bin", "nvcc")
    return cand if os.path.exists(cand) else None


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
def test_gemv_kernel_emulated(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, GEMV_EMU_BIN=str(tmp_path / "gemv_emulator"))
    env["PATH"] = os.path.dirname(_nvcc()) + os.pathsep + env.get("PATH", "")
    r = subprocess.run(["bash", os.path.join(HERE, "cpp", "run_gemv_emulator.sh"), "--quick"], env=env,
                       capture_output=True, text=True, timeout=1200)
    tail = (r.stdout[-4000:] + "\n" + r.stderr[-4000:])
    assert r.returncode == 0, tail
    assert "0 failed" in r.stdout, tail
