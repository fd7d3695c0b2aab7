"""Durability of what lowbit writes: a save that fails half way leaves the
previous file whole and loadable, with no temporary file behind; and a
lowbit-finetune run killed with SIGKILL after a checkpoint resumes to exactly
the result of an uninterrupted run.

The resumed run is bit-identical with LoRA dropout on: the checkpoint holds
the adapters, the optimizer and scheduler states, the step, the losses and
torch's random generator states (which draw the dropout masks), and the
batches are a function of (seed, step).
"""
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit import finetune
from lowbit.optim import AdamW8bit

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
from test_finetune import tiny  # noqa: E402,F401  (the module-scoped tiny-Llama fixture)

PYTHON_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python")


def _temp_files(d):
    return [f for f in os.listdir(d) if f.startswith(".tmp-")]


# ---------------------------------------------------------------- (a) a save interrupted mid-write


def _small_training_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    lowbit.quantize_model(model, lora_r=4, skip_modules=(), compute_dtype=torch.float32, progress=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = AdamW8bit(params, lr=1e-2, min_8bit_size=0)
    sched = finetune.make_scheduler(opt, 10, 0.1)

    def step():
        model(torch.randn(8, 64)).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    return model, opt, sched, step


def _fail_after_partial_write(real_write, exc):
    """A writer that writes the whole file, cuts it in half, then raises."""

    def write(obj, path, *a, **kw):
        real_write(obj, path, *a, **kw)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise exc

    return write


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "ctrl-c"])
def test_interrupted_checkpoint_save_keeps_the_previous_one(tmp_path, monkeypatch, exc):
    model, opt, sched, step = _small_training_state()
    path = str(tmp_path / finetune.CHECKPOINT_NAME)
    step()
    finetune.save_checkpoint(path, model, opt, sched, 1, [1.0], {"model": "m"})
    good = open(path, "rb").read()
    saved_a = {k: v.clone() for k, v in finetune.adapter_tensors(model).items()}
    step()
    monkeypatch.setattr(torch, "save", _fail_after_partial_write(torch.save, exc))
    with pytest.raises(type(exc)):
        finetune.save_checkpoint(path, model, opt, sched, 2, [1.0, 0.9], {"model": "m"})
    monkeypatch.undo()
    assert open(path, "rb").read() == good
    assert _temp_files(tmp_path) == []
    # ... and it loads: the step-1 adapters come back
    model2, opt2, sched2, _ = _small_training_state()
    at, losses = finetune.load_checkpoint(path, model2, opt2, sched2, {"model": "m"})
    assert (at, losses) == (1, [1.0])
    for k, v in finetune.adapter_tensors(model2).items():
        assert torch.equal(v, saved_a[k])


def test_checkpoint_restores_the_random_generator(tmp_path, capsys):
    """The dropout masks after a resume are the ones the saved run would have drawn next."""
    model, opt, sched, step = _small_training_state()
    path = str(tmp_path / finetune.CHECKPOINT_NAME)
    step()
    finetune.save_checkpoint(path, model, opt, sched, 1, [1.0], {"model": "m"})
    want = torch.rand(8)
    torch.manual_seed(123)  # a fresh process would start elsewhere
    model2, opt2, sched2, _ = _small_training_state()
    finetune.load_checkpoint(path, model2, opt2, sched2, {"model": "m"})
    assert torch.equal(torch.rand(8), want)

    # A checkpoint without the state (written before it was saved) still resumes, with a note.
    ckpt = torch.load(path, weights_only=True)
    del ckpt["rng"]
    torch.save(ckpt, path)
    assert finetune.load_checkpoint(path, model2, opt2, sched2, {"model": "m"}) == (1, [1.0])
    assert "no random generator state" in capsys.readouterr().out
    ckpt["rng"] = {"cpu": torch.zeros(3, dtype=torch.uint8)}
    torch.save(ckpt, path)
    with pytest.raises(finetune.FinetuneError, match=r"unusable random generator state"):
        finetune.load_checkpoint(path, model2, opt2, sched2, {"model": "m"})


def test_interrupted_adapter_save_keeps_the_previous_one(tmp_path, monkeypatch):
    import safetensors.torch

    model, opt, sched, step = _small_training_state()
    step()
    d = str(tmp_path / "adapter")
    lowbit.save_adapter(model, d)
    files = {f: open(os.path.join(d, f), "rb").read() for f in os.listdir(d)}
    step()
    monkeypatch.setattr(safetensors.torch, "save_file",
                        _fail_after_partial_write(safetensors.torch.save_file, OSError(5, "Input/output error")))
    with pytest.raises(OSError, match="Input/output error"):
        lowbit.save_adapter(model, d)
    monkeypatch.undo()
    assert {f: open(os.path.join(d, f), "rb").read() for f in os.listdir(d)} == files
    assert _temp_files(d) == []
    model2, *_ = _small_training_state()
    assert len(lowbit.load_adapter(model2, d)) == 2


# ---------------------------------------------------------------- (b) SIGKILL, then --resume


def _argv(tiny, out, steps, *extra):  # noqa: F811
    return ["--model", tiny["model"], "--data", tiny["data"], "--output", str(out), "--device", "cpu",
            "--seq-len", "32", "--batch-size", "4", "--eval-seqs", "2", "--lr", "5e-3", "--lora-dropout", "0.1",
            "--steps", str(steps), "--save-every", "2", "--seed", "3", *extra]


def _final(out):
    ckpt = torch.load(os.path.join(out, finetune.CHECKPOINT_NAME), weights_only=True)
    from safetensors.torch import load_file

    return ckpt, load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


def _kill_after_first_checkpoint(argv, ckpt_path, timeout=60.0):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([PYTHON_DIR, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "lowbit.finetune", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        t_end = time.monotonic() + timeout
        while not os.path.exists(ckpt_path):
            if proc.poll() is not None:
                pytest.fail(f"lowbit.finetune exited ({proc.returncode}) before its first checkpoint:\n"
                            f"{proc.stderr.read()[-2000:]}")
            if time.monotonic() > t_end:
                pytest.fail("no checkpoint within the time limit")
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    return proc.returncode


def test_sigkill_then_resume_equals_an_uninterrupted_run(tiny, tmp_path, capsys):  # noqa: F811
    steps = 6
    whole = tmp_path / "whole"
    assert finetune.main(_argv(tiny, whole, steps)) == 0
    ref_ckpt, ref_adapter = _final(whole)
    assert ref_ckpt["step"] == steps and len(ref_ckpt["losses"]) == steps

    cut = tmp_path / "cut"
    rc = _kill_after_first_checkpoint(_argv(tiny, cut, steps), str(cut / finetune.CHECKPOINT_NAME))
    assert rc == -signal.SIGKILL, f"the run ended by itself (status {rc}) before it was killed"
    killed_at = torch.load(cut / finetune.CHECKPOINT_NAME, weights_only=True)["step"]
    assert 0 < killed_at < steps
    # (a kill during a save may leave a .tmp- file beside it; the real name is always whole)
    capsys.readouterr()

    assert finetune.main(_argv(tiny, cut, steps, "--resume")) == 0
    assert f"resuming from step {killed_at}" in capsys.readouterr().out
    ckpt, adapter = _final(cut)
    assert ckpt["step"] == steps
    assert ckpt["losses"] == ref_ckpt["losses"]  # bit-identical floats, step by step
    assert all(math.isfinite(x) for x in ckpt["losses"])
    assert ckpt["adapter"].keys() == ref_ckpt["adapter"].keys()
    for k in ref_ckpt["adapter"]:
        assert torch.equal(ckpt["adapter"][k], ref_ckpt["adapter"][k]), k
    assert adapter.keys() == ref_adapter.keys()
    for k in ref_adapter:
        assert torch.equal(adapter[k], ref_adapter[k]), k
    for i, st in ref_ckpt["optimizer"]["state"].items():
        for name, t in st.items():
            assert torch.equal(ckpt["optimizer"]["state"][i][name], t), (i, name)
    assert ckpt["scheduler"] == ref_ckpt["scheduler"]
