// Device-side decoding of stored rows into f16 pairs, the form the tensor-core attention kernel
// feeds to mma. A codec is two things (style.md): how a thread turns 8 consecutive stored
// coordinates of a row in shared memory into four half2 (decode8; `at(byte)` gives the address
// of a byte of the row, which the kernel swizzles), and the per-block constants it needs (Table). Centroids are rounded to f16 here; docs/kernel-notes.md gives the bound this
// puts on the result and the parity test measures it.
#pragma once
#include <cuda_fp16.h>

#include <cstdint>

#include "core/format.h"
#include "cuda/half_bytes.h"

namespace tqkv::cuda {

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}

// Bytes (lo, hi) of f16 values: two bytes per value, taken apart so that prmt can look up four
// values at once from a table of up to 8 entries held in two registers.


// Four halves from four selector nibbles (3-bit indices, entries 0..7 of the table part p).
__device__ __forceinline__ void lookup4_8(const HalfBytes& t, uint32_t sel, uint32_t& h01, uint32_t& h23) {
  const uint32_t lo = prmt(t.lo[0], t.lo[1], sel), hi = prmt(t.hi[0], t.hi[1], sel);
  h01 = prmt(lo, hi, 0x5140);
  h23 = prmt(lo, hi, 0x7362);
}

// Four halves from four 4-bit indices in the low 16 bits of x (16-entry table).
__device__ __forceinline__ void lookup4_16(const HalfBytes& t, uint32_t x, uint32_t& h01, uint32_t& h23) {
  const uint32_t sel = x & 0x7777u;
  const uint32_t m = prmt(0u, 0xFFFFFFFFu, (x >> 1) & 0x4444u);  // 0xFF bytes where bit 3 is set
  const uint32_t loa = prmt(t.lo[0], t.lo[1], sel), lob = prmt(t.lo[2], t.lo[3], sel);
  const uint32_t hia = prmt(t.hi[0], t.hi[1], sel), hib = prmt(t.hi[2], t.hi[3], sel);
  const uint32_t lo = (loa & ~m) | (lob & m), hi = (hia & ~m) | (hib & m);
  h01 = prmt(lo, hi, 0x5140);
  h23 = prmt(lo, hi, 0x7362);
}

// Spreads bit k of an 8-bit value to bit 4k.
__device__ __forceinline__ uint32_t spread8(uint32_t b) {
  b = (b | (b << 12)) & 0x000F000Fu;
  b = (b | (b << 6)) & 0x03030303u;
  b = (b | (b << 3)) & 0x11111111u;
  return b;
}

template <int T>
struct Codec;

// The 2-, 3- and 4-bit codecs look their codebook up with byte permutes from registers.
struct PermuteTableCodec {
  static constexpr bool kRotated = true;
  struct Table {
    HalfBytes hb;
  };
  __device__ static void init(Table& t, const HalfBytes& hb, const __half*) { t.hb = hb; }
};

// TQ4: byte m = idx[2m] | idx[2m+1] << 4, so one 32-bit word holds 8 consecutive coordinates.
template <>
struct Codec<fmt::TQ4> : PermuteTableCodec {
  template <class At>
  __device__ static void decode8(const Table& t, At at, int d0, int /*d*/, uint32_t h[4]) {
    const uint32_t x = *reinterpret_cast<const uint32_t*>(at(d0 / 2));
    lookup4_16(t.hb, x, h[0], h[1]);
    lookup4_16(t.hb, x >> 16, h[2], h[3]);
  }
};

// TQ2: byte m = idx[4m] | idx[4m+1] << 2 | ..., two bytes per 8 coordinates.
template <>
struct Codec<fmt::TQ2> : PermuteTableCodec {
  template <class At>
  __device__ static void decode8(const Table& t, At at, int d0, int /*d*/, uint32_t h[4]) {
    const uint32_t x = *reinterpret_cast<const uint16_t*>(at(d0 / 4));
    // Nibble k of e holds index 2k, of o index 2k+1.
    const uint32_t e = x & 0x3333u, o = (x >> 2) & 0x3333u;
    uint32_t e01, e23, o01, o23;  // halves of indices (0,2),(4,6) and (1,3),(5,7)
    lookup4_8(t.hb, e, e01, e23);
    lookup4_8(t.hb, o, o01, o23);
    h[0] = prmt(e01, o01, 0x5410);
    h[1] = prmt(e01, o01, 0x7632);
    h[2] = prmt(e23, o23, 0x5410);
    h[3] = prmt(e23, o23, 0x7632);
  }
};

// TQ3: three bit planes of d/8 bytes; byte m of plane p holds bit p of indices 8m..8m+7.
template <>
struct Codec<fmt::TQ3> : PermuteTableCodec {
  template <class At>
  __device__ static void decode8(const Table& t, At at, int d0, int d, uint32_t h[4]) {
    const int m = d0 / 8, plane = d / 8;
    const uint32_t sel = spread8(*at(m)) | (spread8(*at(plane + m)) << 1) | (spread8(*at(2 * plane + m)) << 2);
    lookup4_8(t.hb, sel, h[0], h[1]);
    lookup4_8(t.hb, sel >> 16, h[2], h[3]);
  }
};

// TQ8: one byte per index; the 256-entry table lives in shared memory.
template <>
struct Codec<fmt::TQ8> {
  static constexpr bool kRotated = true;
  struct Table {
    const __half* lut;
  };
  __device__ static void init(Table& t, const HalfBytes&, const __half* lut) { t.lut = lut; }
  template <class At>
  __device__ static void decode8(const Table& t, At at, int d0, int /*d*/, uint32_t h[4]) {
    const uint2 x = *reinterpret_cast<const uint2*>(at(d0));
    const uint32_t w[2] = {x.x, x.y};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t word = w[i >> 1], sh = (i & 1) * 16;
      const __half a = t.lut[(word >> sh) & 0xFF], b = t.lut[(word >> (sh + 8)) & 0xFF];
      h[i] = uint32_t(__half_as_ushort(a)) | (uint32_t(__half_as_ushort(b)) << 16);
    }
  }
};

// Dense f16: the stored values are the mma operands.
template <>
struct Codec<fmt::F16> {
  static constexpr bool kRotated = false;
  struct Table {};
  __device__ static void init(Table&, const HalfBytes&, const __half*) {}
  template <class At>
  __device__ static void decode8(const Table&, At at, int d0, int /*d*/, uint32_t h[4]) {
    const uint4 x = *reinterpret_cast<const uint4*>(at(2 * d0));
    h[0] = x.x;
    h[1] = x.y;
    h[2] = x.z;
    h[3] = x.w;
  }
};

}  // namespace tqkv::cuda
