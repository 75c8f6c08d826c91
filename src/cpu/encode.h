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
// Rows are independent, so they are split over threads; the error of the lowest failing row is
// rethrown, and that row's index stored in *failed_row when given.
void encode_rows(const core::CodecParams& p, const float* x, size_t n_rows, uint8_t* rows, void* scales,
                 size_t* failed_row = nullptr);

}  // namespace tqkv::cpu
