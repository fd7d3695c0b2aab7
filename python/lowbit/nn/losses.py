"""Memory-lean pieces for training causal language models: a cross-entropy
that never holds the full logits, and offloading of saved activations to
host memory."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn

DEFAULT_CHUNK_SIZE = 1024


class _ChunkedCrossEntropy(torch.autograd.Function):
    # Forward keeps only hidden, the labels and one float32 logsumexp per
    # token; backward recomputes each chunk's logits from them.

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, ignore_index):
        n = hidden.shape[0]
        valid = labels != ignore_index
        count = valid.sum()
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            logits = (hidden[s:e] @ weight.t()).float()
            lse[s:e] = torch.logsumexp(logits, dim=-1)
            target = logits.gather(1, safe[s:e, None]).squeeze(1)
            total += ((lse[s:e] - target) * valid[s:e]).sum()
            del logits
        ctx.save_for_backward(hidden, weight, safe, valid, lse, count)
        ctx.chunk_size = chunk_size
        # No target at all: loss 0 (not F.cross_entropy's 0/0 = NaN), zero gradients.
        return total / count.clamp(min=1)

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, safe, valid, lse, count = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = hidden.shape[0]
        scale = grad_loss.float() / count.clamp(min=1)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        rows = torch.arange(min(ctx.chunk_size, n), device=hidden.device)
        for s in range(0, n, ctx.chunk_size):
            e = min(s + ctx.chunk_size, n)
            # d loss / d logits = (softmax - onehot(target)) * valid * scale, built in place.
            g = (hidden[s:e] @ weight.t()).float()
            g.sub_(lse[s:e, None]).exp_()
            g[rows[: e - s], safe[s:e]] -= 1.0
            g.mul_((valid[s:e].float() * scale)[:, None])
            g = g.to(hidden.dtype)
            if need_h:
                grad_h[s:e] = g @ weight
            if need_w:
                grad_w += (g.t() @ hidden[s:e]).float()
            del g
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy of the logits `hidden @ weight.T` against `labels`,
    computed `chunk_size` tokens at a time so that the [tokens, vocab] logits
    never exist in full.

    Args:
        hidden: [..., H] final hidden states (after the last norm), any float dtype.
        weight: [V, H] output projection (lm_head.weight; a tied embedding works).
        labels: [...] int64 target ids (same leading shape as hidden), already
            aligned with hidden (for a causal LM: shifted, see causal_lm_loss);
            `ignore_index` marks tokens without a target.
        chunk_size: tokens per chunk; memory is about 12 * chunk_size * V bytes
            on top of hidden.

    Each chunk's logits are computed in hidden's dtype (fp32 accumulation, as
    nn.Linear does) and upcast to float32, as Hugging Face models do before
    their loss; logsumexp and the target logit are taken in float32. Forward
    keeps hidden, the labels and one float32 logsumexp per token; backward
    recomputes each chunk's logits and returns the gradient for hidden, and for
    weight only when weight requires grad (accumulated in float32). The result
    equals F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)
    within rounding, except that a batch whose labels are all `ignore_index`
    gives 0 with zero gradients instead of NaN.
    """
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [vocab, hidden], got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden's last dimension is {hidden.shape[-1]} but weight is {tuple(weight.shape)} "
                         f"([vocab, hidden])")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 (or int32), got {labels.dtype}")
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(device=h.device, dtype=torch.int64)
    if not (y.is_cuda and torch.cuda.is_current_stream_capturing()):
        # Reading the check's result waits for the GPU: skipped inside a CUDA
        # graph capture (lowbit.CUDAGraphStep), where the eager warm-up steps
        # have checked the same code path.
        bad = (y != ignore_index) & ((y < 0) | (y >= weight.shape[0]))
        if bool(bad.any()):
            v = int(y[bad][0])
            raise ValueError(f"labels hold {v}, outside [0, {weight.shape[0]}) and not ignore_index={ignore_index}")
    w = weight if weight.dtype == h.dtype else weight.to(h.dtype)
    return _ChunkedCrossEntropy.apply(h, w, y, chunk_size, ignore_index)


def causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int = -100,
    **model_kwargs,
) -> torch.Tensor:
    """The causal-LM loss of a Hugging Face *ForCausalLM model (Llama and
    alike) without its full logits: runs the base model
    (`model.get_decoder()` or `model.model`) for the final hidden states and
    applies chunked_cross_entropy with the output embedding's weight.

    `labels` default to `input_ids`; like Hugging Face's loss, token t predicts
    labels[t + 1] (labels are shifted here, padded with `ignore_index`) and the
    mean runs over the tokens with a target. Tied embeddings work (the weight
    is the embedding's); a frozen 16-bit lm_head gets no gradient; an lm_head
    converted to lowbit's Linear4bit (without adapters) is dequantized for
    the loss. Extra keyword arguments (attention_mask, ...) go to the base model.
    """
    from .linear4bit import Linear4bit

    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else getattr(model, "lm_head",
                                                                                                   None)
    if base is None or head is None:
        raise ValueError(f"causal_lm_loss needs a *ForCausalLM model with a base model and an output embedding; "
                         f"{type(model).__name__} has base={type(base).__name__}, lm_head={type(head).__name__}")
    if isinstance(head, Linear4bit):
        if head.lora_A is not None:
            raise ValueError("causal_lm_loss: lm_head is a Linear4bit with LoRA adapters; merge or drop them "
                             "(or use the model's own loss)")
        weight = head.dequantized_weight()
    else:
        weight = head.weight
    if getattr(head, "bias", None) is not None:
        raise ValueError("causal_lm_loss: lm_head has a bias, which chunked_cross_entropy does not take")
    out = base(input_ids=input_ids, **model_kwargs)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    if labels is None:
        labels = input_ids
    shifted = torch.full_like(labels, ignore_index)
    shifted[..., :-1] = labels[..., 1:]
    return chunked_cross_entropy(hidden, weight, shifted.to(hidden.device), chunk_size, ignore_index)


class _Offloaded:
    __slots__ = ("host", "device", "event")

    def __init__(self, host, device, event):
        self.host, self.device, self.event = host, device, event


@contextlib.contextmanager
def offload_activations(min_bytes: int = 1 << 20, pin_memory: bool = True):
    """Moves the tensors autograd saves for backward (inside the block) to host
    memory when they are CUDA tensors of at least `min_bytes`, and brings them
    back when backward needs them.

    On CUDA the copy to the host runs on a side stream (ordered after the work
    that produced the tensor, into pinned memory when `pin_memory`), and the
    device memory goes back to the caching allocator as soon as the copy is
    done (record_stream); backward waits for that copy, then copies the tensor
    back on the current stream. Smaller tensors, CPU tensors, floating-point
    leaves (parameters, frozen weights, constants: they stay on the GPU anyway)
    and anything saved outside the block are kept as they are, so on a CPU-only machine the
    context changes nothing. Gradients are identical with and without it.

    With gradient checkpointing (non-reentrant), wrapping the forward offloads
    each checkpointed layer's inputs, which is most of what the model keeps;
    the recomputed tensors of one layer stay on the GPU.
    """
    if min_bytes < 0:
        raise ValueError(f"min_bytes must be >= 0, got {min_bytes}")
    streams = {}

    def pack(t: torch.Tensor):
        if t.device.type != "cuda" or t.numel() * t.element_size() < min_bytes or t.layout != torch.strided:
            return t
        if t.grad_fn is None and t.is_floating_point():
            # A floating-point leaf is a parameter, a frozen weight or a
            # constant: it stays on the GPU anyway, copying it would only cost.
            return t
        side = streams.get(t.device)
        if side is None:
            side = streams[t.device] = torch.cuda.Stream(device=t.device)
        host = torch.empty(t.shape, dtype=t.dtype, layout=t.layout, pin_memory=pin_memory)
        if not t.is_contiguous():
            t = t.contiguous()
        side.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(side):
            host.copy_(t, non_blocking=pin_memory)
            event = torch.cuda.Event()
            event.record(side)
        # The allocator may hand t's memory out again only after the copy.
        t.record_stream(side)
        return _Offloaded(host, t.device, event)

    def unpack(packed):
        if not isinstance(packed, _Offloaded):
            return packed
        stream = torch.cuda.current_stream(packed.device)
        stream.wait_event(packed.event)
        return packed.host.to(packed.device, non_blocking=pin_memory)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


__all__ = ["causal_lm_loss", "chunked_cross_entropy", "offload_activations"]
