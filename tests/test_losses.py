"""lowbit.nn.chunked_cross_entropy, causal_lm_loss and offload_activations on
the CPU, against full-logit F.cross_entropy and plain autograd."""
import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.nn import causal_lm_loss, chunked_cross_entropy, offload_activations


def _reference(h, w, y, ignore_index=-100):
    logits = (h @ w.t()).float()
    return F.cross_entropy(logits.reshape(-1, w.shape[0]), y.reshape(-1), ignore_index=ignore_index)


def _grads(fn, *leaves):
    for t in leaves:
        t.grad = None
    loss = fn()
    loss.backward()
    return loss.detach(), [None if t.grad is None else t.grad.clone() for t in leaves]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_matches_full_cross_entropy(dtype, tol, chunk):
    B, S, H, V = 3, 21, 32, 97
    h = torch.randn(B, S, H, dtype=dtype, requires_grad=True)
    w = (torch.randn(V, H) / H**0.5).to(dtype).requires_grad_(True)
    y = torch.randint(0, V, (B, S))
    y[0, :4] = -100
    y[2, -3:] = -100
    loss, (gh, gw) = _grads(lambda: chunked_cross_entropy(h, w, y, chunk_size=chunk), h, w)
    ref, (rh, rw) = _grads(lambda: _reference(h, w, y), h, w)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=tol, atol=tol)
    scale = rh.float().abs().max()
    torch.testing.assert_close(gh.float(), rh.float(), rtol=tol, atol=tol * scale)
    torch.testing.assert_close(gw.float(), rw.float(), rtol=tol, atol=tol * rw.float().abs().max())
    assert gh.dtype == dtype and gw.dtype == dtype
    # Ignored tokens get exactly zero gradient.
    assert gh[0, :4].abs().max() == 0


def test_other_ignore_index_and_frozen_weight():
    h = torch.randn(40, 16, requires_grad=True)
    w = torch.randn(50, 16)
    y = torch.randint(0, 50, (40,))
    y[::3] = 7  # ignore_index=7 removes a class and its tokens
    loss, (gh,) = _grads(lambda: chunked_cross_entropy(h, w, y, chunk_size=9, ignore_index=7), h)
    ref, (rh,) = _grads(lambda: _reference(h, w, y, ignore_index=7), h)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gh, rh)
    assert w.grad is None


def test_all_ignored_gives_zero_not_nan():
    h = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    y = torch.full((2, 5), -100)
    loss = chunked_cross_entropy(h, w, y, chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0
    assert h.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_bad_inputs():
    h, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(h, w, y, chunk_size=0)
    with pytest.raises(ValueError, match="labels have shape"):
        chunked_cross_entropy(h, w, y[:3])
    with pytest.raises(ValueError, match="last dimension"):
        chunked_cross_entropy(h, torch.randn(10, 9), y)
    with pytest.raises(ValueError, match="outside"):
        chunked_cross_entropy(h, w, torch.tensor([0, 1, 10, -100]))
    with pytest.raises(ValueError, match="int64"):
        chunked_cross_entropy(h, w, y.float())


def _tiny_llama(tie=False, quantize=True):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=120, tie_word_embeddings=tie,
                                   max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg)
    if quantize:
        lowbit.quantize_model(model, lora_r=4, compute_dtype=torch.float32, progress=False,
                              target_modules=["q_proj", "v_proj", "down_proj"])
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, lowbit.Linear4bit):
                    m.lora_B.normal_()
    return model


@pytest.mark.parametrize("tie,quantize", [(False, True), (True, False)])
def test_causal_lm_loss_matches_the_model_loss(tie, quantize):
    model = _tiny_llama(tie, quantize)
    model.eval()
    ids = torch.randint(0, 120, (2, 17))
    labels = ids.clone()
    labels[1, :5] = -100
    trainable = [p for p in model.parameters() if p.requires_grad]
    ref, rg = _grads(lambda: model(input_ids=ids, labels=labels).loss, *trainable)
    got, gg = _grads(lambda: causal_lm_loss(model, ids, labels, chunk_size=5), *trainable)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(gg, rg):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if tie:  # the tied embedding/lm_head weight trains through both uses
        assert model.lm_head.weight.grad is not None


def test_offload_is_exact_on_cpu_with_checkpointing():
    model = _tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    torch.manual_seed(1)
    ids = torch.randint(0, 120, (2, 16))
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(5)
    ref, rg = _grads(lambda: model(input_ids=ids, labels=ids).loss, *trainable)

    def lean():
        with offload_activations(min_bytes=0):
            return causal_lm_loss(model, ids)

    torch.manual_seed(5)  # the same dropout masks
    got, gg = _grads(lean, *trainable)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(gg, rg):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_offload_passes_cpu_tensors_through():
    x = torch.randn(8, 8, requires_grad=True)
    with offload_activations(min_bytes=0):
        y = (x.exp() * x).sum()
    y.backward()
    torch.testing.assert_close(x.grad, (x.exp() * x + x.exp()).detach())
    with pytest.raises(ValueError, match="min_bytes"):
        with offload_activations(min_bytes=-1):
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_offload_on_cuda_moves_and_restores():
    x = torch.randn(512, 1024, device="cuda", requires_grad=True)
    ref = torch.autograd.grad((x.sin() * x.cos()).sum(), x)[0]
    before = torch.cuda.memory_allocated()
    with offload_activations(min_bytes=1 << 16):
        y = (x.sin() * x.cos()).sum()
    torch.cuda.synchronize()
    torch.empty(1, device="cuda")  # lets the allocator retire blocks whose copies finished
    held = torch.cuda.memory_allocated() - before
    got = torch.autograd.grad(y, x)[0]
    assert held < x.numel() * 4  # the saved sin/cos copies went to the host
    torch.testing.assert_close(got, ref)
