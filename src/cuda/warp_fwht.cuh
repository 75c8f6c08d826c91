// The unnormalized fast Walsh-Hadamard transform of LANES * V values held by LANES consecutive
// lanes of a warp (lane l holds coordinates l*V .. l*V+V-1), in the butterfly order of
// core/rotation.cpp: strides inside a lane first, then across lanes (the lower partner keeps
// a + b, the upper a - b). fmaf(+-1, x, o) rounds exactly like o + x and o - x.
#pragma once

namespace tqkv::cuda {

template <int V, int LANES = 32>
__device__ __forceinline__ void warp_fwht(float (&x)[V], int lane) {
#pragma unroll
  for (int h = 1; h < V; h *= 2)
#pragma unroll
    for (int j = 0; j < V; ++j)
      if (!(j & h)) {
        const float u = x[j], v = x[j + h];
        x[j] = u + v;
        x[j + h] = u - v;
      }
#pragma unroll
  for (int m = 1; m < LANES; m *= 2) {
    const float sgn = (lane & m) ? -1.0f : 1.0f;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float o = __shfl_xor_sync(0xFFFFFFFFu, x[j], m);
      x[j] = fmaf(sgn, x[j], o);
    }
  }
}

}  // namespace tqkv::cuda
