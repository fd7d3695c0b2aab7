"""lowbit.planner: byte counts against real converted models and optimizers,
hand-computed cases, monotonicity, the command line and bad inputs."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import lowbit
from lowbit import planner
from lowbit.optim import AdamW8bit, PagedAdamW8bit, state_bytes
from lowbit.planner import linear4bit_bytes, max_seq_len, plan_memory

TARGETS = planner.LLAMA_TARGETS
GIB = 2**30
TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False, max_position_embeddings=256)


def _tiny_hf(tie=False, **over):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(**{**TINY, "tie_word_embeddings": tie, **over})
    return cfg, transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)


def _nbytes(t):
    return 0 if t is None else t.numel() * t.element_size()


@pytest.mark.parametrize("targets", [TARGETS, ("q_proj", "v_proj")])
@pytest.mark.parametrize("blocksize,double_quant", [(64, True), (128, False)])
@pytest.mark.parametrize("tie", [False, True])
def test_static_bytes_equal_a_converted_model(targets, blocksize, double_quant, tie):
    cfg, model = _tiny_hf(tie)
    r = 8
    lowbit.quantize_model(model, lora_r=r, target_modules=targets, blocksize=blocksize, double_quant=double_quant,
                          progress=False)
    four = sixteen = lora = lora_params = 0
    seen = set()
    for m in model.modules():
        if isinstance(m, lowbit.Linear4bit):
            st = m.quant_state
            four += sum(_nbytes(t) for t in (m.weight, st.absmax, st.nested_absmax, st.offset))
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if "lora_" in name:
            lora += _nbytes(p)
            lora_params += p.numel()
        elif p.dtype != torch.uint8:
            sixteen += _nbytes(p)
    plan = plan_memory(cfg, batch_size=1, seq_len=16, lora_r=r, lora_targets=targets, blocksize=blocksize,
                       double_quant=double_quant)
    assert plan.weights_4bit == four
    assert plan.weights_16bit == sixteen
    assert plan.adapters == lora == plan.adapter_grads
    assert plan.adapter_params == lora_params


@pytest.mark.parametrize("optimizer", ["adamw8bit", "paged_adamw8bit", "adamw"])
def test_optimizer_bytes_equal_real_states(optimizer):
    cfg, model = _tiny_hf()
    r = 64  # A [64, 64] has exactly 4096 elements (8-bit), k/v's B [32, 64] 2048 (float32 states)
    lowbit.quantize_model(model, lora_r=r, target_modules=TARGETS, progress=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = {"adamw8bit": AdamW8bit, "paged_adamw8bit": PagedAdamW8bit, "adamw": torch.optim.AdamW}[optimizer](
        params, lr=1e-3)
    ids = torch.randint(0, TINY["vocab_size"], (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    plan = plan_memory(cfg, batch_size=2, seq_len=12, lora_r=r, optimizer=optimizer)
    # On the CPU nothing is paged: the managed part is held in ordinary memory.
    assert state_bytes(opt) == plan.optimizer_state + plan.optimizer_managed
    if optimizer != "paged_adamw8bit":
        assert plan.optimizer_managed == 0


def test_hand_computed_linear_and_states():
    # 4096 x 4096, blocks of 64: 8388608 packed + 262144 uint8 scales + 1024 nested float32 + offset
    assert linear4bit_bytes(4096, 4096) == 8388608 + 262144 + 4 * 1024 + 4
    assert linear4bit_bytes(4096, 4096, 64, False) == 8388608 + 4 * 262144
    assert linear4bit_bytes(3, 5, 64) == 8 + 1 + 4 + 4  # odd element count rounds the packed bytes up
    assert planner.adamw_state_bytes(4095, "adamw8bit") == {"device": 8 * 4095 + 4, "managed": 0}
    assert planner.adamw_state_bytes(65536, "paged_adamw8bit") == {"device": 2 * 65536 + 8 * 256 + 4,
                                                                   "managed": 0}
    assert planner.adamw_state_bytes(176128, "paged_adamw8bit") == {"device": 8 * 688 + 4, "managed": 2 * 176128}
    assert planner.adamw_state_bytes(10, "adamw") == {"device": 84, "managed": 0}


def test_llama2_7b_static_by_hand():
    p = plan_memory("llama2-7b", batch_size=1, seq_len=512)
    H, I, L, V = 4096, 11008, 32, 32000
    w4 = L * (4 * linear4bit_bytes(H, H) + 3 * linear4bit_bytes(I, H))
    assert p.weights_4bit == w4
    assert abs(w4 / 6.476e9 * 8 - 4.127) < 0.01  # SPEC: about 4.127 bits per weight
    assert p.weights_16bit == 2 * (2 * V * H + (2 * L + 1) * H)
    assert p.adapter_params == L * 16 * (4 * 2 * H + 3 * (H + I)) == 39_976_960
    assert p.adapters == 4 * p.adapter_params


@pytest.mark.parametrize("batch,seq,reference_gb", [(1, 512, 4.60), (1, 2048, 5.68), (4, 2048, 10.30)])
def test_llama2_7b_near_the_reference_points(batch, seq, reference_gb):
    # bitsandbytes + PEFT with gradient checkpointing on Llama-2-7B peaks there;
    # lowbit keeps the same tensors (or fewer), so its plan lands at or below it.
    p = plan_memory("llama2-7b", batch_size=batch, seq_len=seq)
    assert 0.8 * reference_gb * 1e9 < p.peak_allocated < 1.05 * reference_gb * 1e9
    assert p.reserved > p.peak_allocated


# Peaks lowbit's 7B benchmark measured on an H100 (torch.cuda.max_memory_allocated,
# GiB; benchmarks/RESULTS.md, 2026-11-28): (chunked_ce, offload, batch, seq, peak).
MEASURED_7B = [
    (False, False, 1, 512, 4.24), (False, False, 1, 2048, 5.12), (False, False, 4, 2048, 8.91),
    (True, False, 1, 512, 4.24), (True, False, 1, 2048, 4.96), (True, False, 4, 2048, 8.25),
    (True, True, 1, 512, 4.23), (True, True, 1, 2048, 4.62), (True, True, 4, 2048, 6.45),
    (True, True, 1, 32768, 13.82),
]


@pytest.mark.parametrize("ce,offload,batch,seq,peak_gib", MEASURED_7B)
def test_llama2_7b_within_10_percent_of_measured_peaks(ce, offload, batch, seq, peak_gib):
    p = plan_memory("llama2-7b", batch_size=batch, seq_len=seq, lora_r=16, lora_dropout=0.05, chunked_ce=ce,
                    offload_checkpoints=offload)
    assert abs(p.peak_allocated / 2**30 - peak_gib) / peak_gib < 0.10


def test_monotone_and_options_help():
    base = dict(batch_size=2, seq_len=1024)
    p = plan_memory("llama2-7b", **base)
    assert plan_memory("llama2-7b", batch_size=2, seq_len=2048).peak_allocated > p.peak_allocated
    assert plan_memory("llama2-7b", batch_size=3, seq_len=1024).peak_allocated > p.peak_allocated
    prev = 0
    for s in (1, 64, 500, 1024, 3000, 8192):
        cur = plan_memory("smollm2-135m", batch_size=1, seq_len=s).peak_allocated
        assert cur > prev
        prev = cur
    assert plan_memory("llama2-7b", **base, gradient_checkpointing=False).peak_allocated > 2 * p.peak_allocated
    long = dict(batch_size=2, seq_len=4096)
    assert plan_memory("llama2-7b", **long, chunked_ce=True).logits < plan_memory("llama2-7b", **long).logits / 4
    off = plan_memory("llama2-7b", **base, offload_checkpoints=True)
    assert off.checkpoints < p.checkpoints and off.host_offload > 0
    assert plan_memory("llama2-7b", **base, optimizer="adamw").optimizer_state > 3 * p.optimizer_state
    assert plan_memory("llama2-7b", **base, lora_dropout=0.0).layer_recompute < p.layer_recompute


# ---------------------------------------------------------------- FSDP2 sharding and CPU offload

def _records(n_out, k_in, world):
    """Rank 0's records of one 4-bit weight (blocksize 64, double quant: 16384 weights, 8452 bytes per record)."""
    return -(-math.ceil(n_out * k_in / 16384) // world) * 8452


def test_fsdp_shards_llama2_7b_by_hand():
    H, I, L, V, r = 4096, 11008, 32, 32000, 16
    p = plan_memory("llama2-7b", batch_size=1, seq_len=2048, world_size=2)
    assert p.fsdp and p.world_size == 2 and not p.cpu_offload
    # 4096x4096: 1024 records -> 512 on rank 0; 11008x4096: 2752 -> 1376.
    assert _records(H, H, 2) == 512 * 8452 and _records(I, H, 2) == 1376 * 8452
    assert p.weights_4bit == L * (4 * 512 + 3 * 1376) * 8452 == 1_670_385_664
    # embeddings and lm_head: 16000 of 32000 rows; 65 norms: 2048 of 4096.
    assert p.weights_16bit == 2 * (2 * 16000 * H + (2 * L + 1) * 2048) == 262_410_240
    # LoRA shards: A [16, K] -> 8 rows, B [N, 16] -> ceil(N/2) rows.
    local = 4 * (8 * H + 2048 * r) + 2 * (8 * H + 5504 * r) + (8 * I + 2048 * r)
    assert local == 624_640 and p.adapter_params == L * 2 * local == 39_976_960  # the whole model's count
    assert p.adapters == p.adapter_grads == 4 * L * local == 79_953_920
    # 8-bit states of the local shards (32768 or 88064 elements: 8-bit, none large enough to page).
    st = lambda n: 2 * n + 8 * -(-n // 256) + 4  # noqa: E731
    assert p.optimizer_state == L * (11 * st(32768) + 3 * st(88064)) == 40_603_392 and p.optimizer_managed == 0
    # Gathered: the root (embeddings, lm_head, final norm) and two whole layers
    # (records as all-gathered, codes and scales unpacked, norms, fp32 LoRA),
    # plus one layer's whole fp32 LoRA gradients.
    lora_layer = r * (4 * 2 * H + 3 * (H + I))
    layer = ((4 * 1024 + 3 * 2752) * 8452 + 4 * linear4bit_bytes(H, H) + 3 * linear4bit_bytes(I, H)
             + 4 * lora_layer + 2 * 2 * H)
    assert p.fsdp_gathered == 2 * (2 * V * H + H) + 2 * layer + 4 * lora_layer
    # Activations are not sharded.
    single = plan_memory("llama2-7b", batch_size=1, seq_len=2048)
    assert (p.checkpoints, p.layer_recompute, p.logits) == (single.checkpoints, single.layer_recompute, single.logits)
    assert p.peak_allocated < single.peak_allocated


def test_fsdp_shard_bytes_match_the_packed_records():
    from lowbit.nn.packed_weight import Packed4bitWeight

    for (n, k), blocksize, dq in [((96, 500), 64, True), ((300, 64), 128, False), ((4, 8), 64, True)]:
        packed, state = lowbit.functional.quantize_4bit(torch.randn(n, k), blocksize=blocksize, double_quant=dq)
        rec = Packed4bitWeight.from_quantized(packed, state).records()
        sh = planner.linear4bit_shard_bytes(n, k, 3, blocksize, dq)
        assert sh["records"] == rec.numel()
        rows = -(-rec.shape[0] // 3)
        assert sh["local"] == rows * rec.shape[1] and sh["gathered"] == 3 * sh["local"]


def test_cpu_offload_moves_the_shards_to_the_host():
    kw = dict(batch_size=1, seq_len=2048)
    on = plan_memory("llama2-7b", world_size=2, **kw)
    off = plan_memory("llama2-7b", world_size=2, cpu_offload=True, **kw)
    assert (off.weights_4bit, off.weights_16bit, off.adapters, off.adapter_grads, off.optimizer_state,
            off.optimizer_managed) == (0, 0, 0, 0, 0, 0)
    # Shards, their gradients and the optimizer state: 1.67 GB + 0.26 GB + 2 x 80 MB + 41 MB per rank.
    assert off.host_sharded == (on.weights_4bit + on.weights_16bit + on.adapters + on.adapter_grads
                                + on.optimizer_state + on.optimizer_managed) == 2_133_307_136
    assert off.fsdp_gathered == on.fsdp_gathered and off.checkpoints == on.checkpoints
    assert off.peak_phase == on.peak_phase == "backward of layer 31"
    # At the backward of the last layer one layer's sharded gradients exist.
    on_static = on.weights + on.adapters + on.optimizer_state
    assert off.peak_allocated == on.peak_allocated - on_static - on.adapter_grads // 32
    # One GPU offloaded: FSDP2 over one rank holds every row, the 4-bit weights in
    # whole records, and the paged optimizer pages no host tensor.
    one = plan_memory("llama2-7b", world_size=1, cpu_offload=True, **kw)
    single = plan_memory("llama2-7b", **kw)
    H, I, L = 4096, 11008, 32
    unpaged = plan_memory("llama2-7b", optimizer="adamw8bit", **kw).optimizer_state
    assert single.optimizer_managed > 0 and one.fsdp
    assert one.host_sharded == (L * (4 * _records(H, H, 1) + 3 * _records(I, H, 1)) + single.weights_16bit
                                + single.adapters + single.adapter_grads + unpaged)


def test_fsdp_scales_with_the_world_and_ddp_does_not():
    kw = dict(batch_size=1, seq_len=2048)
    single = plan_memory("llama2-70b", **kw)
    # DDP (fsdp=False): every GPU holds the whole model.
    assert plan_memory("llama2-70b", world_size=4, fsdp=False, **kw) == dataclasses.replace(single, world_size=4)
    w2, w4 = plan_memory("llama2-70b", world_size=2, **kw), plan_memory("llama2-70b", world_size=4, **kw)
    assert w4.weights_4bit < w2.weights_4bit < single.weights_4bit
    assert abs(w2.weights_4bit / w4.weights_4bit - 2) < 1e-3
    assert w4.peak_allocated < w2.peak_allocated < single.peak_allocated
    assert w2.fsdp_gathered == w4.fsdp_gathered  # whole layers, whatever the world size (padding aside)
    # Llama-2-70B, 1 x 2048 tokens per GPU: about 29 GiB on each of 2 cards, 19 on each of 4, 9 offloaded.
    assert 26 * GIB < w2.device_total < 31 * GIB and 17 * GIB < w4.device_total < 21 * GIB
    off = plan_memory("llama2-70b", world_size=4, cpu_offload=True, **kw)
    assert off.device_total < 10 * GIB and 8 * GIB < off.host_sharded < 10 * GIB
    assert "FSDP2 over 2 GPUs (per GPU)" in w2.summary() and "FSDP2 gathered" in w2.summary()
    assert "host memory per rank" in off.summary()
    tight = plan_memory("llama2-70b", gpu_mem_gib=40, **kw)
    assert tight.fits is False and "--world-size 2" in tight.suggestion() and "--cpu-offload" in tight.suggestion()


def test_fsdp_cli_and_bad_inputs(capsys):
    assert planner.main(["--config", "llama2-70b", "--world-size", "2", "--cpu-offload", "--gpu-mem", "24",
                         "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["fsdp"] and d["cpu_offload"] and d["world_size"] == 2 and d["host_sharded"] > 17 * GIB and d["fits"]
    assert planner.main(["--config", "llama2-70b", "--world-size", "2", "--gpu-mem", "24"]) == 2
    assert "FSDP2 over 2 GPUs" in capsys.readouterr().out
    with pytest.raises(ValueError, match="world_size"):
        plan_memory(TINY, batch_size=1, seq_len=8, world_size=0)
    with pytest.raises(ValueError, match="cpu_offload"):
        plan_memory(TINY, batch_size=1, seq_len=8, world_size=2, fsdp=False, cpu_offload=True)


def test_fits_summary_and_suggestion():
    ok = plan_memory("llama2-7b", batch_size=1, seq_len=2048, gpu_mem_gib=24)
    assert ok.fits is True and ok.suggestion() == ""
    assert "FITS" in ok.summary() and "peak allocated" in ok.summary()
    big = plan_memory("llama2-7b", batch_size=8, seq_len=4096, gpu_mem_gib=24, gradient_checkpointing=False)
    assert big.fits is False
    s = big.suggestion()
    assert "checkpointing" in s and "--chunked-ce" in s and "smaller batch" in s
    assert "DOES NOT FIT" in big.summary()
    assert plan_memory("llama2-7b", batch_size=1, seq_len=64).fits is None
    d = ok.to_dict()
    assert d["fits"] is True and d["weights"] == ok.weights_4bit + ok.weights_16bit
    json.dumps(d)


def test_max_seq_len():
    n = max_seq_len("llama2-7b", 24)
    assert 4096 < n < 1 << 20
    assert plan_memory("llama2-7b", batch_size=1, seq_len=n, gpu_mem_gib=24).fits
    assert not plan_memory("llama2-7b", batch_size=1, seq_len=n + 1, gpu_mem_gib=24).fits
    lean = max_seq_len("llama2-7b", 24, chunked_ce=True, offload_checkpoints=True)
    assert lean > n
    assert max_seq_len("llama2-7b", 24, batch_size=4) < n
    m = max_seq_len("llama2-7b", 24, multiple_of=256)
    assert m % 256 == 0 and n - 256 < m <= n
    assert max_seq_len("llama2-70b", 24) == 0  # the weights alone are larger than the card


def test_config_sources(tmp_path):
    transformers = pytest.importorskip("transformers")
    ref = plan_memory(TINY, batch_size=2, seq_len=32)
    cfg = transformers.LlamaConfig(**TINY)
    assert plan_memory(cfg, batch_size=2, seq_len=32).peak_allocated == ref.peak_allocated
    cfg.save_pretrained(tmp_path)
    for src in (tmp_path, str(tmp_path), str(tmp_path / "config.json")):
        assert plan_memory(src, batch_size=2, seq_len=32).peak_allocated == ref.peak_allocated
    for name in planner.PRESETS:
        assert plan_memory(name, batch_size=1, seq_len=128).weights > 0
    # A config without num_key_value_heads means plain multi-head attention.
    mha = {k: v for k, v in TINY.items() if k != "num_key_value_heads"}
    assert planner.load_config(mha).num_key_value_heads == TINY["num_attention_heads"]


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="seq_len"):
        plan_memory(TINY, batch_size=1, seq_len=-5)
    with pytest.raises(ValueError, match="batch_size"):
        plan_memory(TINY, batch_size=0, seq_len=5)
    with pytest.raises(ValueError, match="intermediate_size"):
        plan_memory({k: v for k, v in TINY.items() if k != "intermediate_size"}, batch_size=1, seq_len=8)
    with pytest.raises(ValueError, match="hidden_size"):
        plan_memory({**TINY, "hidden_size": -1}, batch_size=1, seq_len=8)
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        plan_memory(str(missing), batch_size=1, seq_len=8)
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        plan_memory(str(bad), batch_size=1, seq_len=8)
    with pytest.raises(ValueError, match="optimizer"):
        plan_memory(TINY, batch_size=1, seq_len=8, optimizer="sgd")
    with pytest.raises(ValueError, match="lora_targets"):
        plan_memory(TINY, batch_size=1, seq_len=8, lora_targets=("qproj",))
    with pytest.raises(ValueError, match="blocksize"):
        plan_memory(TINY, batch_size=1, seq_len=8, blocksize=48)
    with pytest.raises(ValueError, match="gpu_mem_gib"):
        plan_memory(TINY, batch_size=1, seq_len=8, gpu_mem_gib=0)
    with pytest.raises(TypeError, match="config"):
        plan_memory(42, batch_size=1, seq_len=8)


def test_cli_exit_codes_and_output(capsys, tmp_path):
    assert planner.main(["--config", "llama2-7b", "--seq-len", "2048", "--gpu-mem", "24"]) == 0
    out = capsys.readouterr().out
    assert "FITS" in out and "weights, 4-bit linears" in out
    assert planner.main(["--config", "llama2-7b", "--batch-size", "8", "--seq-len", "4096", "--gpu-mem", "16",
                         "--no-checkpointing"]) == 2
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "try:" in out
    assert planner.main(["--config", "smollm2-135m", "--seq-len", "512"]) == 0  # no card size: no verdict
    assert "FIT" not in capsys.readouterr().out
    assert planner.main(["--config", "llama2-7b", "--gpu-mem", "24", "--json", "--max-seq", "--chunked-ce",
                         "--offload-checkpoints"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["fits"] is True and d["chunked_ce"] and d["offload_checkpoints"] and d["max_seq_len"] > 2048
    assert planner.main(["--config", str(tmp_path / "missing")]) == 1
    assert "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        planner.main(["--config", "llama2-7b", "--seq-len", "-3"])


def test_module_entry_point():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "python"),
                                         env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-m", "lowbit.planner", "--config", "llama2-13b", "--seq-len", "4096",
                        "--batch-size", "4", "--gpu-mem", "12"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "DOES NOT FIT" in r.stdout and "Warning" not in r.stderr


def test_exported():
    assert lowbit.plan_memory is plan_memory and lowbit.max_seq_len is max_seq_len
    assert lowbit.MemoryPlan is planner.MemoryPlan
    for name in ("MemoryPlan", "max_seq_len", "plan_memory", "planner"):
        assert name in lowbit.__all__
    assert lowbit.__all__ == sorted(lowbit.__all__, key=str.lower) or lowbit.__all__ == sorted(lowbit.__all__)
    assert math.isclose(planner.FRAGMENTATION, planner.FRAGMENTATION)  # the calibration table is importable
