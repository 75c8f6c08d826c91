#!/usr/bin/env python3
"""tqkv decode attention against torch SDPA (bf16) on one GPU: same shapes, same run.

tqkv is timed by its CLI (`tqkv bench attention --backend cuda --json`), torch here, both the
same two ways:
  graph  N calls captured in a CUDA graph, replayed; events; median per call. Data that fits
         in L2 stays there (steady-state decode of one layer).
  cold   eager calls, L2 flushed before each (a 256 MiB buffer zeroed here; tqkv writes >= 2x
         L2); events time the attention only.
In both, the stream is held by a spin kernel (torch.cuda._sleep) while the host queues the
timed work, so host launch overhead never shows up as GPU time (tqkv holds its stream the
same way with a host-function gate).

"read floor" is tqkv's own streaming-read kernel over a buffer of exactly tqkv's cache bytes,
timed the same two ways in the tqkv process (fastest of a few launch shapes): at short contexts
launch, ramp-up and tail keep even a pure read under the card's bandwidth, and "floor / tqkv"
says how close the attention gets to that read.

Effective GB/s are over each cache's bytes: tqkv's compressed K+V incl. scales (its JSON
"bytes"); SDPA's bf16 K+V = 2*B*S*Hkv*D*2. The fraction is of the card's read bandwidth,
measured once unless --read-bw-gbps is given: best of 10 timed reductions over a 2 GiB float32
buffer (torch.sum and torch.amax, vectorised read-only kernels), bytes read / time. (An int32
view summed into int64 reads at a fraction of that, so it is not used.)

At the end it checks the CUDA issue's targets on the shapes it ran (bench/gpu/targets.py, which
also reads a saved --json file): each target's measured value to three decimals and whether it is
met.

Needs only python3 + torch with CUDA. Usage:
  python3 bench/gpu/compare.py --tqkv .gpu/tqkv [--quick] [--shapes 128:32:8:1:32768,...] [--json OUT]
"""
import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import targets  # noqa: E402  (beside this file; the issue's targets, checked at the end)
from torch.nn.attention import SDPBackend, sdpa_kernel

# (head_dim, q_heads, kv_heads, batch, context): the targets of the CUDA backend's issue.
DEFAULT_SHAPES = (
    [(128, 32, 8, b, s) for b in (1, 8) for s in (1024, 2048, 4096, 32768, 131072)]
    + [(256, 16, 8, 1, s) for s in (32768, 65536)]
    + [(512, 32, 4, 1, s) for s in (32768, 65536)]
)
QUICK_SHAPES = [(128, 32, 8, 1, 4096), (128, 32, 8, 8, 32768), (256, 16, 8, 1, 32768), (512, 32, 4, 1, 32768)]
BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
FLUSH_BYTES = 256 << 20


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def parse_shapes(text):
    shapes = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 5 or not all(p.isdigit() for p in parts):
            raise SystemExit(f"--shapes: '{item}' is not D:Hq:Hkv:B:S (for example 128:32:8:1:32768)")
        d, hq, hkv, b, s = map(int, parts)
        if hkv == 0 or hq % hkv:
            raise SystemExit(f"--shapes: '{item}': Hq must be a multiple of Hkv")
        shapes.append((d, hq, hkv, b, s))
    return shapes


class Holder:
    """Holds the current stream with a spin kernel while the host queues timed work."""

    def __init__(self):
        self.ok = hasattr(torch.cuda, "_sleep")
        self.cycles_per_us = 0.0
        if self.ok:
            torch.cuda._sleep(1000)  # load the kernel
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            n = 2_000_000
            e0.record()
            torch.cuda._sleep(n)
            e1.record()
            e1.synchronize()
            self.cycles_per_us = n / (e0.elapsed_time(e1) * 1e3)

    def hold(self, us):
        if self.ok:
            torch.cuda._sleep(int(self.cycles_per_us * us))


def measure_read_bw(holder, gib=2, repeats=10):
    n_bytes = gib << 30
    x = torch.empty(n_bytes // 4, dtype=torch.float32, device="cuda").uniform_(-1, 1)
    best = 0.0
    methods = {"sum_f32": lambda: torch.sum(x), "amax_f32": lambda: torch.amax(x)}
    detail = {}
    for name, fn in methods.items():
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            holder.hold(50)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) * 1e-3)
        gbps = n_bytes / min(times) / 1e9
        detail[name] = gbps
        best = max(best, gbps)
    del x
    torch.cuda.empty_cache()
    return best, detail


def time_graph(fn, holder, calls, replays):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch's graph docs ask
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            out = fn()
    g.replay()
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(replays + 1)]
    holder.hold(200 + 20 * replays)
    ev[0].record()
    for i in range(replays):
        g.replay()
        ev[i + 1].record()
    torch.cuda.synchronize()
    per_call = [ev[i].elapsed_time(ev[i + 1]) * 1e3 / calls for i in range(replays)]
    check_finite(out, "graph output")
    del g
    return statistics.median(per_call)


def time_cold(fn, holder, flush, repeats):
    fn()
    torch.cuda.synchronize()
    times = []
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(repeats):
        holder.hold(200)
        flush.zero_()
        e0.record()
        out = fn()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3)
    check_finite(out, "output")
    return statistics.median(times)


def why_rejected(caught):
    """torch's reasons for skipping SDPA backends, from its warnings: a "<X> kernel not used
    because:" line, then the reasons. Backends switched off by sdpa_kernel are left out."""
    groups, head = [], None
    for w in caught:
        msg = " ".join(re.sub(r"\(Triggered internally at [^)]*\)\.?", "", str(w.message)).split())
        if not msg:
            continue
        if msg.endswith("because:"):
            head = msg[: -len(" not used because:")]
            groups.append([head])
        elif groups and head:
            groups[-1].append(msg)
    return "; ".join(f"{g[0]}: {' '.join(g[1:])}" for g in groups
                     if len(g) > 1 and not any("disabled" in m for m in g[1:]))


def check_finite(t, what):
    if not bool(torch.isfinite(t).all()):
        raise RuntimeError(f"{what} has non-finite values")


def run_tqkv(args, shape, read_bw, scale):
    d, hq, hkv, b, s = shape
    cmd = [args.tqkv, "bench", "attention", "--backend", "cuda", "--json",
           "--dim", str(d), "--q-heads", str(hq), "--kv-heads", str(hkv), "--context", str(s), "--batch", str(b),
           "--kbits", args.kbits, "--vbits", args.vbits, "--repeats", str(args.repeats),
           "--graph-calls", str(args.graph_calls), "--read-bw-gbps", f"{read_bw:.3f}", "--fill", args.tqkv_fill]
    if scale == "f16":
        cmd.append("--scale-f16")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.tqkv_timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{type(e).__name__}: {e}"
    if p.returncode != 0:
        err = (p.stderr.strip().splitlines() or ["(no message)"])[-1]
        return None, f"exit {p.returncode}: {err}"
    try:
        return json.loads(p.stdout), None
    except json.JSONDecodeError as e:
        return None, f"unreadable JSON ({e}): {p.stdout[:200]!r}"


def sdpa_results(args, shape, holder, flush):
    d, hq, hkv, b, s = shape
    kv_bytes = 2 * b * s * hkv * d * 2
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    # Allocated as (B, S, Hkv, D) and viewed as (B, Hkv, S, D): the strides of a serving KV cache,
    # and the layout cuDNN wants.
    k = torch.randn(b, s, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2)
    v = torch.randn(b, s, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2)
    scale = 1.0 / math.sqrt(d)
    rows = []
    for name in args.sdpa_backends:
        row = {"impl": f"sdpa-{name}", "bytes": kv_bytes}

        def fn(backend=BACKENDS[name]):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                check_finite(fn(), "output")
                torch.cuda.synchronize()
            except Exception as e:  # no kernel for this shape/backend: report, go on
                # torch says why it rejected the backend in warnings; the exception only says "no kernel".
                why = why_rejected(caught)
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                row["error"] = (why if why and "No available kernel" in first else f"{type(e).__name__}: {first}")[:500]
                rows.append(row)
                continue
        for mode, timer in (("graph", lambda: time_graph(fn, holder, args.graph_calls, args.repeats)),
                            ("cold", lambda: time_cold(fn, holder, flush, args.repeats))):
            try:
                row[f"us_{mode}"] = timer()
            except Exception as e:
                row[f"error_{mode}"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"[:300]
                try:
                    torch.cuda.synchronize()
                except Exception:
                    pass
        rows.append(row)
    del q, k, v
    torch.cuda.empty_cache()
    return rows


def add_rates(row, read_bw):
    for mode in ("graph", "cold"):
        us = row.get(f"us_{mode}")
        if us:
            row[f"GBps_{mode}"] = row["bytes"] / (us * 1e-6) / 1e9
            row[f"frac_bw_{mode}"] = row[f"GBps_{mode}"] / read_bw


def fmt_num(x, spec):
    return "n/a" if x is None else format(x, spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tqkv", help="tqkv CLI binary (e.g. .gpu/tqkv); without it only SDPA is timed")
    ap.add_argument("--shapes", help="D:Hq:Hkv:B:S,... (default: the issue's targets)")
    ap.add_argument("--quick", action="store_true", help="4 shapes, fewer repeats")
    ap.add_argument("--kbits", default="4")
    ap.add_argument("--vbits", default="4")
    ap.add_argument("--repeats", type=int, default=0, help="timed replays / cold calls (default 30, quick 10)")
    ap.add_argument("--graph-calls", type=int, default=20, help="calls per captured graph")
    ap.add_argument("--sdpa-backends", default="cudnn,flash", help="of: " + ",".join(BACKENDS))
    ap.add_argument("--read-bw-gbps", type=float, default=0, help="skip the bandwidth measurement")
    ap.add_argument("--tqkv-fill", default="append", choices=["append", "copy"],
                    help="how tqkv fills its caches: device appends, or a host cache copied over")
    ap.add_argument("--tqkv-scales", default="f32",
                    help="TurboQuant row scale types to time, comma-separated: f32, f16 (one tqkv run each)")
    ap.add_argument("--tqkv-timeout", type=float, default=300, help="seconds per tqkv run")
    ap.add_argument("--json", help="write every result here")
    args = ap.parse_args()
    args.sdpa_backends = [x.strip() for x in args.sdpa_backends.split(",") if x.strip()]
    for name in args.sdpa_backends:
        if name not in BACKENDS:
            raise SystemExit(f"--sdpa-backends: '{name}' is not one of {','.join(BACKENDS)}")
    args.tqkv_scales = [x.strip() for x in args.tqkv_scales.split(",") if x.strip()]
    if not args.tqkv_scales or any(x not in ("f32", "f16") for x in args.tqkv_scales) or \
            len(set(args.tqkv_scales)) != len(args.tqkv_scales):
        raise SystemExit("--tqkv-scales: a comma-separated list of distinct f32, f16")
    if not args.repeats:
        args.repeats = 10 if args.quick else 30
    shapes = parse_shapes(args.shapes) if args.shapes else (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    if not torch.cuda.is_available():
        raise SystemExit("compare.py: torch sees no CUDA device")

    props = torch.cuda.get_device_properties(0)
    holder = Holder()
    env = {"device": props.name, "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version(), "hold_kernel": holder.ok,
           "kbits": args.kbits, "vbits": args.vbits, "repeats": args.repeats, "graph_calls": args.graph_calls}
    if args.read_bw_gbps > 0:
        read_bw = args.read_bw_gbps
        env["read_bw"] = {"gbps": read_bw, "method": "given (--read-bw-gbps)"}
    else:
        read_bw, detail = measure_read_bw(holder)
        env["read_bw"] = {"gbps": read_bw, "method": "best of 10 timed torch.sum / torch.amax over 2 GiB of float32",
                          "by_method": detail}
    log(f"{props.name}, torch {torch.__version__}, cuDNN {env['cudnn']}; read bandwidth {read_bw:.0f} GB/s "
        f"({env['read_bw']['method']})")
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")

    results = []
    for shape in shapes:
        d, hq, hkv, b, s = shape
        label = f"D{d} Hq{hq} Hkv{hkv} B{b} S{s}"
        log(f"{label} ...")
        t0 = time.time()
        rows, tqkv_raw = [], {}
        # One tqkv run per scale type; the dense f16 cache does not depend on it, so only the
        # first run's is kept. Rows of f16-scale runs carry targets.row_suffix in their names.
        for scale in args.tqkv_scales if args.tqkv else []:
            sfx = targets.row_suffix(scale)
            torch.cuda.empty_cache()  # leave the card to the tqkv process
            res, err = run_tqkv(args, shape, read_bw, scale)
            if err:
                rows.append({"impl": f"tqkv k{args.kbits}/v{args.vbits}{sfx}", "error": err, "compressed": True})
                continue
            for r in res["rows"]:
                compressed = "tq" in r["cache"]
                if not compressed and scale != args.tqkv_scales[0]:
                    continue
                rows.append({"impl": f"tqkv {r['cache']}{sfx if compressed else ''}", "bytes": r["bytes"],
                             "us_graph": r["us_graph"], "us_cold": r["us_cold"], "compressed": compressed,
                             "scale_dtype": scale, "compressed_rows_read": r["compressed_rows_read"],
                             "max_abs_err_vs_reference": r.get("max_abs_err_vs_reference")})
            # The fastest pure read of the same bytes, timed the same ways by the same process:
            # what no decode kernel over this cache can beat on this card.
            fl = res["rows"][0].get("read_floor") if res["rows"] else None
            if fl:
                rows.append({"impl": "read floor" + sfx, "bytes": fl["bytes"], "us_graph": fl["us_graph"],
                             "us_cold": fl["us_cold"], "variant_graph": fl["variant_graph"],
                             "variant_cold": fl["variant_cold"], "floor_of": scale})
            env.setdefault("tqkv_device", res["shape"].get("device"))
            tqkv_raw[scale] = res
        rows += sdpa_results(args, shape, holder, flush)
        for r in rows:
            if "bytes" in r:
                add_rates(r, read_bw)
        entry = {"shape": {"dim": d, "q_heads": hq, "kv_heads": hkv, "batch": b, "context": s}, "rows": rows,
                 "tqkv": tqkv_raw.get(args.tqkv_scales[0]) if args.tqkv else None,
                 "tqkv_other_scales": {k: v for k, v in tqkv_raw.items() if k != args.tqkv_scales[0]},
                 "by_scale": {}}
        sdpa_ok = [r for r in rows if r["impl"].startswith("sdpa") and "error" not in r]
        for scale in args.tqkv_scales if args.tqkv else []:
            tq = next((r for r in rows if r.get("compressed") and r.get("scale_dtype") == scale), None)
            floor = next((r for r in rows if r.get("floor_of") == scale), None)
            e = {}
            for mode in ("graph", "cold"):
                if tq and floor and tq.get(f"us_{mode}"):
                    e[f"floor_over_tqkv_{mode}"] = floor[f"us_{mode}"] / tq[f"us_{mode}"]
                timed = [r for r in sdpa_ok if r.get(f"us_{mode}")]
                if tq and tq.get(f"us_{mode}") and timed:
                    best = min(timed, key=lambda r: r[f"us_{mode}"])
                    e[f"speedup_{mode}"] = best[f"us_{mode}"] / tq[f"us_{mode}"]
                    e[f"best_sdpa_{mode}"] = best["impl"]
            entry["by_scale"][scale] = e
            if scale == args.tqkv_scales[0]:
                entry.update(e)  # the first scale type's figures under the keys of earlier reports
        entry["seconds"] = time.time() - t0
        results.append(entry)

    print(f"\n{env['device']}: read bandwidth {read_bw:.0f} GB/s; tqkv K{args.kbits}/V{args.vbits}; "
          f"median per call; frac = of read bandwidth")
    hdr = f"{'shape':<30} {'impl':<14} {'us graph':>9} {'us cold':>9} {'GB/s g':>7} {'GB/s c':>7} {'frac g':>6} {'frac c':>6}"
    print(hdr)
    for e in results:
        sh = e["shape"]
        label = f"D{sh['dim']} Hq{sh['q_heads']} Hkv{sh['kv_heads']} B{sh['batch']} S{sh['context']}"
        for r in e["rows"]:
            if "error" in r:
                print(f"{label:<30} {r['impl']:<14} n/a: {r['error'][:160]}")
                continue
            print(f"{label:<30} {r['impl']:<14} {fmt_num(r.get('us_graph'), '9.2f')} {fmt_num(r.get('us_cold'), '9.2f')} "
                  f"{fmt_num(r.get('GBps_graph'), '7.0f')} {fmt_num(r.get('GBps_cold'), '7.0f')} "
                  f"{fmt_num(r.get('frac_bw_graph'), '6.2f')} {fmt_num(r.get('frac_bw_cold'), '6.2f')}")
            for m in ("graph", "cold"):
                if f"error_{m}" in r:
                    print(f"{'':<30} {'':<14} {m} n/a: {r[f'error_{m}'][:90]}")
        for scale, v in e.get("by_scale", {}).items():
            sfx = targets.row_suffix(scale)
            if "speedup_graph" in v or "speedup_cold" in v:
                parts = [f"{m} {v[f'speedup_{m}']:.2f}x (vs {v[f'best_sdpa_{m}']})" for m in ("graph", "cold")
                         if f"speedup_{m}" in v]
                print(f"{label:<30} {'tqkv speedup' + sfx:<14} " + ", ".join(parts))
            if "floor_over_tqkv_graph" in v:
                print(f"{label:<30} {'floor / tqkv' + sfx:<14} graph {v['floor_over_tqkv_graph']:.2f}, "
                      f"cold {v['floor_over_tqkv_cold']:.2f} (1.00 = as fast as a pure read of the same bytes)")
    targets.print_summary(results, device=env["device"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "results": results}, f, indent=1)
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
