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
    """

    def __init__(self, step_fn: Callable[..., Optional[torch.Tensor]], optimizer: Optional[torch.optim.Optimizer] = None,
                 *, warmup: int = 3, enabled: bool = True):
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
            return self._eager_on_side_stream(tensors)
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

    def _eager_on_side_stream(self, tensors):
        # Warm-up off the default stream, as capture requires of lazily
        # initialised libraries (cuBLAS workspaces, autograd's streams).
        if self._side is None:
            self._side = torch.cuda.Stream(device=tensors[0].device if tensors else None)
        cur = torch.cuda.current_stream()
        self._side.wait_stream(cur)
        with torch.cuda.stream(self._side):
            out = self.step_fn(*tensors)
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
        if getattr(opt, "prefetch", None) is not None and hasattr(opt, "_prefetch_pending"):
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
                "with the host (.item(), .cpu(), printing a tensor, data-dependent Python branches) or change "
                "shapes; run it eagerly with enabled=False to find the culprit") from e
        self.graph = graph
