"""Drives the AdamW8bit CUDA kernel (8-bit and float32 states, several dtypes,
odd sizes, paged and unpaged) for compute-sanitizer, checking against the CPU."""
import torch

from lowbit.optim import AdamW8bit, PagedAdamW8bit


def run(cls, device, dtype, shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device, dtype)) for s in shapes]
    opt = cls(params, lr=1e-2, weight_decay=0.1)
    for step in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(device, dtype)
        opt.step()
    return [p.detach().cpu() for p in params]


def main():
    shapes = [(7,), (4096,), (4097,), (300, 257), (1000, 1001), (33, 65)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        cpu = run(AdamW8bit, "cpu", dtype, shapes)
        for cls in (AdamW8bit, PagedAdamW8bit):
            gpu = run(cls, "cuda", dtype, shapes)
            for a, b in zip(cpu, gpu):
                assert torch.equal(a, b), (cls.__name__, dtype, a.shape, (a != b).sum().item())
    # More tensors than one launch takes (448 with CUDA >= 12.1 large kernel
    # parameters): several full argument structs, 8-bit and float32 states mixed.
    many = [(4100,)] * 450 + [(100,)] * 20
    cpu = run(AdamW8bit, "cpu", torch.float32, many, seed=1)
    gpu = run(AdamW8bit, "cuda", torch.float32, many, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(cpu, gpu)), "470-tensor step differs from the CPU"
    torch.cuda.synchronize()
    print("sanitize_optim: all kernels ran and matched the CPU")


if __name__ == "__main__":
    main()
