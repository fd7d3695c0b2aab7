"""Whole-model checkpoints: a 16-bit HF directory loaded straight into 4 bits,
the bitsandbytes 4-bit layout written and read back, and the same files read
and written by transformers + bitsandbytes. Skipped without transformers."""
import json
import os
import shutil

import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit import Linear4bit

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

try:
    import bitsandbytes as bnb
except ImportError:
    bnb = None
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed")


def tiny_config(**kw):
    return transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, max_position_embeddings=64, **kw)


def save_base(path, **kw):
    g = torch.random.get_rng_state()
    torch.manual_seed(1234)
    model = transformers.LlamaForCausalLM(tiny_config(**kw)).to(torch.bfloat16)
    torch.random.set_rng_state(g)
    # Small shards: the loaders must stream across several files.
    model.save_pretrained(path, safe_serialization=True, max_shard_size="40KB")
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = save_base(str(tmp_path_factory.mktemp("base")))
    assert os.path.isfile(os.path.join(d, "model.safetensors.index.json"))
    return d


@pytest.fixture(scope="module")
def quant_dir(base_dir, tmp_path_factory):
    """A lowbit 4-bit checkpoint (one file, easy to tamper with)."""
    d = str(tmp_path_factory.mktemp("quant"))
    model, _ = lowbit.load_pretrained_4bit(base_dir, device="cpu", lora_r=0, progress=False)
    lowbit.save_quantized(model, d)
    return d


def ids():
    return torch.randint(0, 100, (2, 7))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits.float()


def hf16(base_dir):
    return transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)


# ------------------------------------------------------------------ 16-bit -> 4 bits


@pytest.mark.parametrize("quant_type,blocksize,double_quant", [("nf4", 64, True), ("fp4", 128, False)])
def test_load_pretrained_4bit_equals_quantize_model(base_dir, quant_type, blocksize, double_quant):
    kw = dict(quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    model, summary = lowbit.load_pretrained_4bit(base_dir, device="cpu", lora_r=0, progress=False, **kw)
    ref = hf16(base_dir)
    ref_summary = lowbit.quantize_model(ref, lora_r=0, progress=False, **kw)
    assert summary.converted == ref_summary.converted and summary.layers_converted == 14
    assert (summary.bytes_before, summary.bytes_after) == (ref_summary.bytes_before, ref_summary.bytes_after)
    a, b = model.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert isinstance(model.model.layers[1].mlp.down_proj, Linear4bit)
    assert type(model.lm_head) is nn.Linear
    x = ids()
    assert torch.equal(logits(model, x), logits(ref.eval(), x))


def test_load_pretrained_4bit_lora_and_freezing(base_dir):
    model, summary = lowbit.load_pretrained_4bit(base_dir, device="cpu", lora_r=4, lora_alpha=8,
                                                 target_modules=["q_proj", "v_proj"], progress=False)
    assert summary.layers_converted == 4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.{p}.{w}" for i in range(2)
                         for p in ("q_proj", "v_proj") for w in ("lora_A", "lora_B")}
    assert summary.trainable_params == 2 * 4 * (64 + 64) + 2 * 4 * (64 + 32)  # v_proj: 2 kv heads of 16
    assert type(model.model.layers[0].self_attn.k_proj) is nn.Linear
    # B starts at zero: the adapted model computes what the plain 4-bit one does.
    plain, _ = lowbit.load_pretrained_4bit(base_dir, device="cpu", lora_r=0, target_modules=["q_proj", "v_proj"],
                                           progress=False)
    x = ids()
    assert torch.equal(logits(model, x), logits(plain, x))


def test_load_pretrained_4bit_drops_each_16bit_weight(base_dir, monkeypatch):
    # Every 16-bit weight must be gone before the next one is quantized: the
    # peak is the 4-bit model plus one 16-bit tensor, never the whole model.
    import weakref

    from lowbit.io import hf

    seen, live_at_call = [], []
    quantize = hf.F.quantize_4bit

    def spy(w, *a, **kw):
        if not w.is_meta:  # meta: the skeleton's placeholders, no memory
            live_at_call.append(sum(r() is not None for r in seen))
            seen.append(weakref.ref(w))
        return quantize(w, *a, **kw)

    monkeypatch.setattr(hf.F, "quantize_4bit", spy)
    lowbit.load_pretrained_4bit(base_dir, device="cpu", lora_r=0, progress=False)
    assert len(seen) == 14 and live_at_call == [0] * 14
    assert all(r() is None for r in seen)


# ------------------------------------------------------------------ save -> load


def test_save_load_quantized_roundtrip(base_dir, tmp_path):
    model, _ = lowbit.load_pretrained_4bit(base_dir, device="cpu", lora_r=4, progress=False)
    out = str(tmp_path / "q")
    names = lowbit.save_quantized(model, out, max_shard_size="20KB")
    assert len(names) > 1 and os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert not any("lora_" in k for k in weight_map), "adapters belong to save_adapter, not the checkpoint"
    # A layer's packed weight and quant state share a shard.
    q = "model.layers.0.self_attn.q_proj.weight"
    assert len({weight_map[k] for k in weight_map if k.startswith(q)}) == 1

    with open(os.path.join(out, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    expected = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["lm_head"]).to_dict()
    assert qc == expected
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] is True and qc["load_in_8bit"] is False
    assert qc["bnb_4bit_quant_storage"] == "uint8" and qc["llm_int8_skip_modules"] == ["lm_head"]

    loaded = lowbit.load_quantized(out, device="cpu", progress=False)
    assert not any(p.requires_grad for p in loaded.parameters())
    a = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    b = loaded.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    x = ids()
    assert torch.equal(logits(model, x), logits(loaded, x))

    with_lora = lowbit.load_quantized(out, device="cpu", lora_r=2, lora_target_modules=["o_proj"], progress=False)
    assert {n for n, p in with_lora.named_parameters() if p.requires_grad} == {
        f"model.layers.{i}.self_attn.o_proj.lora_{w}" for i in range(2) for w in "AB"}


def test_tied_embeddings(tmp_path):
    base = save_base(str(tmp_path / "base"), tie_word_embeddings=True)
    model, _ = lowbit.load_pretrained_4bit(base, device="cpu", lora_r=0, progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    out = str(tmp_path / "q")
    lowbit.save_quantized(model, out)
    assert "lm_head.weight" not in load_file(os.path.join(out, "model.safetensors"))
    loaded = lowbit.load_quantized(out, device="cpu", progress=False)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    x = ids()
    assert torch.equal(logits(model, x), logits(loaded, x))


def test_plain_module_with_skeleton(tmp_path):
    # No transformers config: the caller brings the skeleton.
    net = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))
    lowbit.quantize_model(net, lora_r=0, skip_modules=("2",), progress=False)
    lowbit.save_quantized(net, str(tmp_path))
    assert not os.path.exists(tmp_path / "config.json")
    with torch.device("meta"):
        skel = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))
    loaded = lowbit.load_quantized(str(tmp_path), device="cpu", model=skel, progress=False)
    assert isinstance(loaded[0], Linear4bit) and type(loaded[2]) is nn.Linear
    x = torch.randn(3, 64)
    assert torch.equal(net(x), loaded(x))


# ------------------------------------------------------------------ bitsandbytes interop


@needs_bnb
def test_biased_tied_model_through_transformers_bnb(tmp_path):
    # Qwen2: q/k/v projections carry biases, and the embeddings are tied.
    cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    transformers.Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(tmp_path / "base"))
    model, _ = lowbit.load_pretrained_4bit(str(tmp_path / "base"), device="cpu", lora_r=0, progress=False)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    lowbit.save_quantized(model, str(tmp_path / "q"))
    bq = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"), device_map="cpu")
    assert isinstance(bq.model.layers[0].self_attn.k_proj, bnb.nn.Linear4bit)
    assert torch.equal(bq.model.layers[0].self_attn.k_proj.bias, model.model.layers[0].self_attn.k_proj.bias)
    x = ids()
    ref, got = logits(bq, x), logits(model, x)
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max()
    assert torch.equal(logits(lowbit.load_quantized(str(tmp_path / "q"), device="cpu", progress=False), x), got)




def bnb_dequant(layer):
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


@needs_bnb
@pytest.mark.parametrize("quant_type,double_quant,compute_dtype,storage", [
    ("nf4", True, torch.bfloat16, torch.uint8),
    # bf16 storage (what FSDP setups use) holds the same packed bytes, two codes a byte.
    ("fp4", False, torch.float32, torch.bfloat16),
])
def test_transformers_bnb_checkpoint_loads(base_dir, tmp_path, quant_type, double_quant, compute_dtype, storage):
    bq = transformers.AutoModelForCausalLM.from_pretrained(
        base_dir, device_map="cpu", quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=storage))
    out = str(tmp_path / "bnb")
    bq.save_pretrained(out, safe_serialization=True)
    loaded = lowbit.load_quantized(out, device="cpu", progress=False)
    n = 0
    for name, m in bq.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            mine = loaded.get_submodule(name)
            assert isinstance(mine, Linear4bit), name
            assert mine.compute_dtype == compute_dtype and mine.quant_state.quant_type == quant_type
            assert mine.quant_state.nested == double_quant and mine.weight.dtype == torch.uint8
            assert torch.equal(mine.dequantized_weight(torch.bfloat16), bnb_dequant(m)), name
            n += 1
    assert n == 14
    x = ids()
    ref, got = logits(bq, x), logits(loaded, x)
    # Both compute in bf16 from identical weights; only the accumulation order differs.
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max()


@needs_bnb
def test_lowbit_checkpoint_loads_in_transformers_bnb(quant_dir):
    ours = lowbit.load_quantized(quant_dir, device="cpu", progress=False)
    bq = transformers.AutoModelForCausalLM.from_pretrained(quant_dir, device_map="cpu")
    n = 0
    for name, m in ours.named_modules():
        if isinstance(m, Linear4bit):
            theirs = bq.get_submodule(name)
            assert isinstance(theirs, bnb.nn.Linear4bit), name
            assert torch.equal(bnb_dequant(theirs), m.dequantized_weight(torch.bfloat16)), name
            n += 1
    assert n == 14
    x = ids()
    ref, got = logits(bq, x), logits(ours, x)
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max()


@needs_bnb
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_single_layer_both_ways(quant_type, double_quant):
    lin = nn.Linear(192, 80, bias=True).to(torch.bfloat16)
    x = torch.randn(5, 192, dtype=torch.bfloat16)

    # bnb quantizes and saves; lowbit loads.
    theirs = bnb.nn.Linear4bit(192, 80, bias=True, compute_dtype=torch.bfloat16, quant_type=quant_type,
                               compress_statistics=double_quant)
    theirs.load_state_dict(lin.state_dict())
    theirs = theirs.to("cpu")  # bnb quantizes on the move to a device
    sd = theirs.state_dict()
    assert f"weight.quant_state.bitsandbytes__{quant_type}" in sd
    mine = Linear4bit(192, 80, bias=True, compute_dtype=torch.bfloat16)
    mine.load_state_dict(sd)
    assert mine.quant_state.quant_type == quant_type and mine.quant_state.nested == double_quant
    w = bnb_dequant(theirs)
    assert w.dtype == mine.quant_state.dtype == torch.float32  # bnb made the layer in float32
    assert torch.equal(mine.dequantized_weight(torch.float32), w)
    # Outputs: each within bf16 matmul tolerance of "dequantize then matmul".
    ref = x.float() @ w.float().t() + lin.bias.float()
    with torch.no_grad():
        for y in (mine(x).float(), theirs.eval()(x).float()):
            assert (y - ref).abs().max() <= 0.02 * ref.abs().max()

    # lowbit quantizes and saves; bnb loads the same keys.
    mine2 = Linear4bit.from_linear(lin, quant_type=quant_type, double_quant=double_quant)
    sd2 = mine2.state_dict()
    other = bnb.nn.Linear4bit(192, 80, bias=True, compute_dtype=torch.bfloat16, quant_type=quant_type,
                              device="meta")
    stats = {k[len("weight."):]: v for k, v in sd2.items() if k.startswith("weight.")}
    other.weight = bnb.nn.Params4bit.from_prequantized(sd2["weight"], stats, device="cpu", module=other)
    other.bias = nn.Parameter(sd2["bias"])
    assert torch.equal(bnb_dequant(other), mine2.dequantized_weight(mine2.quant_state.dtype))
    with torch.no_grad():
        a, b = mine2(x).float(), other.eval()(x).float()
    assert (a - b).abs().max() <= 0.02 * b.abs().max()


# ------------------------------------------------------------------ bad input


def copy_with(src, dst, edit=None, config_edit=None):
    os.makedirs(dst)
    for f in os.listdir(src):
        shutil.copy(os.path.join(src, f), dst)
    if edit is not None:
        path = os.path.join(dst, "model.safetensors")
        tensors = load_file(path)
        edit(tensors)
        save_file(tensors, path, metadata={"format": "pt"})
    if config_edit is not None:
        path = os.path.join(dst, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        config_edit(cfg)
        with open(path, "w") as f:
            json.dump(cfg, f)
    return dst


def test_missing_directory_and_config(tmp_path, base_dir):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        lowbit.load_quantized(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        lowbit.load_quantized(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        lowbit.load_pretrained_4bit(str(tmp_path))
    with pytest.raises(ValueError, match="no quantization_config.*load_pretrained_4bit"):
        lowbit.load_quantized(base_dir)


def test_wrong_quantization_config(tmp_path, quant_dir):
    def eight_bit(cfg):
        cfg["quantization_config"].update(load_in_4bit=False, _load_in_4bit=False, load_in_8bit=True)

    d = copy_with(quant_dir, str(tmp_path / "q8"), config_edit=eight_bit)
    with pytest.raises(ValueError, match="8-bit bitsandbytes model; expected quant_method 'bitsandbytes'"):
        lowbit.load_quantized(d)
    d = copy_with(quant_dir, str(tmp_path / "gptq"),
                  config_edit=lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4}))
    with pytest.raises(ValueError, match="quant_method 'gptq'"):
        lowbit.load_quantized(d)
    with pytest.raises(ValueError, match="already holds a 4-bit bitsandbytes model; use lowbit.load_quantized"):
        lowbit.load_pretrained_4bit(quant_dir)


def test_missing_and_unexpected_keys(tmp_path, quant_dir):
    d = copy_with(quant_dir, str(tmp_path / "a"), edit=lambda t: t.pop("model.norm.weight"))
    with pytest.raises(ValueError, match=r"lacks 1 tensor\(s\) the model needs: \['model.norm.weight'\]"):
        lowbit.load_quantized(d, device="cpu", progress=False)
    d = copy_with(quant_dir, str(tmp_path / "b"),
                  edit=lambda t: t.pop("model.layers.1.mlp.up_proj.weight.absmax"))
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj: .*missing key "
                                         r"'model.layers.1.mlp.up_proj.weight.absmax'"):
        lowbit.load_quantized(d, device="cpu", progress=False)
    d = copy_with(quant_dir, str(tmp_path / "c"), edit=lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"needs: \['model.layers.0.self_attn.k_proj.weight'\]"):
        lowbit.load_quantized(d, device="cpu", progress=False)
    d = copy_with(quant_dir, str(tmp_path / "d"), edit=lambda t: t.update({"model.extra.weight": torch.ones(3)}))
    with pytest.raises(ValueError, match=r"no place for: \['model.extra.weight'\]"):
        lowbit.load_quantized(d, device="cpu", progress=False)


def test_malformed_quant_state_json(tmp_path, quant_dir):
    key = "model.layers.0.mlp.gate_proj.weight.quant_state.bitsandbytes__nf4"
    d = copy_with(quant_dir, str(tmp_path / "a"),
                  edit=lambda t: t.update({key: torch.tensor(list(b'{"blocksize": 64, '), dtype=torch.uint8)}))
    with pytest.raises(ValueError, match="model.layers.0.mlp.gate_proj: cannot load the 4-bit weight: .*valid UTF-8 JSON"):
        lowbit.load_quantized(d, device="cpu", progress=False)

    def wrong_shape(t):
        meta = json.loads(bytes(t[key].tolist()))
        meta["shape"] = [64, 128]
        t[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)

    d = copy_with(quant_dir, str(tmp_path / "b"), edit=wrong_shape)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj: checkpoint weight has shape \[64, 128\], "
                                         r"this layer is \[128, 64\]"):
        lowbit.load_quantized(d, device="cpu", progress=False)


def test_shape_mismatch(tmp_path, quant_dir, base_dir):
    d = copy_with(quant_dir, str(tmp_path / "a"), edit=lambda t: t.update({"model.norm.weight": torch.ones(32)}))
    with pytest.raises(ValueError, match=r"model.norm.weight: the checkpoint holds shape \[32\], the model expects \[64\]"):
        lowbit.load_quantized(d, device="cpu", progress=False)
    d = copy_with(base_dir, str(tmp_path / "b"), config_edit=lambda c: c.update(intermediate_size=96))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.(gate|up)_proj.weight: the checkpoint holds shape "
                                         r"\[128, 64\], the model expects \[96, 64\]"):
        lowbit.load_pretrained_4bit(d, device="cpu", progress=False)


def test_save_quantized_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no Linear4bit layers"):
        lowbit.save_quantized(nn.Sequential(nn.Linear(8, 8)), str(tmp_path))
    net = nn.Sequential(nn.Linear(64, 64))
    lowbit.quantize_model(net, lora_r=0, skip_modules=(), progress=False)
    with pytest.raises(ValueError, match="safetensors only"):
        lowbit.save_quantized(net, str(tmp_path), safe_serialization=False)
    with pytest.raises(ValueError, match="max_shard_size"):
        lowbit.save_quantized(net, str(tmp_path), max_shard_size="lots")
