// The storage format, shared by every backend (host and CUDA device code alike).
// docs/format.md is the prose version of this file; the two must agree.
#pragma once
#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define TQKV_HD __host__ __device__
#else
#define TQKV_HD
#endif

namespace tqkv::fmt {

// Storage type codes equal tqkv_type values.
enum Type : uint32_t {
  TQ2 = 2, TQ3 = 3, TQ4 = 4, TQ8 = 8, F16 = 16, F32 = 32,
  Q4_0 = 40, Q4_0_HAD = 41, Q8_0 = 80, Q8_0_HAD = 81  // llama.cpp blocks, plain or rotated
};

TQKV_HD constexpr bool is_tq(uint32_t t) { return t == TQ2 || t == TQ3 || t == TQ4 || t == TQ8; }
TQKV_HD constexpr bool is_dense(uint32_t t) { return t == F16 || t == F32; }
TQKV_HD constexpr bool is_block(uint32_t t) { return t == Q4_0 || t == Q4_0_HAD || t == Q8_0 || t == Q8_0_HAD; }
TQKV_HD constexpr bool valid_type(uint32_t t) { return is_tq(t) || is_dense(t) || is_block(t); }
// Whether rows are stored in the rotated domain (query rotated, output un-rotated once).
TQKV_HD constexpr bool is_rotated(uint32_t t) { return is_tq(t) || t == Q4_0_HAD || t == Q8_0_HAD; }
TQKV_HD constexpr uint32_t block_base(uint32_t t) { return t == Q4_0_HAD ? Q4_0 : t == Q8_0_HAD ? Q8_0 : t; }

// llama.cpp block formats: 32 values per block, f16 scale d first.
//   Q8_0: {f16 d; int8 q[32]}            value = q * d                 (34 bytes)
//   Q4_0: {f16 d; uint8 q[16]}           value_j = ((q[j] & 15) - 8) * d, value_{j+16} = ((q[j] >> 4) - 8) * d  (18 bytes)
constexpr uint32_t kBlockElems = 32;
TQKV_HD constexpr size_t block_bytes(uint32_t t) { return block_base(t) == Q8_0 ? 34 : 18; }
TQKV_HD constexpr bool valid_head_dim(uint32_t d) { return d == 64 || d == 128 || d == 256 || d == 512; }

constexpr size_t kRowAlign = 16;  // every row starts on a 16-byte boundary

// Bytes of payload of one row (one vector of head_dim values).
TQKV_HD constexpr size_t row_payload_bytes(uint32_t type, uint32_t d) {
  return is_tq(type) ? size_t(d) * type / 8 : is_block(type) ? size_t(d) / kBlockElems * block_bytes(type) : size_t(d) * (type / 8);
}
// Distance between consecutive rows: payload rounded up to 16 bytes, except llama.cpp block rows,
// which are packed back to back as llama.cpp stores them (2-byte aligned), so that their
// memory figures are the baseline's own.
TQKV_HD constexpr size_t row_stride(uint32_t type, uint32_t d) {
  return is_block(type) ? row_payload_bytes(type, d) : (row_payload_bytes(type, d) + kRowAlign - 1) / kRowAlign * kRowAlign;
}
// Bytes of the per-row scale (TQ types only): f32 or f16.
TQKV_HD constexpr size_t scale_bytes(uint32_t type, bool scale_f16) {
  return is_tq(type) ? (scale_f16 ? 2 : 4) : 0;
}

// Row index of (sequence, kv head, slot): layout [seq][kv_head][slot].
TQKV_HD constexpr size_t row_index(uint32_t seq, uint32_t kv_head, uint32_t slot, uint32_t num_kv_heads,
                                   uint32_t capacity) {
  return (size_t(seq) * num_kv_heads + kv_head) * capacity + slot;
}

// ---- packing of TQ indices within a row ----
// TQ4: byte m = idx[2m] | idx[2m+1] << 4 (even coordinate in the low nibble).
// TQ2: byte m = idx[4m] | idx[4m+1] << 2 | idx[4m+2] << 4 | idx[4m+3] << 6.
// TQ8: byte m = idx[m].
// TQ3: three bit planes of d/8 bytes each, plane p at byte offset p*d/8;
//      bit k of byte m of plane p = bit p of idx[8m+k].
TQKV_HD inline uint32_t get_index(const uint8_t* row, uint32_t type, uint32_t d, uint32_t i) {
  switch (type) {
    case TQ4: return (row[i >> 1] >> ((i & 1) * 4)) & 0xF;
    case TQ2: return (row[i >> 2] >> ((i & 3) * 2)) & 0x3;
    case TQ8: return row[i];
    case TQ3: {
      uint32_t v = 0;
      for (uint32_t p = 0; p < 3; ++p) v |= ((row[p * (d / 8) + (i >> 3)] >> (i & 7)) & 1u) << p;
      return v;
    }
    default: return 0;
  }
}
// Writes idx into a row whose bytes were zeroed first.
TQKV_HD inline void put_index(uint8_t* row, uint32_t type, uint32_t d, uint32_t i, uint32_t idx) {
  switch (type) {
    case TQ4: row[i >> 1] |= uint8_t((idx & 0xF) << ((i & 1) * 4)); break;
    case TQ2: row[i >> 2] |= uint8_t((idx & 0x3) << ((i & 3) * 2)); break;
    case TQ8: row[i] = uint8_t(idx); break;
    case TQ3:
      for (uint32_t p = 0; p < 3; ++p)
        row[p * (d / 8) + (i >> 3)] |= uint8_t(((idx >> p) & 1u) << (i & 7));
      break;
    default: break;
  }
}

// ---- kernel order ----
// Fused kernels unpack a block of packed bytes into lanes without shuffles, which visits the
// coordinates of a block in "kernel order": for TQ4 a block is 32 coordinates (16 bytes), first
// the 16 even ones, then the 16 odd ones; for TQ2 a block is 64 coordinates (16 bytes), the
// coordinates = 0, 1, 2, 3 mod 4 in turn; TQ3, TQ8 and dense types use natural order.
// The query is permuted into kernel order once and the output permuted back once, so the
// inner loop never interleaves. kernel_position(i) = where natural coordinate i goes.
TQKV_HD constexpr uint32_t kernel_block(uint32_t type) { return type == TQ4 ? 32 : type == TQ2 ? 64 : 1; }
TQKV_HD constexpr uint32_t kernel_position(uint32_t type, uint32_t i) {
  if (type == TQ4) return (i & ~31u) + ((i & 1) * 16) + ((i & 31) >> 1);
  if (type == TQ2) return (i & ~63u) + ((i & 3) * 16) + ((i & 63) >> 2);
  return i;
}

}  // namespace tqkv::fmt
