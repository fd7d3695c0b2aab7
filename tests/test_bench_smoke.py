"""The benchmarks' CPU modes run end to end: the 7B QLoRA benchmark's --tiny
mode, and the linear-layer benchmark's code path with tiny shapes (the
lowbit and bf16+PEFT layers are built, timed and written out as on the GPU;
bitsandbytes is timed on CUDA only, so its rows are skipped with a note), and
the FSDP2 benchmark's launcher: its CPU path and its verdicts on failed runs."""
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def test_bench_qlora7b_tiny(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "r.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "python"), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_qlora7b.py"), "--tiny", "--impl",
                        "lowbit", "--steps", "2", "--warmup", "1", "--options", "plain,ce+offload", "--json", str(out)],
                       capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| lowbit | plain | 1x32 |" in r.stdout and "| lowbit | ce+offload | 2x64 |" in r.stdout
    import json

    d = json.loads(out.read_text())
    assert [(row["options"], row["config"]) for row in d["rows"]] == [
        ("plain", "1x32"), ("plain", "2x64"), ("ce+offload", "1x32"), ("ce+offload", "2x64")]
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


# ---------------------------------------------------------------- bench_fsdp: the launcher and its verdicts

def test_bench_fsdp_tiny_runs_plain_and_offloaded(tmp_path):
    """The FSDP2 benchmark's CPU path (gloo, tiny shapes): one process plain and
    one under fully_shard with CPUOffloadPolicy (the launcher, the worker, the
    per-step records and the table). Two processes and bitsandbytes are left to
    the GPU run: each extra configuration costs ~10 s of interpreter start-up."""
    out = tmp_path / "fsdp"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "python"), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, os.path.join(BENCH, "bench_fsdp.py"), "--tiny", "--gpus", "1",
                        "--impl", "lowbit", "--cpu-offload", "--steps", "1", "--warmup", "1", "--out", str(out),
                        "--json", str(tmp_path / "s.json")], capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert [(x["config"], x["status"]) for x in rows] == [("lowbit_w1", "ran"), ("lowbit_w1_offload", "ran")], rows
    for x in rows:
        assert x["steps_done"] == 2 and x["tokens_per_s_total"] > 0 and x["optimizer"] == "lowbit PagedAdamW8bit"
    assert rows[0]["losses"] == rows[1]["losses"]  # offloading moves bytes, not values
    assert "| lowbit | 1 | yes | lowbit PagedAdamW8bit | ran |" in r.stdout
    for line in (out / "lowbit_w1_offload_rank0.steps.jsonl").read_text().splitlines():
        ev = json.loads(line)
        assert ev["event"] in ("built", "setup", "step") and ev.get("finite", True)


def _steps(*finite):
    return [{"event": "step", "step": i + 1, "finite": f} for i, f in enumerate(finite)]


def test_bench_fsdp_verdicts():
    bf = _load("bench_fsdp")
    ok = [_steps(True, True, True)] * 2
    assert bf.classify(0, False, ok, "", 60)[0] == "ran"
    nan = [_steps(True, True, True), _steps(True, False, False)]
    assert bf.classify(0, False, nan, "", 60)[:2] == ("NaN at step 2", 2)
    err = [_steps(True) + [{"event": "error", "error": "RuntimeError: boom"}], _steps(True, True)]
    assert bf.classify(1, False, err, "", 60)[0] == "crashed at step 1: RuntimeError: boom"
    assert bf.classify(-9, True, [_steps(True, False), _steps(True)], "", 60)[0] == \
        "timed out after 60 s (at step 1, NaN at step 2)"
    # A rank killed by the driver writes no error event: the log names the cause.
    log = "\n".join([
        "[rank1]:[E1127 10:00:00.0 ProcessGroupNCCL.cpp:1] [PG 0 Rank 1] Process group watchdog thread terminated",
        "[rank0]: Traceback (most recent call last):",
        '[rank0]:   File "bench_fsdp.py", line 1, in <module>',
        "[rank0]:     raise RuntimeError('x')",
        "[rank0]: torch.AcceleratorError: CUDA error: an illegal memory access was encountered",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
        "  exitcode  : 1 (pid: 7)",
    ])
    status = bf.classify(1, False, [_steps(True), []], log, 60)[0]
    assert status == "crashed at step 0: torch.AcceleratorError: CUDA error: an illegal memory access was encountered"
    assert bf.last_error_line("Fatal Python error\nSignal 11 (SIGSEGV) received by PID 12\n") == \
        "Signal 11 (SIGSEGV) received by PID 12"


def test_bench_fsdp_timeout_kills_the_whole_process_group(tmp_path):
    bf = _load("bench_fsdp")
    pidfile = tmp_path / "child.pid"
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
            "time.sleep(120)\n")
    rc, timed_out = bf.run_group([sys.executable, "-c", code], dict(os.environ), str(tmp_path / "log"), 3)
    assert timed_out
    child = int(pidfile.read_text())
    state = None
    for _ in range(100):  # a killed process takes a moment to exit
        try:
            with open(f"/proc/{child}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.05)
    pytest.fail(f"the worker's child {child} survived the timeout (state {state})")


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
