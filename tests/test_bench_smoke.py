"""The benchmarks' CPU modes run end to end: the 7B QLoRA benchmark's --tiny
mode, and the linear-layer benchmark's code path with tiny shapes (the
lowbit and bf16+PEFT layers are built, timed and written out as on the GPU;
bitsandbytes is timed on CUDA only, so its rows are skipped with a note)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

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


BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")


def _load(name):
    sys.path.insert(0, BENCH)
    try:
        spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, name + ".py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(BENCH)


def test_linear_smoke_through_bench_entry_point(tmp_path, capsys, monkeypatch):
    bench = _load("bench")
    out = tmp_path / "linear.json"
    monkeypatch.syspath_prepend(BENCH)
    bench.main(["--mode", "linear", "--json", str(out), "--", "--smoke"])
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    rows = data["rows"]
    have_peft = importlib.util.find_spec("peft") is not None
    impls = {"lowbit"} | ({"bf16+peft"} if have_peft else set())
    assert {r["impl"] for r in rows} == impls
    assert not [r for r in rows if "error" in r]
    assert len(rows) == len(impls) * 2  # one shape, two token counts, one rank
    for r in rows:
        for k in ("fwd_ms", "fwdbwd_ms", "host_ms", "host_fwd_ms"):
            assert r[k] > 0, (k, r)
        assert r["device_ms"] is None  # no device time off the GPU
    assert data["meta"]["smoke"] and data["meta"]["card"] == "cpu"
    assert any("bnb+peft skipped" in n for n in data["meta"]["notes"])
    assert "| shape | tokens | r | impl |" in text and "| 96x64 | 1x8 | 4 | lowbit |" in text


def test_linear_layers_compute_the_same_function():
    """The layers the benchmark times agree with one another (same weight,
    same LoRA), so the columns compare like with like."""
    bl = _load("bench_linear")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    w = (torch.randn(96, 64) * 0.05).to(torch.bfloat16)
    lowbit_layer = bl.build_layer("lowbit", w, 4, torch.device("cpu"), {}, torch.bfloat16)
    peft_layer = bl.build_layer("bf16+peft", w, 4, torch.device("cpu"), {"peft": peft}, torch.bfloat16)
    a, b = torch.randn(4, 64) * 0.1, torch.randn(96, 4) * 0.1
    with torch.no_grad():
        lowbit_layer.lora_A.copy_(a)
        lowbit_layer.lora_B.copy_(b)
        peft_layer.proj.lora_A["default"].weight.copy_(a)
        peft_layer.proj.lora_B["default"].weight.copy_(b)
    assert [p.shape for p in bl.trainable(lowbit_layer)] == [p.shape for p in bl.trainable(peft_layer)]
    x = torch.randn(2, 8, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        y1, y2 = lowbit_layer(x).float(), peft_layer(x).float()
    # NF4 error of the base weight bounds the difference
    assert (y1 - y2).abs().max() <= 0.1 * y2.abs().max(), (y1 - y2).abs().max()


def test_optim_host_through_bench_entry_point(tmp_path, capsys, monkeypatch):
    bench = _load("bench")
    out = tmp_path / "h.json"
    monkeypatch.syspath_prepend(BENCH)
    threads = torch.get_num_threads()
    bench.main(["--mode", "optim-host", "--json", str(out), "--", "--tensors", "8", "--iters", "3", "--warmup", "1"])
    assert torch.get_num_threads() == threads
    d = json.loads(out.read_text())
    assert {(r["states"], r["row"]) for r in d["rows"]} == {(s, r) for s in ("float32", "8-bit")
                                                           for r in ("step", "python", "op")}
    assert "us/tensor" in capsys.readouterr().out
