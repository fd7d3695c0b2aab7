"""Memory planner for QLoRA training of Llama-like causal language models.

`plan_memory(config, batch_size=..., seq_len=...)` predicts what one training
step (forward, backward, optimizer step) of a model converted by
`lowbit.quantize_model` needs on the GPU, without touching a GPU, and says
whether it fits a card and what to change when it does not.

    lowbit-plan --config llama2-7b --batch-size 1 --seq-len 2048 --gpu-mem 24
    python -m lowbit.planner --config path/to/model --seq-len 4096 --json

The estimate is built from the tensors the step allocates, layer by layer
(see `plan_memory` for every formula), so it follows the model's shapes and
the options rather than a fitted curve. The constants below are the part that
is measured rather than derived: they are the calibration table, to be
checked against `benchmarks/bench_qlora7b.py` on a GPU and tuned there.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Dict, Optional, Sequence

import torch

from ._cli import positive_int

# ---------------------------------------------------------------- calibration table
# Every constant that is measured rather than derived lives here. After a GPU
# run of benchmarks/bench_qlora7b.py, compare its "planned" and "measured"
# columns and adjust these; the formulas in plan_memory stay as they are.

#: torch.cuda.memory_reserved / max_memory_allocated at the peak of a step:
#: the caching allocator rounds blocks up (to 512 B, 2 MiB segments for large
#: tensors) and keeps freed blocks that a later, larger request cannot reuse.
#: 1.1-1.2 is typical for training loops without expandable segments.
FRAGMENTATION = 1.15

#: Memory the CUDA context, the kernels of torch/cuBLAS/lowbit and NCCL-free
#: runtime take on the card outside torch's allocator (nvidia-smi shows it,
#: torch.cuda.memory_reserved does not). Counts only for `fits`.
CUDA_CONTEXT_BYTES = 600 * 2**20

#: cuBLAS / cuBLASLt workspaces and other small allocations made through the
#: caching allocator (so they are part of memory_allocated).
WORKSPACE_BYTES = 48 * 2**20

#: Multiplies the per-layer activation model (the tensors autograd saves in
#: one decoder layer plus the backward temporaries of that layer).
ACTIVATION_SCALE = 1.0

#: Bytes per token and vocabulary entry at the peak of an unchunked loss: in
#: backward the saved fp32 log-softmax (4), the fp32 gradient NLL writes into
#: (4) and the fp32 gradient of the logits log_softmax_backward returns (4).
#: (The forward peak, bf16 logits + fp32 upcast + fp32 log-softmax, is 10.)
LOGITS_BYTES_PER_TOKEN_VOCAB = 12

#: The same for one chunk of the chunked loss (lowbit.nn.chunked_cross_entropy):
#: 16-bit logits of the chunk (2), their fp32 copy turned into the softmax in
#: place (4), the 16-bit gradient (2), and the logsumexp temporaries (4).
CHUNK_BYTES_PER_TOKEN_VOCAB = 12

#: Saved tensors a model keeps on the GPU while offloading: the layer being
#: recomputed or copied plus the one prefetched/in flight.
OFFLOAD_LAYERS_RESIDENT = 2

#: Default chunk of tokens of the chunked loss (lowbit.nn.chunked_cross_entropy).
DEFAULT_CHUNK_SIZE = 1024

#: FSDP2: decoder layers whose parameters are gathered at once -- the one
#: running and the next, prefetched (forward and backward alike).
FSDP_GATHERED_LAYERS = 2

# ---------------------------------------------------------------- model configs

GIB = 2**30

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

PRESETS: Dict[str, Dict[str, Any]] = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False,
                      max_position_embeddings=4096),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000, tie_word_embeddings=False,
                       max_position_embeddings=4096),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False,
                       max_position_embeddings=4096),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                      max_position_embeddings=8192),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192),
}

_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")

_OPTIMIZERS = ("paged_adamw8bit", "adamw8bit", "adamw")

# lowbit.optim constants (kept equal to lowbit/optim/adamw.py)
_OPT_BLOCK = 256
_MIN_8BIT = 4096
_PAGE_MIN = 100_000
# Scales per nested (double-quantization) block: one FSDP2 record holds
# blocksize x this many weights (lowbit/nn/packed_weight.py).
_NESTED_BLOCKSIZE = 256


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The numbers of a Llama-like config the planner uses."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    max_position_embeddings: Optional[int] = None
    head_dim: Optional[int] = None
    name: str = "model"

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def linears(self):
        """(name, in_features, out_features) of one decoder layer's projections."""
        H, I, hd = self.hidden_size, self.intermediate_size, self.hd
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        return [("q_proj", H, q), ("k_proj", H, kv), ("v_proj", H, kv), ("o_proj", q, H),
                ("gate_proj", H, I), ("up_proj", H, I), ("down_proj", I, H)]


def load_config(config) -> ModelShape:
    """A ModelShape from a dict, a Hugging Face config object, a preset name,
    or a path to config.json or to a model directory holding one."""
    name = "model"
    if isinstance(config, ModelShape):
        return config
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if path in PRESETS:
            name, config = path, PRESETS[path]
        else:
            file = os.path.join(path, "config.json") if os.path.isdir(path) else path
            if not os.path.isfile(file):
                raise FileNotFoundError(
                    f"model config {path!r}: no such file or directory (nor a config.json inside it); "
                    f"give a config.json, a model directory, or a preset: {', '.join(sorted(PRESETS))}")
            try:
                with open(file, encoding="utf-8") as f:
                    config = json.load(f)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"model config {file!r}: cannot read it as JSON ({e})") from None
            if not isinstance(config, dict):
                raise ValueError(f"model config {file!r}: expected a JSON object, got {type(config).__name__}")
            name = os.path.basename(os.path.dirname(os.path.abspath(file))) or "model"
    elif not isinstance(config, dict):
        if hasattr(config, "to_dict"):
            name = getattr(config, "_name_or_path", "") or getattr(config, "model_type", "model") or "model"
            config = config.to_dict()
        else:
            raise TypeError(f"config must be a dict, a Hugging Face config, a preset name or a path, got "
                            f"{type(config).__name__}")
    # Multimodal wrappers keep the language model's numbers under text_config.
    if "hidden_size" not in config and isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    missing = [k for k in _REQUIRED if config.get(k) is None]
    if missing:
        raise ValueError(f"model config {name!r} lacks {missing}: the planner needs {list(_REQUIRED)} "
                         f"(a Llama-like config)")
    vals = {k: config[k] for k in _REQUIRED}
    vals["num_key_value_heads"] = config.get("num_key_value_heads") or vals["num_attention_heads"]
    for k, v in vals.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"model config {name!r}: {k} must be a positive integer, got {v!r}")
    head_dim = config.get("head_dim")
    return ModelShape(tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                      max_position_embeddings=config.get("max_position_embeddings"),
                      head_dim=head_dim if isinstance(head_dim, int) and head_dim > 0 else None, name=name, **vals)


# ---------------------------------------------------------------- byte formulas

def linear4bit_bytes(out_features: int, in_features: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes of one Linear4bit's frozen weight as lowbit stores it: packed
    codes ceil(N*K/2), one scale per block (uint8 with double quantization,
    else float32), and with double quantization one float32 nested absmax
    per 256 scales plus the float32 offset. (The 16- and 256-entry code
    tables are shared by all layers.)"""
    n = out_features * in_features
    nblocks = -(-n // blocksize)
    if not double_quant:
        return -(-n // 2) + 4 * nblocks
    return -(-n // 2) + nblocks + 4 * -(-nblocks // 256) + 4


def linear4bit_shard_bytes(out_features: int, in_features: int, world_size: int, blocksize: int = 64,
                           double_quant: bool = True) -> Dict[str, int]:
    """One Linear4bit weight under lowbit.distributed.shard_model (FSDP2):
    {'records': bytes of all records, 'local': the largest rank's shard (rank 0
    holds ceil(U/world) of the U records), 'gathered': the all-gather output
    (world x that shard, padding included)}. A record is blocksize x 256
    weights' codes with their absmax bytes and nested absmax (one block's codes
    and float32 absmax without double quantization), the last one zero-padded:
    lowbit.nn.packed_weight.RecordLayout."""
    from .nn.packed_weight import RecordLayout

    layout = RecordLayout((out_features, in_features), torch.bfloat16, "nf4", blocksize, double_quant,
                          _NESTED_BLOCKSIZE)
    per_rank = -(-layout.num_records // world_size)
    return {"records": layout.num_records * layout.record_bytes, "local": per_rank * layout.record_bytes,
            "gathered": world_size * per_rank * layout.record_bytes}


def adamw_state_bytes(numel: int, optimizer: str = "paged_adamw8bit") -> Dict[str, int]:
    """Optimizer state of one parameter: {'device': ..., 'managed': ...} bytes.

    8-bit (lowbit.optim.AdamW8bit/PagedAdamW8bit): m and v as uint8 (2 B per
    element) and one float32 absmax each per 256 elements, plus a float32 step;
    parameters under 4096 elements keep float32 m and v (8 B per element). The
    paged optimizer puts the uint8 m and v of parameters with >= 100000
    elements in CUDA managed memory, which torch's allocator does not count.
    torch AdamW ("adamw"): float32 m and v, 8 B per element, plus the step.
    """
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
    if optimizer == "adamw":
        return {"device": 8 * numel + 4, "managed": 0}
    if numel < _MIN_8BIT:
        return {"device": 8 * numel + 4, "managed": 0}
    codes = 2 * numel
    absmax = 2 * 4 * -(-numel // _OPT_BLOCK)
    if optimizer == "paged_adamw8bit" and numel >= _PAGE_MIN:
        return {"device": absmax + 4, "managed": codes}
    return {"device": codes + absmax + 4, "managed": 0}


def _saved_per_token(m: ModelShape, targets: Sequence[str], lora_r: int, lora_dropout: float, dtype_bytes: int):
    """Bytes per token autograd keeps for backward in one decoder layer, and
    the bytes per token of that layer's backward temporaries (HF Llama in
    training mode, SDPA/flash attention, lowbit Linear4bit + LoRA)."""
    H, I, hd = m.hidden_size, m.intermediate_size, m.hd
    Hq, Hkv = m.num_attention_heads * hd, m.num_key_value_heads * hd
    e = dtype_bytes
    t = set(targets)
    saved = 0
    # RMSNorm saves its float32 upcast of the input (pow and mul take it), twice per layer.
    saved += 2 * 4 * H
    # A LoRA projection saves the input of lora_A's matmul: with dropout its own
    # dropped-out copy (e B) and the dropout mask (1 B); without dropout the
    # shared input tensor itself, once per distinct input. Plus the rank-r
    # intermediate x A^T (e*r). The 4-bit base matmul saves nothing of x.
    drop = lora_dropout > 0

    def lora_inputs(names, width):
        hit = [n for n in names if n in t]
        if not hit:
            return 0
        per = (e + 1) * width * len(hit) if drop else e * width
        return per + e * lora_r * len(hit)

    saved += lora_inputs(("q_proj", "k_proj", "v_proj"), H)
    saved += lora_inputs(("o_proj",), Hq)
    saved += lora_inputs(("gate_proj", "up_proj"), H)
    saved += lora_inputs(("down_proj",), I)
    # Attention (SDPA flash/memory-efficient, no S x S matrix): rotated q and k,
    # v, the output and the float32 logsumexp per head.
    saved += e * (2 * Hq + 2 * Hkv) + 4 * m.num_attention_heads
    # MLP: silu saves gate's output, the product saves silu(gate) and up.
    saved += 3 * e * I
    # Backward temporaries of the layer: the gradients of the MLP
    # intermediates alive together (2 x [T, I]: three would be the upper
    # bound, and measured peaks where the recompute sets the peak -- chunked
    # loss, offloaded activations, up to 32768 tokens -- sit 3-11% below that
    # model and 2-6% below this one), the layer's incoming and residual
    # gradients (2 x [T, H]) and RMSNorm's float32 gradients (2 x [T, H]).
    transient = 2 * e * I + 2 * e * H + 2 * 4 * H
    return saved, transient


@dataclasses.dataclass
class MemoryPlan:
    """A planned training step; every size is in bytes. See plan_memory."""

    model: str
    batch_size: int
    seq_len: int
    lora_r: int
    gradient_checkpointing: bool
    optimizer: str
    chunked_ce: bool
    offload_checkpoints: bool
    # static
    weights_4bit: int
    weights_16bit: int
    adapters: int
    adapter_params: int
    adapter_grads: int
    optimizer_state: int
    optimizer_managed: int
    # per step
    checkpoints: int
    layer_recompute: int
    logits: int
    workspace: int
    host_offload: int
    # totals
    peak_allocated: int
    peak_phase: str
    reserved: int
    cuda_context: int
    device_total: int
    gpu_mem_bytes: Optional[int]
    # FSDP2 (lowbit.distributed.shard_model): the static sizes above are one
    # rank's shards (the largest, rank 0's), zero when cpu_offload moved them
    # to host memory (host_sharded, per rank); fsdp_gathered is what the
    # all-gathers hold on the card at the backward peak.
    world_size: int = 1
    fsdp: bool = False
    cpu_offload: bool = False
    fsdp_gathered: int = 0
    host_sharded: int = 0

    @property
    def weights(self) -> int:
        return self.weights_4bit + self.weights_16bit

    @property
    def fits(self) -> Optional[bool]:
        """True/False against gpu_mem_gib (None when no card size was given)."""
        return None if self.gpu_mem_bytes is None else self.device_total <= self.gpu_mem_bytes

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(weights=self.weights, fits=self.fits)
        return d

    def summary(self) -> str:
        """A readable table of the breakdown (GiB)."""
        g = lambda b: f"{b / GIB:8.2f}"  # noqa: E731
        opts = [f"batch {self.batch_size} x seq {self.seq_len}", f"LoRA r={self.lora_r}", self.optimizer,
                "checkpointing" if self.gradient_checkpointing else "no checkpointing"]
        if self.chunked_ce:
            opts.append("chunked CE")
        if self.offload_checkpoints:
            opts.append("offloaded activations")
        if self.fsdp:
            opts.append(f"FSDP2 over {self.world_size} GPU{'s' if self.world_size > 1 else ''}"
                        + (" + CPU offload" if self.cpu_offload else "") + " (per GPU)")
        rows = [
            ("weights, 4-bit linears", self.weights_4bit),
            ("weights, 16-bit (embeddings, lm_head, norms, other)", self.weights_16bit),
            (f"LoRA adapters fp32 ({self.adapter_params / 1e6:.1f}M params)", self.adapters),
            ("adapter gradients fp32", self.adapter_grads),
            ("optimizer state (torch allocator)", self.optimizer_state),
            ("saved activations (checkpoints / all layers)", self.checkpoints),
            ("one layer's recompute + backward", self.layer_recompute),
            ("logits and loss at their peak", self.logits),
            ("workspaces", self.workspace),
        ]
        if self.fsdp:
            rows.append((f"FSDP2 gathered: root + {FSDP_GATHERED_LAYERS} layers", self.fsdp_gathered))
        lines = [f"{self.model}: {', '.join(opts)}", "-" * 64]
        lines += [f"{k:<52}{g(v)} GiB" for k, v in rows]
        lines.append("-" * 64)
        lines.append(f"{'peak allocated (torch max_memory_allocated)':<52}{g(self.peak_allocated)} GiB"
                     f"  at {self.peak_phase}")
        lines.append(f"{'reserved (x%.2f fragmentation)' % FRAGMENTATION:<52}{g(self.reserved)} GiB")
        lines.append(f"{'optimizer state in managed memory (paged)':<52}{g(self.optimizer_managed)} GiB")
        lines.append(f"{'CUDA context (outside torch)':<52}{g(self.cuda_context)} GiB")
        lines.append(f"{'total on the card':<52}{g(self.device_total)} GiB")
        if self.host_offload:
            lines.append(f"{'pinned host memory for offloaded activations':<52}{g(self.host_offload)} GiB")
        if self.host_sharded:
            lines.append(f"{'host memory per rank: shards, grads, optimizer':<52}{g(self.host_sharded)} GiB")
        if self.gpu_mem_bytes is not None:
            verdict = "FITS" if self.fits else "DOES NOT FIT"
            lines.append(f"{verdict} in {self.gpu_mem_bytes / GIB:.1f} GiB")
        return "\n".join(lines)

    def suggestion(self) -> str:
        """What to change when the plan does not fit (empty string when it does
        or when no card size was given)."""
        if self.fits is None or self.fits:
            return ""
        over = self.device_total - self.gpu_mem_bytes
        tips = []
        worth = 256 * 2**20  # options that would save less than this are not suggested
        if not self.gradient_checkpointing:
            tips.append("turn on gradient checkpointing (saves all but one layer's activations)")
        if not self.chunked_ce and self.logits > worth:
            tips.append(f"compute the loss in chunks (--chunked-ce: logits {self.logits / GIB:.2f} GiB -> "
                        f"a few hundred MiB)")
        if not self.offload_checkpoints and self.checkpoints > worth:
            tips.append(f"offload saved activations to host memory (--offload-checkpoints: "
                        f"{self.checkpoints / GIB:.2f} GiB)")
        if self.batch_size > 1:
            tips.append(f"a smaller batch (e.g. {max(1, self.batch_size // 2)}) with gradient accumulation")
        tips.append("a shorter sequence length (lowbit.planner.max_seq_len finds the longest that fits)")
        if self.optimizer == "adamw":
            tips.append("an 8-bit optimizer (paged_adamw8bit)")
        if not self.cpu_offload and self.weights > 0.25 * self.gpu_mem_bytes:
            tips.append(f"shard the weights and adapter state over more GPUs (FSDP2, --world-size "
                        f"{2 * self.world_size if self.fsdp else 2}) or keep the shards in host memory "
                        f"(--cpu-offload)")
        if self.weights > 0.8 * self.gpu_mem_bytes:
            tips.append("a card with more memory: the weights alone take "
                        f"{self.weights / GIB:.1f} GiB")
        return f"{over / GIB:.2f} GiB over; try: " + "; ".join(tips)


def plan_memory(
    config,
    *,
    batch_size: int,
    seq_len: int,
    lora_r: int = 16,
    lora_targets: Sequence[str] = LLAMA_TARGETS,
    lora_dropout: float = 0.05,
    gradient_checkpointing: bool = True,
    optimizer: str = "paged_adamw8bit",
    quant: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    compute_dtype: torch.dtype = torch.bfloat16,
    gpu_mem_gib: Optional[float] = None,
    chunked_ce: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    offload_checkpoints: bool = False,
    cuda_context_bytes: Optional[int] = None,
    world_size: int = 1,
    fsdp: Optional[bool] = None,
    cpu_offload: bool = False,
) -> MemoryPlan:
    """Predicts the GPU memory of one QLoRA training step.

    The model is a Llama-like decoder (Hugging Face LlamaForCausalLM layout)
    whose projections named in `lora_targets` were converted by
    `lowbit.quantize_model(model, lora_r, target_modules=lora_targets)` (4-bit
    weights with fp32 LoRA A [r, in], B [out, r]); every other Linear, the
    embeddings, lm_head (always skipped) and the norms stay in `compute_dtype`.
    The step is: forward with labels (HF loss: logits upcast to fp32,
    F.cross_entropy) or lowbit.nn.causal_lm_loss when `chunked_ce`, backward,
    optimizer step, then zero_grad(set_to_none=True) -- so gradients do not
    exist during the forward.

    With T = batch_size * seq_len tokens, H hidden, I intermediate, L layers,
    V vocabulary, r the LoRA rank, e = bytes of compute_dtype:

    Static (always resident)
      weights_4bit   sum over converted Linears [N, K] of
                     ceil(N*K/2) + ceil(N*K/blocksize) * (1 if double_quant else 4)
                     + (4 * ceil(nblocks/256) + 4 if double_quant)        (linear4bit_bytes)
      weights_16bit  e * (V*H embeddings + V*H lm_head unless tied + (2L+1)*H norms
                     + N*K of every Linear that is not converted)
      adapters       4 * sum r*(K+N)           adapter_grads the same (fp32 gradients)
      optimizer      per adapter tensor (adamw_state_bytes): 8-bit m, v = 2 B/param +
                     2 x 4 B per 256 params; < 4096 params: 8 B/param; torch AdamW
                     8 B/param; +4 B step. Paged: uint8 m, v of tensors >= 100000
                     params live in managed memory (`optimizer_managed`), outside
                     torch's allocator but on the card.
    Activations (per token; _saved_per_token has the itemised list)
      saved(layer)   2 x 4H (RMSNorm fp32 upcasts)
                     + LoRA inputs: with dropout (e+1) * in per target, else e * in per
                       distinct input; + e*r per target
                     + attention: e*(2*Hq + 2*Hkv) + 4*heads (flash/SDPA: no S^2 term)
                     + MLP: 3*e*I (gate out, silu out, up out)
      transient      3*e*I + 2*e*H + 2*4*H  (one layer's backward temporaries)
      checkpoints    with checkpointing: e*H per layer (each layer's input) + 4H (final
                     norm); without: saved(layer) per layer + 4H
      layer_recompute  (saved(layer) + transient) * ACTIVATION_SCALE, plus the
                     largest dequantized weight e*N*K (the 4-bit matmul's dequantize
                     + cuBLAS path for many tokens)
      logits         unchunked: LOGITS_BYTES_PER_TOKEN_VOCAB (12) * T * V;
                     chunked: CHUNK_BYTES_PER_TOKEN_VOCAB * min(T, chunk_size) * V
                     + T*(2*e*H + 4) (saved final hidden, its gradient, logsumexp)
    Offloading (`offload_checkpoints`) moves saved tensors to pinned host memory:
    only OFFLOAD_LAYERS_RESIDENT layers' worth stays on the card
    (`host_offload` reports the pinned host bytes).

    FSDP2 (`fsdp`, default: world_size > 1 or cpu_offload; lowbit.distributed.shard_model
    over `world_size` GPUs, one unit per decoder layer and the root): the plan is one
    GPU's, the largest rank's (rank 0). Every parameter is split on dim 0 as
    torch.chunk does (ceil(rows / world_size) rows on rank 0); a Linear4bit
    weight in records of blocksize x 256 weights (linear4bit_shard_bytes);
    adapters, their gradients and the optimizer state are those of the local
    shards (8-bit and paging decided per shard). Activations are not sharded.
      fsdp_gathered   the root's parameters (embeddings, lm_head, final norm: FSDP2
                      keeps the root gathered from forward through backward)
                      + FSDP_GATHERED_LAYERS x one layer gathered (all-gathered records,
                      padding included, + the codes and scales unpacked from them +
                      16-bit norms and other linears + fp32 LoRA) + one layer's whole
                      fp32 LoRA gradients before their reduce-scatter; the root part
                      counts in the loss phase too.
    cpu_offload (FSDP2's CPUOffloadPolicy): the shards, their gradients and the
    optimizer state (not paged: host tensors) move to host memory, `host_sharded`
    per rank; the card keeps fsdp_gathered and the activations. NCCL's own
    buffers (outside torch's allocator) are not counted.

    Peak: the larger of
      loss phase      static + checkpoints + logits + WORKSPACE_BYTES (+ FSDP2 root)
      backward, layer k (the largest over k = L-1 .. 0)
                      static + grads of layers k..L-1 (+ 16-bit other grads) +
                      checkpoints still held + layer_recompute + WORKSPACE_BYTES
                      (+ fsdp_gathered)
    reserved = peak_allocated * FRAGMENTATION; the card needs reserved +
    optimizer_managed + CUDA context (cuda_context_bytes, default
    CUDA_CONTEXT_BYTES), and `fits` compares that with gpu_mem_gib.
    """
    m = load_config(config)
    for k, v in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{k} must be a positive integer, got {v!r}")
    if not isinstance(lora_r, int) or lora_r < 0:
        raise ValueError(f"lora_r must be an integer >= 0, got {lora_r!r}")
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
    if quant not in ("nf4", "fp4"):
        raise ValueError(f"quant must be 'nf4' or 'fp4', got {quant!r}")
    if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise ValueError(f"blocksize must be a power of two in 32..4096, got {blocksize!r}")
    if not chunk_size or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if gpu_mem_gib is not None and not gpu_mem_gib > 0:
        raise ValueError(f"gpu_mem_gib must be > 0, got {gpu_mem_gib!r}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size <= 0:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if fsdp is None:
        fsdp = world_size > 1 or cpu_offload
    if cpu_offload and not fsdp:
        raise ValueError("cpu_offload is FSDP2's CPUOffloadPolicy: it needs fsdp=True "
                         "(lowbit.distributed.shard_model(model, cpu_offload=True))")
    targets = tuple(lora_targets)
    known = {n for n, _, _ in m.linears()}
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise ValueError(f"lora_targets {unknown} are not projections of a Llama decoder layer ({sorted(known)})")
    e = torch.empty((), dtype=compute_dtype).element_size()
    H, L, V = m.hidden_size, m.num_hidden_layers, m.vocab_size
    T = batch_size * seq_len

    # ---- static (per GPU: with FSDP2 each rank's largest shard)
    W = world_size if fsdp else 1

    def rows(n):  # rows of a dim-0 shard on rank 0 (torch.chunk: ceil(n / W))
        return -(-n // W)

    w4 = w16_layer = lora_params_layer = 0
    opt_dev = opt_managed = 0
    largest = 0
    gathered_layer = 0  # one decoder layer's parameters while FSDP2 holds them whole
    lora_local_layer = 0
    for name, k_in, n_out in m.linears():
        if name in targets:
            if fsdp:
                sh = linear4bit_shard_bytes(n_out, k_in, W, blocksize, double_quant)
                w4 += sh["local"]
                # the all-gathered records and the codes and scales unpacked from them
                gathered_layer += sh["gathered"] + linear4bit_bytes(n_out, k_in, blocksize, double_quant)
            else:
                w4 += linear4bit_bytes(n_out, k_in, blocksize, double_quant)
            largest = max(largest, e * n_out * k_in)
            if lora_r:
                for numel, local in ((lora_r * k_in, rows(lora_r) * k_in), (n_out * lora_r, rows(n_out) * lora_r)):
                    lora_params_layer += numel
                    lora_local_layer += local
                    gathered_layer += 4 * numel
                    # The paged optimizer pages CUDA tensors only: offloaded shards are host tensors.
                    st = adamw_state_bytes(local, "adamw8bit" if cpu_offload and optimizer != "adamw" else optimizer)
                    opt_dev += st["device"]
                    opt_managed += st["managed"]
        else:
            w16_layer += e * rows(n_out) * k_in
            gathered_layer += e * n_out * k_in
    gathered_layer += e * 2 * H  # the layer's two norms
    root_rows = V * (1 if m.tie_word_embeddings else 2)  # embeddings (+ lm_head): the root unit, with the final norm
    weights_4bit = L * w4
    weights_16bit = e * (rows(V) * H * (1 if m.tie_word_embeddings else 2) + (2 * L + 1) * rows(H)) + L * w16_layer
    adapter_params = L * lora_params_layer
    adapters = 4 * L * lora_local_layer
    grads = adapters
    optimizer_state, optimizer_managed = L * opt_dev, L * opt_managed
    host_sharded = 0
    if cpu_offload:  # FSDP2's CPUOffloadPolicy: shards, their gradients and the optimizer live on the host
        host_sharded = weights_4bit + weights_16bit + adapters + grads + optimizer_state + optimizer_managed
        weights_4bit = weights_16bit = adapters = grads = optimizer_state = optimizer_managed = 0
    static = weights_4bit + weights_16bit + adapters + optimizer_state
    # FSDP2 keeps the root's parameters gathered from the forward through the
    # backward (it does not reshard the root after forward); a decoder layer is
    # gathered while it runs, with the next one prefetched, and its whole fp32
    # LoRA gradients exist until they are reduce-scattered.
    root_gathered = e * (root_rows * H + H) if fsdp else 0
    layers_gathered = min(L, FSDP_GATHERED_LAYERS) * gathered_layer + 4 * lora_params_layer if fsdp else 0
    fsdp_gathered = root_gathered + layers_gathered

    # ---- activations
    saved, transient = _saved_per_token(m, targets if lora_r else (), lora_r, lora_dropout, e)
    ckpt_layer = e * H if gradient_checkpointing else saved
    final_norm = 4 * H
    layer_recompute = int(ACTIVATION_SCALE * T * ((saved if gradient_checkpointing else 0) + transient)) + largest
    if chunked_ce:
        logits = CHUNK_BYTES_PER_TOKEN_VOCAB * min(T, chunk_size) * V + T * (2 * e * H + 4)
    else:
        logits = LOGITS_BYTES_PER_TOKEN_VOCAB * T * V
    held = [T * ckpt_layer] * L  # saved per layer, as backward finds them
    if not gradient_checkpointing:
        held = [int(ACTIVATION_SCALE * h) for h in held]
    host = 0
    if offload_checkpoints:
        host = sum(held) + T * final_norm
        resident = min(L, OFFLOAD_LAYERS_RESIDENT)
        held = [h if i >= L - resident else 0 for i, h in enumerate(held)]
        final = 0
    else:
        final = T * final_norm
    checkpoints = sum(held) + final

    loss_phase = static + root_gathered + checkpoints + logits + WORKSPACE_BYTES
    grads_layer = grads // L if L else 0
    best_back, best_k = 0, L - 1
    for k in range(L - 1, -1, -1):
        # Backward of layer k: layers above it have given back their saved
        # tensors and allocated their adapter gradients.
        if offload_checkpoints:
            still = min(k + 1, OFFLOAD_LAYERS_RESIDENT) * T * ckpt_layer
        else:
            still = sum(held[: k + 1])
        b = static + fsdp_gathered + (L - k) * grads_layer + still + layer_recompute + WORKSPACE_BYTES
        if b > best_back:
            best_back, best_k = b, k
    if loss_phase >= best_back:
        peak, phase = loss_phase, "the loss"
    else:
        peak, phase = best_back, f"backward of layer {best_k}"
    reserved = int(peak * FRAGMENTATION)
    ctx = CUDA_CONTEXT_BYTES if cuda_context_bytes is None else int(cuda_context_bytes)
    return MemoryPlan(
        model=m.name, batch_size=batch_size, seq_len=seq_len, lora_r=lora_r,
        gradient_checkpointing=gradient_checkpointing, optimizer=optimizer, chunked_ce=chunked_ce,
        offload_checkpoints=offload_checkpoints, weights_4bit=weights_4bit, weights_16bit=weights_16bit,
        adapters=adapters, adapter_params=adapter_params, adapter_grads=grads, optimizer_state=optimizer_state,
        optimizer_managed=optimizer_managed, checkpoints=checkpoints, layer_recompute=layer_recompute,
        logits=logits, workspace=WORKSPACE_BYTES, host_offload=host, peak_allocated=peak, peak_phase=phase,
        reserved=reserved, cuda_context=ctx, device_total=reserved + optimizer_managed + ctx,
        gpu_mem_bytes=None if gpu_mem_gib is None else int(gpu_mem_gib * GIB),
        world_size=world_size, fsdp=bool(fsdp), cpu_offload=cpu_offload, fsdp_gathered=fsdp_gathered,
        host_sharded=host_sharded,
    )


def max_seq_len(config, gpu_mem_gib: float, batch_size: int = 1, *, multiple_of: int = 1,
                limit: int = 1 << 22, **kwargs) -> int:
    """The longest sequence length (a multiple of `multiple_of`, at most
    `limit`) whose plan fits `gpu_mem_gib`; 0 when none does. Other keyword
    arguments go to plan_memory. Memory grows with seq_len, so a binary
    search finds it."""
    if not multiple_of or multiple_of <= 0:
        raise ValueError(f"multiple_of must be a positive integer, got {multiple_of!r}")
    m = load_config(config)

    def fits(n):
        return plan_memory(m, batch_size=batch_size, seq_len=n * multiple_of, gpu_mem_gib=gpu_mem_gib,
                           **kwargs).fits

    lo, hi = 0, max(1, limit // multiple_of)
    if fits(hi):
        return hi * multiple_of
    while hi - lo > 1:  # fits(lo) (or lo == 0), not fits(hi)
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo * multiple_of


# ---------------------------------------------------------------- command line

EXIT_FITS, EXIT_ERROR, EXIT_DOES_NOT_FIT = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lowbit-plan",
        description="Predict the GPU memory of a QLoRA training step (lowbit NF4 weights, LoRA, 8-bit AdamW). "
                    f"Exit status: {EXIT_FITS} when it fits --gpu-mem (or no --gpu-mem given), "
                    f"{EXIT_DOES_NOT_FIT} when it does not, {EXIT_ERROR} on a bad argument or config.",
    )
    p.add_argument("--config", required=True,
                   help=f"config.json, a model directory, or a preset: {', '.join(sorted(PRESETS))}")
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--seq-len", type=positive_int, default=2048)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--targets", default=",".join(LLAMA_TARGETS), help="comma-separated projections (4-bit + LoRA)")
    p.add_argument("--gpu-mem", type=float, help="card memory in GiB; without it no verdict is given")
    p.add_argument("--no-checkpointing", action="store_true", help="plan without gradient checkpointing")
    p.add_argument("--optimizer", choices=_OPTIMIZERS, default="paged_adamw8bit")
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--no-double-quant", action="store_true")
    p.add_argument("--chunked-ce", action="store_true", help="loss in chunks (lowbit.nn.causal_lm_loss)")
    p.add_argument("--chunk-size", type=positive_int, default=DEFAULT_CHUNK_SIZE)
    p.add_argument("--offload-checkpoints", action="store_true",
                   help="saved activations in pinned host memory (lowbit.nn.offload_activations)")
    p.add_argument("--world-size", type=positive_int, default=1,
                   help="GPUs the model is sharded over with FSDP2 (lowbit.distributed.shard_model); per-GPU plan")
    p.add_argument("--cpu-offload", action="store_true",
                   help="FSDP2 CPU offload: shards, gradients and optimizer state in host memory")
    p.add_argument("--max-seq", action="store_true", help="also print the longest seq len that fits --gpu-mem")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    kwargs = dict(lora_r=args.lora_r, lora_dropout=args.lora_dropout,
                  lora_targets=tuple(t for t in args.targets.split(",") if t),
                  gradient_checkpointing=not args.no_checkpointing, optimizer=args.optimizer,
                  blocksize=args.blocksize, double_quant=not args.no_double_quant, chunked_ce=args.chunked_ce,
                  chunk_size=args.chunk_size, offload_checkpoints=args.offload_checkpoints,
                  world_size=args.world_size, cpu_offload=args.cpu_offload)
    try:
        plan = plan_memory(args.config, batch_size=args.batch_size, seq_len=args.seq_len, gpu_mem_gib=args.gpu_mem,
                           **kwargs)
        longest = None
        if args.max_seq and args.gpu_mem:
            longest = max_seq_len(args.config, args.gpu_mem, args.batch_size, **kwargs)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"lowbit-plan: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        d = plan.to_dict()
        d["suggestion"] = plan.suggestion()
        if longest is not None:
            d["max_seq_len"] = longest
        print(json.dumps(d, indent=1))
    else:
        print(plan.summary())
        if plan.fits is False:
            print(plan.suggestion())
        if longest is not None:
            print(f"longest sequence that fits at batch {args.batch_size}: {longest}")
    return EXIT_DOES_NOT_FIT if plan.fits is False else EXIT_FITS


__all__ = ["MemoryPlan", "ModelShape", "PRESETS", "adamw_state_bytes", "linear4bit_bytes", "linear4bit_shard_bytes",
           "load_config", "max_seq_len", "plan_memory"]

if __name__ == "__main__":
    sys.exit(main())
