// Streaming-read kernel for the read floor (read_floor.h). The loads are the attention kernels'
// kind (ld.global.nc, no L1 allocation, 16 bytes per lane): a warp reads 512 contiguous bytes
// per load, U loads in flight per thread, blocks striding over the whole buffer.
#include <algorithm>
#include <string>

#include "core/error.h"
#include "cuda/check.cuh"
#include "read_floor.h"

namespace tqkv::cli {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ uint4 load_nc(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

template <int U>
__global__ void __launch_bounds__(kThreads) read_kernel(const uint4* __restrict__ p, size_t n, uint32_t* sink) {
  const size_t stride = size_t(gridDim.x) * kThreads;
  size_t i = size_t(blockIdx.x) * kThreads + threadIdx.x;
  uint32_t acc = 0;
  for (; i + (U - 1) * stride < n; i += U * stride) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = load_nc(p + i + u * stride);
#pragma unroll
    for (int u = 0; u < U; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n; i += stride) {
    const uint4 v = load_nc(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == kReadFloorSinkWord) *sink = acc;
}

// Append's floor: reads n_in and writes n_out 16-byte units in one pass (the stores carry the
// loaded words, so neither side can be dropped).
template <int U>
__global__ void __launch_bounds__(kThreads)
    stream_kernel(const uint4* __restrict__ in, size_t n_in, uint4* __restrict__ out, size_t n_out) {
  const size_t stride = size_t(gridDim.x) * kThreads, n = n_in > n_out ? n_in : n_out;
  for (size_t i = size_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += U * stride) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const size_t j = i + u * stride;
      v[u] = j < n_in ? load_nc(in + j) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const size_t j = i + u * stride;
      if (j < n_out) out[j] = v[u];
    }
  }
}

struct Variant {
  int blocks_per_sm, unroll;
};
constexpr Variant kVariants[] = {{4, 4}, {8, 4}, {4, 8}, {8, 8}};

unsigned grid_for(const Variant& v, size_t n, int sm_count) {
  return static_cast<unsigned>(std::clamp<size_t>((n + kThreads - 1) / kThreads, 1, size_t(sm_count) * v.blocks_per_sm));
}

void check_aligned(const void* p, size_t bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0 || bytes % 16 != 0)
    fail(TQKV_ERROR_INVALID_ARGUMENT, std::string(what) + ": buffers and sizes must be multiples of 16 bytes");
}

const Variant& variant_of(int variant, const char* what) {
  if (variant < 0 || variant >= int(std::size(kVariants)))
    fail(TQKV_ERROR_INVALID_ARGUMENT, std::string(what) + ": variant " + std::to_string(variant));
  return kVariants[variant];
}

}  // namespace

int read_floor_variants() { return int(std::size(kVariants)); }

std::string read_floor_name(int variant) {
  const Variant& v = variant_of(variant, "read floor name");
  return std::to_string(v.blocks_per_sm) + " blocks/SM x " + std::to_string(kThreads) + " threads, " +
         std::to_string(v.unroll) + " x 16 B in flight per thread";
}

void launch_stream_floor(int variant, const void* in, size_t in_bytes, void* out, size_t out_bytes, int sm_count,
                         cudaStream_t st) {
  const Variant& v = variant_of(variant, "stream floor");
  check_aligned(in, in_bytes, "stream floor");
  check_aligned(out, out_bytes, "stream floor");
  const size_t ni = in_bytes / 16, no = out_bytes / 16;
  const unsigned blocks = grid_for(v, std::max(ni, no), sm_count);
  const auto* pi = static_cast<const uint4*>(in);
  auto* po = static_cast<uint4*>(out);
  if (v.unroll == 4) stream_kernel<4><<<blocks, kThreads, 0, st>>>(pi, ni, po, no);
  else stream_kernel<8><<<blocks, kThreads, 0, st>>>(pi, ni, po, no);
  TQKV_CUDA_LAUNCHED("stream_kernel");
}

void launch_read_floor(int variant, const void* buf, size_t bytes, uint32_t* sink, int sm_count, cudaStream_t st) {
  const Variant& v = variant_of(variant, "read floor");
  check_aligned(buf, bytes, "read floor");
  const size_t n = bytes / 16;
  const unsigned blocks = grid_for(v, n, sm_count);
  const auto* p = static_cast<const uint4*>(buf);
  if (v.unroll == 4) read_kernel<4><<<blocks, kThreads, 0, st>>>(p, n, sink);
  else read_kernel<8><<<blocks, kThreads, 0, st>>>(p, n, sink);
  TQKV_CUDA_LAUNCHED("read_kernel");
}

}  // namespace tqkv::cli
