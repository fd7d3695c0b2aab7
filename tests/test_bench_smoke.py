"""The 7B QLoRA benchmark's --tiny mode runs end to end (on the CPU without a GPU)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def test_bench_qlora7b_tiny(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "r.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "python"), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_qlora7b.py"), "--tiny", "--impl",
                        "lowbit", "--steps", "2", "--warmup", "1", "--json", str(out)],
                       capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| lowbit | 1x32 |" in r.stdout and "| lowbit | 2x64 |" in r.stdout
    import json

    d = json.loads(out.read_text())
    assert [row["config"] for row in d["rows"]] == ["1x32", "2x64"]
    assert all(row["tokens_per_s"] > 0 and not row["oom"] for row in d["rows"])
    assert all(row["planned_peak"] > 0 for row in d["rows"])
