// CUDA backend seam: device discovery. The device cache and kernels build on this
// (see the CUDA backend issue); until then the CUDA backend reports what the machine has.
#include <cuda_runtime.h>

namespace tqkv::cuda {

bool device_available() {
  int n = 0;
  // No driver or no device is an ordinary answer here, not an error.
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return n > 0;
}

}  // namespace tqkv::cuda
