"""CUDAGraphStep: a captured training step trains exactly like the eager one."""
import pytest
import torch

import lowbit
from lowbit import CUDAGraphStep

from conftest import HAS_CUDA

cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")


def _tiny_llama(device, seed, dropout=0.0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=256, max_position_embeddings=256,
                                   attn_implementation="sdpa", use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    lowbit.quantize_model(model, lora_r=4, lora_alpha=8, lora_dropout=dropout, device=device, progress=False)
    model.to(device)
    with torch.no_grad():  # non-zero B, so every adapter gradient is non-trivial from step 1
        for m in model.modules():
            if isinstance(m, lowbit.Linear4bit) and m.lora_B is not None:
                m.lora_B.normal_(0, 0.02)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _trainer(model, opt_cls):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = opt_cls(params, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))  # the lr changes every step

    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return opt, sched, step


@cuda_only
@pytest.mark.parametrize("opt_cls", [lowbit.optim.AdamW8bit, lowbit.optim.PagedAdamW8bit])
def test_graphed_steps_equal_eager_steps(opt_cls):
    """Same model, same batches, same LR schedule: the losses and the adapters
    after 7 steps (2 eager warm-up, capture, 4 replays) equal the eager run's."""
    batches = [torch.randint(0, 256, (2, 48), device="cuda") for _ in range(7)]
    runs = []
    for graphed in (False, True):
        model = _tiny_llama("cuda", seed=123)
        opt, sched, step = _trainer(model, opt_cls)
        gstep = CUDAGraphStep(step, opt, warmup=2) if graphed else step
        losses = []
        for ids in batches:
            losses.append(float(gstep(ids)))
            sched.step()
        if graphed:
            assert gstep.captured and isinstance(opt.param_groups[0]["lr"], torch.Tensor)
        adapters = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        runs.append((losses, adapters))
    (le, ae), (lg, ag) = runs
    assert le[0] > le[-1]  # it trains
    assert le == pytest.approx(lg, rel=1e-5, abs=1e-6)
    for a, b in zip(ae, ag):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@cuda_only
def test_dropout_masks_change_between_replays():
    model = _tiny_llama("cuda", seed=7, dropout=0.3)
    opt, _, step = _trainer(model, lowbit.optim.AdamW8bit)
    for g in opt.param_groups:
        g["lr"] = 0.0  # the weights stay put: only dropout can change the loss
    gstep = CUDAGraphStep(step, opt, warmup=1)
    ids = torch.randint(0, 256, (2, 48), device="cuda")
    losses = [float(gstep(ids)) for _ in range(5)]
    assert gstep.captured
    assert len(set(losses[1:])) == 4, losses  # replays draw new masks


@cuda_only
def test_shape_change_and_capture_failure_are_clear():
    model = _tiny_llama("cuda", seed=1)
    opt, _, step = _trainer(model, lowbit.optim.AdamW8bit)
    gstep = CUDAGraphStep(step, opt, warmup=1)
    gstep(torch.randint(0, 256, (2, 48), device="cuda"))
    with pytest.raises(ValueError, match=r"changed shape.*\[2, 48\] int64 -> \[2, 40\] int64.*pad every batch"):
        gstep(torch.randint(0, 256, (2, 40), device="cuda"))
    with pytest.raises(ValueError, match="argument 0 is on cpu"):
        gstep(torch.randint(0, 256, (2, 48)))

    def syncing_step(ids):
        loss = step(ids)
        if loss.item() > 1e9:  # a host synchronization: not capturable
            print("diverged")
        return loss

    # Caught in the last warm-up call, before any capture is attempted.
    bad = CUDAGraphStep(syncing_step, opt, warmup=2, check_sync=True)
    ids = torch.randint(0, 256, (2, 48), device="cuda")
    bad(ids)
    with pytest.raises(RuntimeError, match=r"step_fn waits for the GPU.*cannot be captured"):
        bad(ids)
    assert not bad.captured
    assert torch.cuda.get_sync_debug_mode() == 0  # restored


_FAILING_CAPTURE = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from lowbit import CUDAGraphStep
w = torch.ones(4, device="cuda", requires_grad=True)
def step(x):
    loss = (w * x).sum()
    if loss.item() > 1e9:
        pass
    return loss
g = CUDAGraphStep(step, warmup=2, check_sync=False)
x = torch.ones(4, device="cuda")
g(x); g(x)
try:
    g(x)
except RuntimeError as e:
    print("RAISED", e)
"""


@cuda_only
def test_failed_capture_message():
    # In a child process: a failed capture leaves torch's CUDA generator in
    # capture mode for the rest of the process.
    import os
    import subprocess
    import sys

    python_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python")
    r = subprocess.run([sys.executable, "-c", _FAILING_CAPTURE, python_dir], capture_output=True, text=True,
                       timeout=120)
    assert "RAISED CUDAGraphStep: capturing the step failed" in r.stdout, r.stdout + r.stderr
    assert "restart the process" in r.stdout


def test_disabled_runs_eagerly_on_cpu():
    model = _tiny_llama("cpu", seed=3)
    opt, _, step = _trainer(model, lowbit.optim.AdamW8bit)
    gstep = CUDAGraphStep(step, opt, enabled=False)
    ids = torch.randint(0, 256, (1, 16))
    losses = [float(gstep(ids)) for _ in range(3)]
    assert not gstep.captured and gstep.calls == 3
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(step_fn=3), TypeError, "step_fn must be callable"),
    (dict(warmup=0), ValueError, r"warmup must be an int >= 1, got 0"),
    (dict(warmup=True), ValueError, r"warmup must be an int >= 1, got True"),
    (dict(optimizer="adam"), TypeError, "optimizer must be a torch.optim.Optimizer, got str"),
])
def test_bad_arguments(kwargs, exc, msg):
    args = dict(step_fn=lambda x: x)
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        CUDAGraphStep(args.pop("step_fn"), **args)


def test_cpu_tensor_refused_when_enabled():
    gstep = CUDAGraphStep(lambda x: x.sum())
    with pytest.raises(ValueError, match=r"argument 0 is on cpu.*enabled=False"):
        gstep(torch.ones(3))
    with pytest.raises(TypeError, match="argument 1 must be a tensor, got int"):
        gstep(torch.ones(3), 4)
