#include "cpu/encode.h"

#include <cstring>
#include <exception>
#include <mutex>

#include "core/error.h"
#include "core/format.h"
#include "core/half.h"

namespace tqkv::cpu {

void to_f32(tqkv_dtype dtype, const void* src, size_t n, float* dst) {
  switch (dtype) {
    case TQKV_DTYPE_F32: std::memcpy(dst, src, n * sizeof(float)); return;
    case TQKV_DTYPE_F16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
      return;
    }
    case TQKV_DTYPE_BF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
      return;
    }
    default: break;
  }
  invalid("dtype: " + std::to_string(int(dtype)) + " is not an input type; allowed: 0 (f32), 1 (f16), 2 (bf16)");
}

void encode_rows(const core::CodecParams& p, const float* x, size_t n_rows, uint8_t* rows, void* scales,
                 size_t* failed_row) {
  const size_t stride = fmt::row_stride(p.type, p.d);
  std::exception_ptr first_error;
  size_t first_row = n_rows;
  std::mutex mu;
  const long long n = static_cast<long long>(n_rows);
  // Small appends (decode: one token) stay on the calling thread; threads cost more than they save.
#pragma omp parallel for schedule(static) if (n_rows * p.d >= 16384)
  for (long long r = 0; r < n; ++r) {
    try {
      const float s = core::encode_row(p, x + size_t(r) * p.d, rows + size_t(r) * stride);
      if (fmt::is_tq(p.type)) core::store_scale(scales, size_t(r), s, p.scale_f16);
    } catch (...) {
      // The lowest failing row, whatever the threads' order: the same input names the same row.
      std::lock_guard<std::mutex> lock(mu);
      if (size_t(r) < first_row) {
        first_row = size_t(r);
        first_error = std::current_exception();
      }
    }
  }
  if (first_error) {
    if (failed_row) *failed_row = first_row;
    std::rethrow_exception(first_error);
  }
}

}  // namespace tqkv::cpu
