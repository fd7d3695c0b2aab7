"""Two-process (gloo, CPU) harness shared by the distributed tests.

A test module doubles as its own worker script: `launch(__file__, mode, out)`
starts WORLD copies of it with a torchrun-style environment, waits for them
with a timeout, kills them on failure and returns what each rank saved to
out/rank{r}.pt; the module's `if __name__ == "__main__"` calls
`run_worker(workers)` to join the process group and run workers[mode].
"""
import os
import socket
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

PYTHON_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script, mode, out, world=2, timeout_s=90):
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE=str(world), CUDA_VISIBLE_DEVICES="",
                   OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(p for p in (PYTHON_DIR, os.environ.get("PYTHONPATH")) if p))
        if sys.platform.startswith("linux"):
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only: containers' hostnames may not resolve
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(script), mode, str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout_s)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"workers of {os.path.basename(script)} ({mode}) did not finish within {timeout_s} s (a hang?)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} ({mode}) exited with {p.returncode}:\n{text[-4000:]}"
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def run_worker(workers):
    """The worker side: sys.argv = [script, mode, out]."""
    mode, out = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        workers[mode](rank, out)
    finally:
        dist.destroy_process_group()
