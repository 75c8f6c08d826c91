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

// Around a <<<...>>> launch, which returns no status: TQKV_CUDA_CLEAR_STALE() before it drops an
// earlier call's non-sticky error still recorded on this thread (the caller's failed cudaMalloc,
// say; that call returned it already), so TQKV_CUDA_LAUNCHED() after it reports this launch's
// configuration error and not someone else's. A sticky error (a faulted context) stays and is
// reported. Launches through cudaLaunchKernelEx check its return value instead.
#define TQKV_CUDA_CLEAR_STALE() ((void)cudaGetLastError())
#define TQKV_CUDA_LAUNCHED(name) TQKV_CUDA_CHECK(cudaGetLastError())
