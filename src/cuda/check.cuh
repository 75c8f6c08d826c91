// Every CUDA call is checked; failures become tqkv::Error with the call and CUDA's message.
#pragma once
#include <cuda_runtime.h>

#include <string>

#include "core/error.h"

namespace tqkv::cuda {

[[noreturn]] inline void cuda_fail(cudaError_t e, const char* what, const char* file, int line) {
  const tqkv_status st = e == cudaErrorMemoryAllocation ? TQKV_ERROR_OUT_OF_MEMORY : TQKV_ERROR_BACKEND;
  fail(st, std::string("cuda: ") + what + " failed: " + cudaGetErrorString(e) + " (" + file + ":" +
               std::to_string(line) + ")");
}

}  // namespace tqkv::cuda

#define TQKV_CUDA_CHECK(call)                                                   \
  do {                                                                          \
    const cudaError_t tqkv_e_ = (call);                                         \
    if (tqkv_e_ != cudaSuccess) ::tqkv::cuda::cuda_fail(tqkv_e_, #call, __FILE__, __LINE__); \
  } while (0)

// After a launch: configuration errors are reported at once.
#define TQKV_CUDA_LAUNCHED(name) TQKV_CUDA_CHECK(cudaPeekAtLastError())
