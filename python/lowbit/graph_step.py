"""CUDAGraphStep: a whole training step (forward, backward, optimizer step)
captured once into a CUDA graph and replayed.

A QLoRA step on short sequences is bound by the host, not the GPU: a 7B
model at 1x512 tokens issues about seven thousand kernel launches through
Python, autograd and the dispatcher, and the GPU waits for them. Replaying a
captured graph launches the same kernels with one call. Every lowbit op is
capturable (no host synchronization, buffers from the caching allocator) and
the 8-bit optimizers read the learning rate and step counts on the GPU, so
the whole step can be captured, gradient checkpointing and LoRA dropout
included (the dropout masks are new at every replay).

    step = lowbit.CUDAGraphStep(train_step, optimizer)
    for batch in loader:                      # the same shapes every step
        loss = step(batch["input_ids"])       # first calls eager, then replays

where ``train_step(*tensors)`` runs the forward pass, ``loss.backward()`` and
``optimizer.step()`` and returns the loss. What a replay does and does not do:

* Only GPU work is replayed. Python-side effects inside ``train_step``
  (printing, counters, an LR scheduler's step, a ``.item()``) happen once, at
  capture; keep them outside. ``train_step`` must not synchronize with the
  host (no ``.item()``, no data-dependent Python branching on GPU values).
* The tensors passed in are copied into the graph's static inputs; every call
  must pass the same number of tensors with the same shapes, dtypes and
  device (pad batches to one length). A different shape raises ValueError.
* Gradients are set to None before capture, so backward writes them into the
  graph's memory; one replay is one full optimizer step (accumulate micro-
  batches inside ``train_step`` if you need to).
* The optimizer's float learning rates become CUDA scalar tensors (in place
  in ``param_groups``), so LR schedulers keep working: they fill the tensor,
  and the captured optimizer kernel reads it at each replay.
* PagedAdamW8bit stops prefetching (``prefetch="never"``) once captured: a
  prefetch is a host decision per step; the driver still migrates the
  managed pages on demand.
* The returned loss is a copy, safe to keep across steps.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

__all__ = ["CUDAGraphStep"]


def _signature(tensors: Sequence[torch.Tensor]):
    return tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)


class CUDAGraphStep:
    """Runs ``step_fn(*tensors)`` eagerly ``warmup`` times, then captures it into
    a CUDA graph and replays the graph on every later call.

    Args:
        step_fn: one training step on the given tensors; returns the loss (a
            tensor) or None.
        optimizer: the optimizer ``step_fn`` steps. Its float learning rates
            are turned into CUDA tensors (schedulers keep working), and a
            paged optimizer stops prefetching once captured.
        warmup: eager calls before capture (>= 1): they create the optimizer
            state and let cuBLAS and the caching allocator settle. They are
            real training steps on the real inputs.
        enabled: False runs every call eagerly (the same code path without a
            GPU, or for debugging).
        check_sync: run the last warm-up call (with warmup >= 2) under
            torch.cuda.set_sync_debug_mode("error"), so that an operation that
            waits for the GPU raises there, with its own traceback, before
            any capture is attempted (a capture that fails part-way leaves
            PyTorch's CUDA random generator in a capturing state, so later
            random ops in the process fail). Off by default: libraries may
            synchronize only outside a capture (transformers' mask helpers
            check their inputs eagerly and skip the check while a stream is
            capturing), which this eager check cannot tell apart; switch it
            on to vet a step function of your own.
    """

    def __init__(self, step_fn: Callable[..., Optional[torch.Tensor]], optimizer: Optional[torch.optim.Optimizer] = None,
                 *, warmup: int = 3, enabled: bool = True, check_sync: bool = False):
        if not callable(step_fn):
            raise TypeError(f"CUDAGraphStep: step_fn must be callable, got {type(step_fn).__name__}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"CUDAGraphStep: warmup must be an int >= 1, got {warmup!r}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"CUDAGraphStep: optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        self.step_fn = step_fn
        self.optimizer = optimizer
        self.warmup = warmup
        self.enabled = bool(enabled)
        self.check_sync = bool(check_sync)
        self.calls = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self._static_in: list = []
        self._static_out = None
        self._sig = None
        self._side: Optional[torch.cuda.Stream] = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    # ---------------------------------------------------------------- calls

    def __call__(self, *tensors: torch.Tensor):
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"CUDAGraphStep: argument {i} must be a tensor, got {type(t).__name__}")
        self.calls += 1
        if not self.enabled:
            return self._detach(self.step_fn(*tensors))
        for i, t in enumerate(tensors):
            if t.device.type != "cuda":
                raise ValueError(f"CUDAGraphStep: argument {i} is on {t.device}; a CUDA graph replays GPU work only "
                                 f"(move the batch to the GPU, or pass enabled=False)")
        sig = _signature(tensors)
        if self._sig is None:
            self._sig = sig
        elif sig != self._sig:
            raise ValueError(
                "CUDAGraphStep: the inputs changed shape, dtype or device since the first call "
                f"({self._describe(self._sig)} -> {self._describe(sig)}); a captured graph replays fixed shapes: pad "
                "every batch to the same length, or run the odd batch through step_fn directly")
        if self.graph is not None:
            for dst, src in zip(self._static_in, tensors):
                dst.copy_(src, non_blocking=True)
            self.graph.replay()
            return self._detach(self._static_out, clone=True)
        if self.calls <= self.warmup:
            check = self.check_sync and self.calls == self.warmup and self.warmup >= 2
            return self._eager_on_side_stream(tensors, check)
        self._capture(tensors)
        self.graph.replay()
        return self._detach(self._static_out, clone=True)

    # ---------------------------------------------------------------- internals

    @staticmethod
    def _describe(sig):
        return ", ".join(f"{list(s)} {str(d).replace('torch.', '')}" for s, d, _ in sig) or "no tensors"

    @staticmethod
    def _detach(out, clone=False):
        if isinstance(out, torch.Tensor):
            out = out.detach()
            return out.clone() if clone else out
        return out

    def _eager_on_side_stream(self, tensors, check_sync=False):
        # Warm-up off the default stream, as capture requires of lazily
        # initialised libraries (cuBLAS workspaces, autograd's streams).
        if self._side is None:
            self._side = torch.cuda.Stream(device=tensors[0].device if tensors else None)
        cur = torch.cuda.current_stream()
        self._side.wait_stream(cur)
        mode = torch.cuda.get_sync_debug_mode()
        try:
            with torch.cuda.stream(self._side):
                if check_sync:
                    torch.cuda.set_sync_debug_mode("error")
                out = self.step_fn(*tensors)
        except RuntimeError as e:
            if check_sync and "synchronizing" in str(e).lower():
                raise RuntimeError(
                    f"CUDAGraphStep: step_fn waits for the GPU ({e}); such an operation cannot be captured into a CUDA "
                    "graph. Remove it from the step (.item(), .cpu(), printing a tensor, a blocking host-to-device "
                    "copy, data-dependent Python branches), or pass check_sync=False if you are sure") from e
            raise
        finally:
            torch.cuda.set_sync_debug_mode(mode)
            cur.wait_stream(self._side)
        return self._detach(out)

    def _prepare_optimizer(self):
        opt = self.optimizer
        if opt is None:
            return
        for gi, group in enumerate(opt.param_groups):
            lr = group.get("lr")
            if lr is None or isinstance(lr, torch.Tensor) and lr.is_cuda:
                continue
            dev = next((p.device for p in group["params"] if p.is_cuda), None)
            if dev is None:
                raise ValueError(f"CUDAGraphStep: optimizer param group {gi} has no CUDA parameter")
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=dev)
        from .optim import AdamW8bit

        if isinstance(opt, AdamW8bit):  # PagedAdamW8bit's prefetch is a per-step host decision
            opt.prefetch = "never"
        opt.zero_grad(set_to_none=True)

    def _capture(self, tensors):
        self._prepare_optimizer()
        self._static_in = [t.detach().clone() for t in tensors]
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._static_out = self.step_fn(*self._static_in)
        except Exception as e:
            raise RuntimeError(
                f"CUDAGraphStep: capturing the step failed ({type(e).__name__}: {e}). The step must not synchronize "
                "with the host (.item(), .cpu(), printing a tensor, data-dependent Python branches), allocate pinned "
                "host memory or change shapes; run it eagerly with enabled=False to find the culprit. PyTorch's CUDA "
                "random generator stays in capture mode after a failed capture: restart the process before "
                "training on") from e
        self.graph = graph
