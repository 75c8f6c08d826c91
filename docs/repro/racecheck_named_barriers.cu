// Reproducer: compute-sanitizer racecheck reports hazards in a program that has none, where
// groups of warps synchronise on named barriers with thread counts (bar.sync id, n), here a
// different number of times per group. Every shared access below is ordered by __syncthreads or by the group's own
// barrier, yet racecheck (CUDA 13.0, H100) reports the write after the last __syncthreads as a
// race. The table-lookup attention kernel (src/cuda/attn_lut_kernel.cuh, D = 256 and 512) draws
// the same reports on its block merge for the same reason; memcheck and synccheck are clean.
//   nvcc -arch=sm_90 -lineinfo racecheck_named_barriers.cu -o rc && compute-sanitizer --tool racecheck ./rc
#include <cstdio>
// 8 warps; pairs (2g, 2g+1) sync on named barrier 1+g a few times; then all write/read smem
// separated by __syncthreads. A race report here is a racecheck false positive.
__global__ void k(float* out, int iters) {
  __shared__ float buf[256];
  __shared__ float x[256];
  int w = threadIdx.x >> 5, g = w >> 1;
  buf[threadIdx.x] = threadIdx.x;
  __syncthreads();
  float acc = 0;
  for (int i = 0; i < iters + g; ++i) {   // groups do different numbers of rounds
    x[threadIdx.x] = acc + i;
    if (g == 0) asm volatile("bar.sync 1, 64;" ::: "memory");
    else if (g == 1) asm volatile("bar.sync 2, 64;" ::: "memory");
    else if (g == 2) asm volatile("bar.sync 3, 64;" ::: "memory");
    else asm volatile("bar.sync 4, 64;" ::: "memory");
    acc += x[threadIdx.x ^ 32] + buf[(threadIdx.x * 7) & 255];
    if (g == 0) asm volatile("bar.sync 1, 64;" ::: "memory");
    else if (g == 1) asm volatile("bar.sync 2, 64;" ::: "memory");
    else if (g == 2) asm volatile("bar.sync 3, 64;" ::: "memory");
    else asm volatile("bar.sync 4, 64;" ::: "memory");
  }
  __syncthreads();
  buf[(threadIdx.x * 5) & 255] = acc;  // overwrite what others read in the loop
  __syncthreads();
  out[blockIdx.x * 256 + threadIdx.x] = buf[255 - threadIdx.x];
}
// The same with the named barriers' count in a register, like attn_lut_kernel.
__global__ void k2(float* out, int iters) {
  __shared__ float buf[256];
  __shared__ float x[256];
  int w = threadIdx.x >> 5, g = w >> 1, n = 64;
  buf[threadIdx.x] = threadIdx.x;
  __syncthreads();
  float acc = 0;
  for (int i = 0; i < iters + g; ++i) {
    x[threadIdx.x] = acc + i;
    if (g == 0) asm volatile("bar.sync 1, %0;" ::"r"(n) : "memory");
    else if (g == 1) asm volatile("bar.sync 2, %0;" ::"r"(n) : "memory");
    else if (g == 2) asm volatile("bar.sync 3, %0;" ::"r"(n) : "memory");
    else asm volatile("bar.sync 4, %0;" ::"r"(n) : "memory");
    acc += x[threadIdx.x ^ 32];
    if (g == 0) asm volatile("bar.sync 1, %0;" ::"r"(n) : "memory");
    else if (g == 1) asm volatile("bar.sync 2, %0;" ::"r"(n) : "memory");
    else if (g == 2) asm volatile("bar.sync 3, %0;" ::"r"(n) : "memory");
    else asm volatile("bar.sync 4, %0;" ::"r"(n) : "memory");
  }
  acc += buf[(threadIdx.x * 7) & 255];
  __syncthreads();
  buf[(threadIdx.x * 5) & 255] = acc;
  __syncthreads();
  out[blockIdx.x * 256 + threadIdx.x] = buf[255 - threadIdx.x];
}
int main() {
  float* o; cudaMalloc(&o, 4 * 256 * 4);
  k<<<4, 256>>>(o, 3);
  k2<<<4, 256>>>(o, 3);
  printf("%s\n", cudaGetErrorString(cudaDeviceSynchronize()));
}
