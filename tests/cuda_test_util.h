// Helpers shared by the CUDA attention and robustness tests (built with TQKV_TEST_CUDA only):
// the skip without a device, checked runtime calls, and poisonable device buffers.
#pragma once
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <cstddef>
#include <vector>

#include "tqkv/tqkv.h"

namespace tqkv::test {

inline bool have_gpu() { return tqkv_backend_available(TQKV_BACKEND_CUDA) == 1; }

#define SKIP_WITHOUT_GPU()                                                                   \
  do {                                                                                       \
    if (!::tqkv::test::have_gpu()) GTEST_SKIP() << "no CUDA device (or built without CUDA): GPU tests skipped"; \
  } while (0)

#define CU(call) ASSERT_EQ((call), cudaSuccess) << #call << ": " << cudaGetErrorString(cudaGetLastError())

// Device buffer of floats, poisoned with NaN on request.
struct DevBuf {
  void* p = nullptr;
  size_t bytes = 0;
  explicit DevBuf(size_t n_bytes) : bytes(n_bytes) {
    if (bytes && cudaMalloc(&p, bytes) != cudaSuccess) p = nullptr;
  }
  ~DevBuf() { cudaFree(p); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  float* f() const { return static_cast<float*>(p); }
  void poison() const { cudaMemset(p, 0xFF, bytes); }  // 0xFFFFFFFF is a NaN
  std::vector<float> host() const {
    std::vector<float> v(bytes / 4);
    cudaMemcpy(v.data(), p, bytes, cudaMemcpyDeviceToHost);
    return v;
  }
};

}  // namespace tqkv::test
