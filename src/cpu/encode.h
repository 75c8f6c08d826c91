// Threaded encoding of many rows (quantize on append).
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/codec_ref.h"
#include "tqkv/tqkv.h"

namespace tqkv::cpu {

// Converts n input values of dtype to f32.
void to_f32(tqkv_dtype dtype, const void* src, size_t n, float* dst);

// Encodes n_rows rows of p.d floats into rows (stride fmt::row_stride) and scales (TQ types).
// Rows are independent, so they are split over threads; the first error is rethrown.
void encode_rows(const core::CodecParams& p, const float* x, size_t n_rows, uint8_t* rows, void* scales);

}  // namespace tqkv::cpu
