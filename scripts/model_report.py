#!/usr/bin/env python3
"""Runs `tqkv perplexity --json` on the real models and writes markdown tables for docs/models.md.

Each run is one process: the f32-cache reference and every cache type see the same tokens, and
KL divergence / top-1 agreement are measured against that reference. The raw JSON of every run
is kept next to the tables (docs/results/), so each number can be traced to its command.
Usage: scripts/model_report.py --tqkv build/release/tools/tqkv/tqkv [--runs smollm2:2048,gemma3:2048]
"""
import argparse
import json
import os
import subprocess
import sys

COMPARE = "f16,q8_0,q8_0-rot,q4_0,q4_0-rot,tq8,tq8/tq4,tq4,tq4/tq3,tq3,tq2"


def run(tqkv, model, ctx, compare, extra, out_json):
    cmd = [tqkv, "perplexity", "--model", model, "--ctx", str(ctx), "--compare", compare, "--json"] + extra
    print("running:", " ".join(cmd), file=sys.stderr, flush=True)
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    data = json.loads(res.stdout)
    data["command"] = " ".join(["tqkv"] + cmd[1:])
    with open(out_json, "w") as f:
        json.dump(data, f, indent=1)
    return data


def table(d):
    f32 = d["rows"][0]["kv_bytes_per_token"]
    lines = [f"`{d['command']}`", "",
             f"{d['model']}, ctx {d['ctx']}, {d['rows'][0]['scored_tokens']} scored tokens "
             f"({d['text_tokens']} tokens of {d['text']})", "",
             "| cache K/V | PPL | KL mean | KL p99 | top-1 | KV bytes/token | vs f32 | tok/s | rows read (trace) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        trace = (f"TQ {r['tq_rows_read']:,}" if r["tq_rows_read"] else
                 f"q {r['block_rows_read']:,}" if r["block_rows_read"] else f"dense {r['dense_rows_read']:,}")
        lines.append(f"| {r['cache']} | {r['ppl']:.4f} ± {r['ppl_err']:.3f} | {r['kl_mean']:.5f} | {r['kl_p99']:.4f} | "
                     f"{100 * r['top1']:.2f}% | {r['kv_bytes_per_token']:,} | {f32 / r['kv_bytes_per_token']:.2f}x | "
                     f"{r['tokens_per_s']:.0f} | {trace} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tqkv", required=True)
    ap.add_argument("--runs", default="smollm2:2048,gemma3:2048")
    ap.add_argument("--compare", default=COMPARE)
    ap.add_argument("--extra", default="", help="extra flags for tqkv perplexity, e.g. '--policy first2=tq8'")
    ap.add_argument("--outdir", default="docs/results")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    os.makedirs(args.outdir, exist_ok=True)
    for spec in args.runs.split(","):
        model, ctx = spec.split(":")
        name = f"{model}-ctx{ctx}{args.tag}"
        d = run(args.tqkv, model, int(ctx), args.compare, args.extra.split(), os.path.join(args.outdir, name + ".json"))
        print(f"### {name}\n\n{table(d)}\n", flush=True)


if __name__ == "__main__":
    main()
