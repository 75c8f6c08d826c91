// A codebook of up to 16 entries as f16 values taken apart into low and high bytes, so that the
// kernels look up four values at once with byte permutes (codec.cuh). Plain C++: built on the
// host (device_cache.cu) and passed to kernels by value.
#pragma once
#include <cstdint>

namespace tqkv::cuda {

struct HalfBytes {
  uint32_t lo[4] = {0, 0, 0, 0}, hi[4] = {0, 0, 0, 0};  // entry e: byte (e & 3) of lo[e >> 2] / hi[e >> 2]
};

}  // namespace tqkv::cuda
