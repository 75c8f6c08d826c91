#!/usr/bin/env python3
"""Checks tqkv's forward pass against Hugging Face transformers on the same GGUF file.

Both run the same token ids (tqkv's tokenization; HF's own tokenizer is not involved), tqkv with
an f32 KV cache, HF in float32 on the CPU. Prints a markdown table of per-prompt agreement.
Needs: torch, transformers, gguf (pip). Usage: compare_hf.py --tqkv build/release/tools/tqkv/tqkv
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

PROMPTS = [
    "The GNU General Public License is a free, copyleft license for software and other kinds of works.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Once upon a time, in a small village at the edge of the forest, there lived an old clockmaker who",
    "Q: What is the capital of France?\nA: The capital of France is Paris.\nQ: What is 12 times 12?\nA:",
    # Longer than Gemma 3's 512-token sliding window, so its local layers must drop old positions.
    open("/usr/share/common-licenses/GPL-3", encoding="utf-8").read()[:3600],
]
FILES = {"smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf", "gemma3": "gemma-3-270m-q4_k_m.gguf"}


def log_softmax(x):
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tqkv", required=True)
    ap.add_argument("--models", default="smollm2,gemma3")
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    cache = os.environ.get("TQKV_CACHE_DIR", os.path.expanduser("~/.cache/tqkv"))
    print("| model | prompt | tokens | max abs diff | rel. error | top-1 agree | KL(hf‖tqkv) mean |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = AutoModelForCausalLM.from_pretrained(os.path.join(cache, "models"), gguf_file=FILES[name], dtype=torch.float32)
        model.eval()
        for i, prompt in enumerate(PROMPTS):
            with tempfile.NamedTemporaryFile(suffix=".f32") as tmp:
                meta = json.loads(subprocess.run([args.tqkv, "dump-logits", "--model", name, "--prompt", prompt,
                                                  "--out", tmp.name], check=True, capture_output=True, text=True).stdout)
                ours = np.fromfile(tmp.name, dtype=np.float32).reshape(len(meta["tokens"]), meta["vocab"])
            with torch.no_grad():
                theirs = model(torch.tensor([meta["tokens"]])).logits[0].float().numpy()
            theirs = theirs[:, : ours.shape[1]]
            diff = np.abs(ours - theirs).max()
            rel = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
            agree = (ours.argmax(-1) == theirs.argmax(-1)).mean()
            lp, lq = log_softmax(theirs.astype(np.float64)), log_softmax(ours.astype(np.float64))
            kl = (np.exp(lp) * (lp - lq)).sum(-1).mean()
            print(f"| {name} | {i} | {len(meta['tokens'])} | {diff:.3g} | {rel:.3g} | {agree:.3f} | {kl:.3g} |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
