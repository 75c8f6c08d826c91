#!/usr/bin/env python3
"""Development check: the C++ GGUF reader and dequantizers against the gguf Python package.

Needs `pip install gguf numpy` and a C++20 compiler; not used by the test suite. Compiles a
small dump program from src/model/{gguf,dequant}.cpp, then compares
  1. every tensor of each model file given (default: both models in the fetch-models.sh cache),
     metadata shape and type included, value by value;
  2. random blocks of every type both sides can dequantize (types the models do not use).
Prints the maximum absolute difference and the number of bitwise differences per type.

Usage: scripts/check_gguf_vs_python.py [model.gguf ...]
"""
import os
import struct
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT
from gguf.quants import dequantize

ROOT = Path(__file__).resolve().parent.parent

DUMP_CPP = r"""
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>
#include "model/gguf.h"
using namespace tqkv::model;
static void put(const void* p, size_t n) { fwrite(p, 1, n, stdout); }
static void put_value(const GgufValue& v) {
  uint32_t t = uint32_t(v.type);
  put(&t, 4);
  switch (v.type) {
    case GgufType::STRING: { uint64_t n = v.s.size(); put(&n, 8); put(v.s.data(), n); break; }
    case GgufType::ARRAY: {
      uint64_t n = v.items.size();
      put(&n, 8);
      for (const GgufValue& i : v.items) put_value(i);
      break;
    }
    case GgufType::FLOAT32: case GgufType::FLOAT64: put(&v.f, 8); break;
    case GgufType::INT8: case GgufType::INT16: case GgufType::INT32: case GgufType::INT64: put(&v.i, 8); break;
    case GgufType::BOOL: { uint64_t b = v.b; put(&b, 8); break; }
    default: put(&v.u, 8);
  }
}
// dump FILE: per tensor: u32 name length, name, u32 type, u32 n_dims, u64 dims[], u64 n, f32[n]
// meta FILE: per key: u32 length, key, value (u32 type, then payload; see put_value)
// raw TYPE FILE: the bytes of FILE dequantized as TYPE, f32 only
int main(int argc, char** argv) {
  try {
    if (argc == 3 && !strcmp(argv[1], "dump")) {
      GgufFile f = GgufFile::open(argv[2]);
      for (const GgufTensor& t : f.tensors()) {
        uint32_t len = uint32_t(t.name.size()), type = uint32_t(t.type), nd = uint32_t(t.dims.size());
        put(&len, 4); put(t.name.data(), len); put(&type, 4); put(&nd, 4);
        put(t.dims.data(), 8 * nd); put(&t.n_elements, 8);
        std::vector<float> v = f.to_f32(t);
        put(v.data(), 4 * v.size());
      }
      return 0;
    }
    if (argc == 3 && !strcmp(argv[1], "meta")) {
      GgufFile f = GgufFile::open(argv[2]);
      for (const std::string& k : f.keys()) {
        uint32_t len = uint32_t(k.size());
        put(&len, 4); put(k.data(), len);
        put_value(f.get_value(k));
      }
      return 0;
    }
    if (argc == 4 && !strcmp(argv[1], "raw")) {
      std::ifstream in(argv[3], std::ios::binary);
      std::vector<uint8_t> b((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      TensorType t = TensorType(std::stoul(argv[2]));
      uint64_t n = b.size() / type_block_bytes(t) * type_block_elems(t);
      std::vector<float> v(n);
      dequantize(t, b.data(), v.data(), n);
      put(v.data(), 4 * n);
      return 0;
    }
  } catch (const std::exception& e) {
    fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  fprintf(stderr, "usage: dump FILE | raw TYPE FILE\n");
  return 2;
}
"""

# Types dequantized on the C++ side that the Python package also implements.
RANDOM_TYPES = [QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0,
                QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]
# Byte offsets of the f16 scales in each block, made finite so that values are comparable.
F16_FIELDS = {QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q5_0: [0], QT.Q5_1: [0, 2], QT.Q8_0: [0],
              QT.Q2_K: [80, 82], QT.Q3_K: [108], QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q6_K: [208]}


def compare(ours: np.ndarray, ref: np.ndarray):
    ref = ref.astype(np.float32).reshape(-1)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    both_nan = np.isnan(ours) & np.isnan(ref)
    diff = np.where(both_nan, 0, np.abs(ours.astype(np.float64) - ref.astype(np.float64)))
    bits = int(np.count_nonzero((ours.view(np.uint32) != ref.view(np.uint32)) & ~both_nan))
    return float(np.nanmax(diff)) if diff.size else 0.0, bits


def read_value(buf: bytes, pos: int):
    (t,) = struct.unpack_from("<I", buf, pos)
    pos += 4
    if t == 8:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return buf[pos + 8:pos + 8 + n].decode("utf-8", "surrogateescape"), pos + 8 + n
    if t == 9:
        (n,) = struct.unpack_from("<Q", buf, pos)
        pos += 8
        items = []
        for _ in range(n):
            v, pos = read_value(buf, pos)
            items.append(v)
        return items, pos
    fmt = {6: "<d", 12: "<d", 1: "<q", 3: "<q", 5: "<q", 11: "<q"}.get(t, "<Q")
    (v,) = struct.unpack_from(fmt, buf, pos)
    return (bool(v) if t == 7 else v), pos + 8


def check_metadata(dump: Path, path: str, reader: GGUFReader) -> bool:
    buf = subprocess.run([str(dump), "meta", path], stdout=subprocess.PIPE, check=True).stdout
    pos, ours = 0, {}
    while pos < len(buf):
        (n,) = struct.unpack_from("<I", buf, pos)
        key = buf[pos + 4:pos + 4 + n].decode()
        ours[key], pos = read_value(buf, pos + 4 + n)
    theirs = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    bad = [k for k in theirs if k not in ours or ours[k] != theirs[k]] + [k for k in ours if k not in theirs]
    print(f"  metadata: {len(ours)} keys, {len(bad)} differences {bad[:5]}")
    return not bad


def check_model(dump: Path, path: str) -> bool:
    reader = GGUFReader(path)
    proc = subprocess.Popen([str(dump), "dump", path], stdout=subprocess.PIPE)
    out = proc.stdout
    by_type = defaultdict(lambda: [0, 0.0, 0, 0])  # tensors, max diff, bit diffs, elements
    ok = True
    for t in reader.tensors:
        (nlen,) = struct.unpack("<I", out.read(4))
        name = out.read(nlen).decode()
        ttype, nd = struct.unpack("<II", out.read(8))
        dims = list(struct.unpack(f"<{nd}Q", out.read(8 * nd)))
        (n,) = struct.unpack("<Q", out.read(8))
        ours = np.frombuffer(out.read(4 * n), dtype=np.float32)
        if name != t.name or ttype != int(t.tensor_type) or dims != [int(d) for d in t.shape] or n != int(t.n_elements):
            print(f"  MISMATCH in tensor info: ours {name} {ttype} {dims} {n}, python {t.name} "
                  f"{int(t.tensor_type)} {list(t.shape)} {t.n_elements}")
            ok = False
            continue
        ref = dequantize(t.data, t.tensor_type)
        mx, bits = compare(ours, ref)
        s = by_type[t.tensor_type.name]
        s[0] += 1
        s[1] = max(s[1], mx)
        s[2] += bits
        s[3] += n
        if not np.all(np.isfinite(ours)):
            print(f"  non-finite values in {name}")
            ok = False
    if proc.wait() != 0:
        print("  dump failed")
        return False
    print(f"{path}: {len(reader.tensors)} tensors")
    ok &= check_metadata(dump, path, reader)
    for name, (count, mx, bits, elems) in sorted(by_type.items()):
        print(f"  {name:5s} {count:4d} tensors {elems:11d} values  max |diff| {mx:g}  bitwise differences {bits}")
        ok &= bits == 0
    return ok


def check_random(dump: Path, tmp: Path) -> bool:
    rng = np.random.default_rng(1234)
    ok = True
    print("random blocks:")
    for qt in RANDOM_TYPES:
        block_elems, block_bytes = GGML_QUANT_SIZES[qt]
        n_blocks = 4096 * (32 if block_elems == 1 else 1)
        raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
        scales = rng.uniform(-4, 4, size=(n_blocks, 2)).astype(np.float16)
        if qt in (QT.F16, QT.BF16):
            vals = rng.standard_normal(n_blocks).astype(np.float32)
            raw = (vals.astype(np.float16).view(np.uint8) if qt == QT.F16
                   else (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)).reshape(n_blocks, -1)
        for k, off in enumerate(F16_FIELDS.get(qt, [])):
            raw[:, off:off + 2] = scales[:, k:k + 1].view(np.uint8)
        f = tmp / f"raw_{qt.name}"
        raw.tofile(f)
        res = subprocess.run([str(dump), "raw", str(int(qt)), str(f)], stdout=subprocess.PIPE, check=True)
        ours = np.frombuffer(res.stdout, dtype=np.float32)
        ref = dequantize(raw.reshape(-1), qt)
        mx, bits = compare(ours, ref)
        print(f"  {qt.name:5s} {ours.size:8d} values  max |diff| {mx:g}  bitwise differences {bits}")
        ok &= bits == 0
    return ok


def main() -> int:
    models = sys.argv[1:]
    if not models:
        cache = Path(os.environ.get("TQKV_CACHE_DIR", Path.home() / ".cache" / "tqkv")) / "models"
        models = [str(cache / m) for m in ("SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf")]
        models = [m for m in models if os.path.exists(m)] or print("no models found; run scripts/fetch-models.sh") or []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "dump.cpp").write_text(DUMP_CPP)
        dump = tmp / "dump"
        cxx = os.environ.get("CXX", "c++")
        subprocess.run([cxx, "-std=c++20", "-O2", f"-I{ROOT / 'src'}", f"-I{ROOT / 'include'}", str(tmp / "dump.cpp"),
                        str(ROOT / "src/model/gguf.cpp"), str(ROOT / "src/model/dequant.cpp"), "-o", str(dump)], check=True)
        ok = check_random(dump, tmp)
        for m in models:
            ok &= check_model(dump, m)
    print("OK: identical to gguf-py" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
