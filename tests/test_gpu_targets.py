#!/usr/bin/env python3
"""bench/gpu/targets.py on made-up compare.py results: each verdict can come out either way."""
import io
import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench", "gpu"))
import targets  # noqa: E402


def entry(d, hq, hkv, b, s, rows):
    return {"shape": {"dim": d, "q_heads": hq, "kv_heads": hkv, "batch": b, "context": s}, "rows": rows}


def row(impl, us_graph, us_cold=None, frac=None, **kw):
    r = {"impl": impl, "us_graph": us_graph, "us_cold": us_cold if us_cold is not None else us_graph * 1.2}
    if frac is not None:
        r["frac_bw_graph"] = frac
    r.update(kw)
    return r


def verdicts(results):
    return {(t, label, scale): met for t, label, scale, _, met in targets.check(results)}


class Targets(unittest.TestCase):
    def test_speedup_is_not_rounded(self):
        rows = [row("tqkv tq4", 54.35, frac=0.842), row("read floor", 46.35), row("sdpa-cudnn", 179.11),
                row("sdpa-flash", 187.85)]
        v = verdicts([entry(128, 32, 8, 1, 131072, rows)])
        key = ("vs cuDNN >= 3.3x (graph)", "D128 Hq32 Hkv8 B1 S131072", "f32")
        self.assertEqual(v[key], "no")  # 3.2955x prints as 3.30x elsewhere
        rows[0]["us_graph"] = 54.0
        self.assertEqual(verdicts([entry(128, 32, 8, 1, 131072, rows)])[key], "yes")

    def test_bandwidth_both_ways(self):
        rows = [row("tqkv tq4", 54.35, frac=0.842), row("read floor", 46.35), row("sdpa-cudnn", 179.11)]
        key = ("read BW >= 0.85 (graph)", "D128 Hq32 Hkv8 B1 S131072", "f32")
        self.assertEqual(verdicts([entry(128, 32, 8, 1, 131072, rows)])[key], "by the floor only")
        rows[0]["frac_bw_graph"] = 0.86
        self.assertEqual(verdicts([entry(128, 32, 8, 1, 131072, rows)])[key], "yes")
        rows[1]["us_graph"] = 40.0
        self.assertEqual(verdicts([entry(128, 32, 8, 1, 131072, rows)])[key], "by measured BW only")
        rows[0]["frac_bw_graph"] = 0.7
        self.assertEqual(verdicts([entry(128, 32, 8, 1, 131072, rows)])[key], "no")

    def test_wide_heads_any_batch_and_f16_scale_rows(self):
        rows = [row("tqkv tq4", 29.7, frac=0.75), row("read floor", 21.7), row("tqkv tq4 s16", 29.5, frac=0.81),
                row("read floor s16", 24.0), row("sdpa-flash", 102.0)]
        v = verdicts([entry(256, 16, 8, 4, 32768, rows)])
        self.assertEqual(v[("read BW >= 0.80 (graph)", "D256 Hq16 Hkv8 B4 S32768", "f32")], "no")
        self.assertEqual(v[("read BW >= 0.80 (graph)", "D256 Hq16 Hkv8 B4 S32768", "f16")], "yes")
        self.assertNotIn(("vs cuDNN >= 3.3x (graph)", "D256 Hq16 Hkv8 B4 S32768", "f32"), v)

    def test_row_names_from_the_suffix_compare_writes(self):
        # compare.py names a run's rows with row_suffix; both lookups must find them by scale type.
        rows = []
        for scale, us in (("f32", 30.0), ("f16", 29.0)):
            rows += [row("tqkv tq4" + targets.row_suffix(scale), us), row("read floor" + targets.row_suffix(scale), us - 5)]
        e = entry(128, 32, 8, 1, 32768, rows)
        found = targets.tqkv_rows(e)
        self.assertEqual({k: r["us_graph"] for k, r in found.items()}, {"f32": 30.0, "f16": 29.0})
        self.assertEqual(targets.floor_row(e, "f32")["us_graph"], 25.0)
        self.assertEqual(targets.floor_row(e, "f16")["us_graph"], 24.0)
        self.assertNotEqual(targets.row_suffix("f16"), targets.row_suffix("f32"))

    def test_short_contexts_never_slower(self):
        rows = [row("tqkv tq4", 6.0, us_cold=12.0), row("sdpa-cudnn", 6.7, us_cold=11.0),
                row("sdpa-flash", 10.0, us_cold=15.0)]
        v = verdicts([entry(128, 32, 8, 1, 1024, rows)])
        self.assertEqual(v[("not slower than SDPA (graph)", "D128 Hq32 Hkv8 B1 S1024", "f32")], "yes")
        self.assertEqual(v[("not slower than SDPA (cold)", "D128 Hq32 Hkv8 B1 S1024", "f32")], "no")

    def test_errors_and_other_shapes_give_no_line(self):
        rows = [{"impl": "tqkv k4/v4", "error": "exit 1: boom"}, row("sdpa-cudnn", 50.0)]
        self.assertEqual(targets.check([entry(128, 32, 8, 1, 32768, rows)]), [])
        rows = [row("tqkv tq4", 10.0, frac=0.9), row("sdpa-cudnn", 50.0)]
        self.assertEqual(targets.check([entry(64, 32, 8, 1, 32768, rows)]), [])  # not a target shape
        out = io.StringIO()
        targets.print_summary([entry(64, 32, 8, 1, 32768, rows)], out)
        self.assertEqual(out.getvalue(), "")

    def test_other_cards_are_named(self):
        rows = [row("tqkv tq4", 48.0, frac=0.66), row("read floor", 32.0), row("sdpa-cudnn", 124.3)]
        results = [entry(128, 32, 8, 1, 131072, rows)]
        for device, noted in (("NVIDIA H200", True), ("NVIDIA H100 80GB HBM3", False), (None, False)):
            out = io.StringIO()
            targets.print_summary(results, out, device=device)
            self.assertIn("read BW >= 0.85", out.getvalue())
            self.assertEqual("this run is on an NVIDIA H200" in out.getvalue(), noted, device)


if __name__ == "__main__":
    unittest.main()
