// ggml tensor types: block layouts and dequantization to f32.
//
// Written from the block format definitions (ggml-common.h layouts). Each product is evaluated
// in the same order as ggml's reference dequantizers (scale times scale first, then times the
// quant, minus the scaled min), so results match them bit for bit, not just to rounding.
#include <bit>
#include <cstring>
#include <string>

#include "core/error.h"
#include "core/half.h"
#include "model/gguf.h"

namespace tqkv::model {

static_assert(std::endian::native == std::endian::little, "GGUF data is little-endian and read in place");

namespace {

struct TypeInfo {
  uint32_t id;
  const char* name;
  uint32_t block_elems;
  uint32_t block_bytes;
  bool dequantizable;
};

// Every type ggml has assigned (ids 4, 5, 31..33 and 36..38 were retired). Knowing the sizes of
// types we cannot dequantize still lets a file using them be opened, listed and bounds-checked.
constexpr TypeInfo kTypes[] = {
    {0, "F32", 1, 4, true},          {1, "F16", 1, 2, true},         {2, "Q4_0", 32, 18, true},
    {3, "Q4_1", 32, 20, true},       {6, "Q5_0", 32, 22, true},      {7, "Q5_1", 32, 24, true},
    {8, "Q8_0", 32, 34, true},       {9, "Q8_1", 32, 36, false},     {10, "Q2_K", 256, 84, true},
    {11, "Q3_K", 256, 110, true},    {12, "Q4_K", 256, 144, true},   {13, "Q5_K", 256, 176, true},
    {14, "Q6_K", 256, 210, true},    {15, "Q8_K", 256, 292, true},   {16, "IQ2_XXS", 256, 66, false},
    {17, "IQ2_XS", 256, 74, false},  {18, "IQ3_XXS", 256, 98, false}, {19, "IQ1_S", 256, 50, false},
    {20, "IQ4_NL", 32, 18, false},   {21, "IQ3_S", 256, 110, false}, {22, "IQ2_S", 256, 82, false},
    {23, "IQ4_XS", 256, 136, false}, {24, "I8", 1, 1, false},        {25, "I16", 1, 2, false},
    {26, "I32", 1, 4, false},        {27, "I64", 1, 8, false},       {28, "F64", 1, 8, false},
    {29, "IQ1_M", 256, 56, false},   {30, "BF16", 1, 2, true},       {34, "TQ1_0", 256, 54, false},
    {35, "TQ2_0", 256, 66, false},   {39, "MXFP4", 32, 17, false},   {40, "NVFP4", 64, 36, false},
    {41, "Q1_0", 128, 18, false},
};

const TypeInfo* info(TensorType t) {
  for (const TypeInfo& i : kTypes)
    if (i.id == uint32_t(t)) return &i;
  return nullptr;
}

const TypeInfo& known_info(TensorType t) {
  const TypeInfo* i = info(t);
  if (!i) fail(TQKV_ERROR_UNSUPPORTED, "gguf: unknown tensor type " + std::to_string(uint32_t(t)));
  return *i;
}

inline float f16_at(const uint8_t* p) { return f16_to_f32(uint16_t(p[0] | (p[1] << 8))); }

// Legacy types: blocks of 32; element j and j + 16 share byte j of the nibble array.

void q4_0(const uint8_t* b, float* y) {
  const float d = f16_at(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    y[j] = float((qs[j] & 0xF) - 8) * d;
    y[j + 16] = float((qs[j] >> 4) - 8) * d;
  }
}

void q4_1(const uint8_t* b, float* y) {
  const float d = f16_at(b), m = f16_at(b + 2);
  const uint8_t* qs = b + 4;
  for (int j = 0; j < 16; ++j) {
    y[j] = float(qs[j] & 0xF) * d + m;
    y[j + 16] = float(qs[j] >> 4) * d + m;
  }
}

// The fifth bit of element i is bit i of the little-endian 32-bit qh.
inline uint32_t le32(const uint8_t* p) { return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24; }

void q5_0(const uint8_t* b, float* y) {
  const float d = f16_at(b);
  const uint32_t qh = le32(b + 2);
  const uint8_t* qs = b + 6;
  for (int j = 0; j < 16; ++j) {
    const int lo = int((qs[j] & 0xF) | (((qh >> j) & 1u) << 4));
    const int hi = int((qs[j] >> 4) | (((qh >> (j + 16)) & 1u) << 4));
    y[j] = float(lo - 16) * d;
    y[j + 16] = float(hi - 16) * d;
  }
}

void q5_1(const uint8_t* b, float* y) {
  const float d = f16_at(b), m = f16_at(b + 2);
  const uint32_t qh = le32(b + 4);
  const uint8_t* qs = b + 8;
  for (int j = 0; j < 16; ++j) {
    const uint32_t lo = (qs[j] & 0xFu) | (((qh >> j) & 1u) << 4);
    const uint32_t hi = (qs[j] >> 4) | (((qh >> (j + 16)) & 1u) << 4);
    y[j] = float(lo) * d + m;
    y[j + 16] = float(hi) * d + m;
  }
}

void q8_0(const uint8_t* b, float* y) {
  const float d = f16_at(b);
  for (int j = 0; j < 32; ++j) y[j] = float(int8_t(b[2 + j])) * d;
}

// K-quants: super-blocks of 256.

// Q4_K/Q5_K pack 8 (scale, min) pairs of 6 bits into 12 bytes: bytes 0-3 hold scales 0-3 in
// their low 6 bits, bytes 4-7 mins 0-3; for pairs 4-7 the low nibbles sit in bytes 8-11 and the
// top two bits in the spare high bits of bytes 0-3 (scales) and 4-7 (mins).
inline void scale_min_k4(int j, const uint8_t* s, uint8_t& sc, uint8_t& mn) {
  if (j < 4) {
    sc = s[j] & 63;
    mn = s[j + 4] & 63;
  } else {
    sc = uint8_t((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4));
    mn = uint8_t((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
  }
}

void q4_k(const uint8_t* b, float* y) {
  const float d = f16_at(b), dmin = f16_at(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qs = b + 16;
  // Four groups of 64: byte l of the group's 32 gives element l (low nibble, sub-block 2g) and
  // element 32 + l (high nibble, sub-block 2g + 1).
  for (int g = 0; g < 4; ++g, qs += 32, y += 64) {
    uint8_t sc, mn;
    scale_min_k4(2 * g, scales, sc, mn);
    const float d1 = d * float(sc), m1 = dmin * float(mn);
    scale_min_k4(2 * g + 1, scales, sc, mn);
    const float d2 = d * float(sc), m2 = dmin * float(mn);
    for (int l = 0; l < 32; ++l) {
      y[l] = d1 * float(qs[l] & 0xF) - m1;
      y[l + 32] = d2 * float(qs[l] >> 4) - m2;
    }
  }
}

void q5_k(const uint8_t* b, float* y) {
  const float d = f16_at(b), dmin = f16_at(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qh = b + 16;  // bit s of qh[l] is the fifth bit of element l of sub-block s
  const uint8_t* qs = b + 48;
  for (int g = 0; g < 4; ++g, qs += 32, y += 64) {
    uint8_t sc, mn;
    scale_min_k4(2 * g, scales, sc, mn);
    const float d1 = d * float(sc), m1 = dmin * float(mn);
    scale_min_k4(2 * g + 1, scales, sc, mn);
    const float d2 = d * float(sc), m2 = dmin * float(mn);
    for (int l = 0; l < 32; ++l) {
      const uint32_t lo = (qs[l] & 0xFu) | (((qh[l] >> (2 * g)) & 1u) << 4);
      const uint32_t hi = (qs[l] >> 4) | (((qh[l] >> (2 * g + 1)) & 1u) << 4);
      y[l] = d1 * float(lo) - m1;
      y[l + 32] = d2 * float(hi) - m2;
    }
  }
}

void q6_k(const uint8_t* b, float* y) {
  const uint8_t* ql = b;         // 128: low 4 bits
  const uint8_t* qh = b + 128;   // 64: high 2 bits, four elements per byte
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);  // 16 sub-blocks of 16
  const float d = f16_at(b + 208);
  // Two halves of 128. In a half, ql byte l (l < 64) holds elements l (low nibble) and 64 + l
  // (high nibble); qh byte l (l < 32) holds the high bits of elements l, 32 + l, 64 + l, 96 + l.
  for (int h = 0; h < 2; ++h, ql += 64, qh += 32, sc += 8, y += 128) {
    for (int l = 0; l < 32; ++l) {
      const int s = l / 16;
      const int q1 = int((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = int((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = int((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = int((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * float(sc[s]) * float(q1);
      y[l + 32] = d * float(sc[s + 2]) * float(q2);
      y[l + 64] = d * float(sc[s + 4]) * float(q3);
      y[l + 96] = d * float(sc[s + 6]) * float(q4);
    }
  }
}

void q2_k(const uint8_t* b, float* y) {
  const uint8_t* scales = b;  // 16: low nibble scale, high nibble min, per 16 elements
  const uint8_t* qs = b + 16;
  const float d = f16_at(b + 80), dmin = f16_at(b + 82);
  // Two halves of 128: four 2-bit planes of the half's 32 bytes, each plane 32 elements in two
  // sub-blocks of 16.
  int s = 0;
  for (int h = 0; h < 2; ++h, qs += 32) {
    for (int shift = 0; shift < 8; shift += 2) {
      for (int part = 0; part < 2; ++part, ++s, y += 16) {
        const float dl = d * float(scales[s] & 0xF), ml = dmin * float(scales[s] >> 4);
        for (int l = 0; l < 16; ++l) y[l] = dl * float((qs[16 * part + l] >> shift) & 3) - ml;
      }
    }
  }
}

void q3_k(const uint8_t* b, float* y) {
  const uint8_t* hmask = b;   // 32: bit k of byte l is the high bit of element 32k + l
  const uint8_t* qs = b + 32;  // 64: 2-bit low parts, laid out as in Q2_K
  const uint8_t* sp = b + 96;  // 12: sixteen 6-bit scales (low nibbles in 0-7, top bits in 8-11)
  const float d = f16_at(b + 108);
  int8_t scales[16];
  for (int i = 0; i < 16; ++i) {
    const int lo = i < 8 ? (sp[i] & 0xF) : (sp[i - 8] >> 4);
    const int hi = (sp[8 + i % 4] >> (2 * (i / 4))) & 3;
    scales[i] = int8_t((lo | (hi << 4)) - 32);
  }
  int s = 0, plane = 0;
  for (int h = 0; h < 2; ++h, qs += 32) {
    for (int shift = 0; shift < 8; shift += 2, ++plane) {
      for (int part = 0; part < 2; ++part, ++s, y += 16) {
        const float dl = d * float(scales[s]);
        for (int l = 0; l < 16; ++l) {
          const int k = 16 * part + l;
          // A clear high bit means the value is 4 lower: quants span -4..3.
          const int q = int((qs[k] >> shift) & 3) - (((hmask[k] >> plane) & 1) ? 0 : 4);
          y[l] = dl * float(q);
        }
      }
    }
  }
}

void q8_k(const uint8_t* b, float* y) {
  float d;
  memcpy(&d, b, 4);
  for (int j = 0; j < 256; ++j) y[j] = d * float(int8_t(b[4 + j]));
}

}  // namespace

const char* type_name(TensorType t) {
  const TypeInfo* i = info(t);
  return i ? i->name : "unknown";
}

bool type_known(TensorType t) { return info(t) != nullptr; }
bool type_supported(TensorType t) {
  const TypeInfo* i = info(t);
  return i && i->dequantizable;
}

uint64_t type_block_elems(TensorType t) { return known_info(t).block_elems; }
uint64_t type_block_bytes(TensorType t) { return known_info(t).block_bytes; }

void dequantize(TensorType t, const uint8_t* src, float* dst, uint64_t n) {
  const TypeInfo& ti = known_info(t);
  if (!ti.dequantizable)
    fail(TQKV_ERROR_UNSUPPORTED, std::string("gguf: dequantizing tensor type ") + ti.name + " (" +
                                     std::to_string(ti.id) + ") is not supported");
  if (n % ti.block_elems != 0)
    invalid("gguf: dequantize of " + std::to_string(n) + " elements of " + ti.name +
            ", not a multiple of its block size " + std::to_string(ti.block_elems));
  const uint64_t blocks = n / ti.block_elems;
  void (*block_fn)(const uint8_t*, float*) = nullptr;
  switch (t) {
    case TensorType::F32:
      memcpy(dst, src, n * 4);
      return;
    case TensorType::F16:
      for (uint64_t i = 0; i < n; ++i) dst[i] = f16_at(src + 2 * i);
      return;
    case TensorType::BF16:
      for (uint64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(uint16_t(src[2 * i] | (src[2 * i + 1] << 8)));
      return;
    case TensorType::Q4_0: block_fn = q4_0; break;
    case TensorType::Q4_1: block_fn = q4_1; break;
    case TensorType::Q5_0: block_fn = q5_0; break;
    case TensorType::Q5_1: block_fn = q5_1; break;
    case TensorType::Q8_0: block_fn = q8_0; break;
    case TensorType::Q2_K: block_fn = q2_k; break;
    case TensorType::Q3_K: block_fn = q3_k; break;
    case TensorType::Q4_K: block_fn = q4_k; break;
    case TensorType::Q5_K: block_fn = q5_k; break;
    case TensorType::Q6_K: block_fn = q6_k; break;
    case TensorType::Q8_K: block_fn = q8_k; break;
    default: fail(TQKV_ERROR_INTERNAL, std::string("gguf: no dequantizer for ") + ti.name);
  }
  for (uint64_t i = 0; i < blocks; ++i) block_fn(src + i * ti.block_bytes, dst + i * ti.block_elems);
}

}  // namespace tqkv::model
