// Device-resident cache: allocation, copies, lengths and key means. Encoding is in encode.cu.
#include <cuda_runtime.h>

#include <algorithm>
#include <string>
#include <vector>

#include "core/format.h"
#include "core/half.h"
#include "cuda/check.cuh"
#include "cuda/device_cache.h"
#include "cuda/encode.h"
#include "cuda/quant_table.h"

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

int pointer_device(const void* p) {
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    (void)cudaGetLastError();
    return kHostMemory;
  }
  if (a.type == cudaMemoryTypeManaged) return kManaged;
  return a.type == cudaMemoryTypeDevice ? a.device : kHostMemory;
}

int locate(const void* p, int device, const char* what) {
  if (p == nullptr) return kHostMemory;
  const int where = pointer_device(p);
  if (where >= 0 && where != device)
    invalid(std::string(what) + ": device memory of GPU " + std::to_string(where) + ", but the cache lives on GPU " +
            std::to_string(device) + "; pass memory of GPU " + std::to_string(device) + " (or managed memory)");
  return where;
}

DeviceScope::DeviceScope(int device) {
  TQKV_CUDA_CHECK(cudaGetDevice(&prev_));
  if (prev_ == device) {
    prev_ = -1;  // nothing to restore
    return;
  }
  TQKV_CUDA_CHECK(cudaSetDevice(device));
}

DeviceScope::~DeviceScope() {
  if (prev_ >= 0) (void)cudaSetDevice(prev_);
}

bool capturing(void* stream) {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  TQKV_CUDA_CHECK(cudaStreamIsCapturing(static_cast<cudaStream_t>(stream), &st));
  return st != cudaStreamCaptureStatusNone;
}

void copy_to_device(void* dst, const void* src, size_t bytes, void* stream) {
  TQKV_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, static_cast<cudaStream_t>(stream)));
}

namespace {

template <typename T>
T* dev_alloc(size_t n, const char* what) {
  void* p = nullptr;
  if (n == 0) return nullptr;
  const cudaError_t e = cudaMalloc(&p, n * sizeof(T));
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    fail(e == cudaErrorMemoryAllocation ? TQKV_ERROR_OUT_OF_MEMORY : TQKV_ERROR_BACKEND,
         std::string("cuda: cannot allocate ") + std::to_string(n * sizeof(T)) + " bytes for " + what + ": " +
             cudaGetErrorString(e));
  }
  TQKV_CUDA_CHECK(cudaMemset(p, 0, n * sizeof(T)));
  return static_cast<T*>(p);
}

void init_plane(DevPlane& p, const core::Plane& h, size_t rows, uint32_t d) {
  p.type = h.type;
  p.stride = h.stride;
  p.scale_f16 = h.scale_f16;
  p.lsq = h.codec.lsq;
  p.data = dev_alloc<uint8_t>(rows * h.stride, "cache rows");
  // f16 scales get 2 bytes more: the tile kernel reads them as aligned 4-byte words, and with an
  // odd number of rows the last word runs past the last scale.
  const size_t sb = fmt::scale_bytes(h.type, h.scale_f16);
  p.scales = dev_alloc<uint8_t>(rows * sb + (sb == 2 ? 2 : 0), "cache scales");
  if (fmt::is_tq(h.type)) {
    const auto& cb = h.codec.cb;
    p.centroids = dev_alloc<float>(cb.levels, "codebook");
    p.boundaries = dev_alloc<float>(cb.levels - 1, "codebook");
    TQKV_CUDA_CHECK(cudaMemcpy(p.centroids, cb.centroids, cb.levels * sizeof(float), cudaMemcpyHostToDevice));
    TQKV_CUDA_CHECK(cudaMemcpy(p.boundaries, cb.boundaries, (cb.levels - 1) * sizeof(float), cudaMemcpyHostToDevice));
    for (uint32_t e = 0; e < cb.levels && e < 16; ++e) {
      const uint16_t h = tqkv::f32_to_f16(cb.centroids[e]);  // round to nearest even, as __float2half_rn
      p.tab.lo[e >> 2] |= uint32_t(h & 0xFF) << ((e & 3) * 8);
      p.tab.hi[e >> 2] |= uint32_t(h >> 8) << ((e & 3) * 8);
    }
    const Lut& lut = lut_for(cb, d);
    p.lut = dev_alloc<uint8_t>(lut.cells.size(), "quantization table");
    TQKV_CUDA_CHECK(cudaMemcpy(p.lut, lut.cells.data(), lut.cells.size(), cudaMemcpyHostToDevice));
    p.lut_size = static_cast<uint32_t>(lut.cells.size());
    p.lut_off = lut.off;
    p.lut_scale = lut.scale;
  }
}

void free_plane(DevPlane& p) {
  cudaFree(p.data);
  cudaFree(p.scales);
  cudaFree(p.centroids);
  cudaFree(p.boundaries);
  cudaFree(p.lut);
}

}  // namespace

DeviceCache::DeviceCache(const core::Cache& meta) {
  const auto& c = meta.config();
  if (!device_available())
    fail(TQKV_ERROR_UNSUPPORTED, "backend: cuda was asked for but no CUDA device is usable here; use 0 (cpu)");
  for (int w = 0; w < 2; ++w) {
    const uint32_t t = w == 0 ? c.k_type : c.v_type;
    if (!(fmt::is_tq(t) || t == fmt::F16))
      fail(TQKV_ERROR_UNSUPPORTED, std::string(w == 0 ? "k_type" : "v_type") + ": " + std::to_string(t) +
                                       " is not supported by the CUDA backend; allowed there: 2, 3, 4, 8 (TurboQuant "
                                       "bits), 16 (f16)");
  }
  TQKV_CUDA_CHECK(cudaGetDevice(&device_));
  // The attention kernels' grid has the sequences in z, which CUDA limits to 65535.
  if (c.num_seqs > 65535)
    invalid("num_seqs: " + std::to_string(c.num_seqs) + " is invalid for a CUDA cache; allowed: 1 .. 65535");
  TQKV_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, device_));
  TQKV_CUDA_CHECK(cudaDeviceGetAttribute(&cc_major_, cudaDevAttrComputeCapabilityMajor, device_));
  TQKV_CUDA_CHECK(cudaDeviceGetAttribute(&smem_per_sm_, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device_));
  TQKV_CUDA_CHECK(cudaDeviceGetAttribute(&smem_per_block_, cudaDevAttrMaxSharedMemoryPerBlockOptin, device_));
  d_ = c.head_dim;
  hkv_ = c.num_kv_heads;
  seqs_ = c.num_seqs;
  cap_ = c.capacity;
  const size_t rows = size_t(seqs_) * hkv_ * cap_;
  try {
    init_plane(k_, meta.plane(0), rows, d_);
    init_plane(v_, meta.plane(1), rows, d_);
    signs_ = dev_alloc<float>(d_, "rotation signs");
    TQKV_CUDA_CHECK(cudaMemcpy(signs_, meta.signs(), d_ * sizeof(float), cudaMemcpyHostToDevice));
    for (uint32_t j = 0; j < d_; ++j)
      if (meta.signs()[j] < 0.0f) sign_bits_[j / 32] |= 1u << (j % 32);
    lengths_ = dev_alloc<int64_t>(seqs_, "lengths");
    centers_ = dev_alloc<float>(size_t(seqs_) * hkv_ * d_, "key means");
    host_stage(4096);
    state_ = dev_alloc<enc::State>(1, "append state");
    enc::State init{};
    init.flags[0] = init.flags[1] = enc::kNoError;
    TQKV_CUDA_CHECK(cudaMemcpy(state_, &init, sizeof init, cudaMemcpyHostToDevice));
    cudaEvent_t ev = nullptr;
    TQKV_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    stage_event_ = ev;
    center_serial_.assign(seqs_, 0);
  } catch (...) {
    release();
    throw;
  }
}

DeviceCache::~DeviceCache() {
  // cudaFree needs no particular current device, but the event and the pinned buffer are
  // released on the cache's own device all the same.
  try {
    DeviceScope scope(device_);
    release();
  } catch (...) {
    release();
  }
}

void DeviceCache::release() {
  for (void* p : retired_) cudaFree(p);
  retired_.clear();
  free_plane(k_);
  free_plane(v_);
  cudaFree(signs_);
  cudaFree(lengths_);
  cudaFree(centers_);
  cudaFree(staging_);
  cudaFreeHost(host_stage_);
  cudaFree(ws_);
  cudaFree(state_);
  if (stage_event_) cudaEventDestroy(static_cast<cudaEvent_t>(stage_event_));
  state_ = nullptr;
  stage_event_ = nullptr;
  k_ = v_ = DevPlane{};
  signs_ = centers_ = nullptr;
  lengths_ = nullptr;
  staging_ = ws_ = nullptr;
  host_stage_ = nullptr;
  host_stage_bytes_ = 0;
}

void DeviceCache::push_state(const core::Cache& meta) {
  DeviceScope scope(device_);
  std::vector<int64_t> len(seqs_);
  std::vector<float> mu(size_t(seqs_) * hkv_ * d_, 0.0f);
  for (uint32_t s = 0; s < seqs_; ++s) {
    len[s] = meta.length(s);
    if (const float* m = meta.k_center(s)) std::copy(m, m + size_t(hkv_) * d_, mu.begin() + std::ptrdiff_t(size_t(s) * hkv_ * d_));
  }
  auto st = static_cast<cudaStream_t>(stream_);
  // Synchronous with respect to the host vectors: they die at return.
  TQKV_CUDA_CHECK(cudaMemcpyAsync(lengths_, len.data(), len.size() * sizeof(int64_t), cudaMemcpyHostToDevice, st));
  TQKV_CUDA_CHECK(cudaMemcpyAsync(centers_, mu.data(), mu.size() * sizeof(float), cudaMemcpyHostToDevice, st));
  TQKV_CUDA_CHECK(cudaStreamSynchronize(st));
}

void DeviceCache::set_stream(void* stream) {
  DeviceScope scope(device_);
  if (capturing(stream_))
    fail(TQKV_ERROR_UNSUPPORTED, "stream: the cache's current stream is being captured into a CUDA graph; set the "
                                 "stream outside the capture");
  // Work queued on the old stream (asynchronous appends) must be done before the new one runs.
  TQKV_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(stream_)));
  stream_ = stream;
}

void DeviceCache::reset(core::Cache& meta, uint32_t seq) {
  DeviceScope scope(device_);
  sync(meta);
  meta.reset(seq);
  push_state(meta);
}

void DeviceCache::set_k_center(core::Cache& meta, uint32_t seq, const float* mu_host) {
  DeviceScope scope(device_);
  if (graph_uncentered_)
    fail(TQKV_ERROR_UNSUPPORTED, "set_k_center: appends captured in a CUDA graph on this cache store keys without a "
                                 "key mean (none was set when they were captured), and replays would not match one "
                                 "set now; set key means before capturing");
  sync(meta);
  meta.set_k_center(seq, mu_host);
  push_state(meta);
}

void DeviceCache::upload(const core::Cache& src, core::Cache& meta) {
  DeviceScope scope(device_);
  if (!src.host_storage()) invalid("src: must be a host cache to upload from");
  for (uint32_t s = 0; s < seqs_ && graph_uncentered_; ++s)
    if (src.k_center(s) != nullptr)
      fail(TQKV_ERROR_UNSUPPORTED, "src: holds key means, and appends captured in a CUDA graph on this cache store "
                                   "keys without one; copy into a cache that has no captured appends");
  sync(meta);
  auto st = static_cast<cudaStream_t>(stream_);
  const size_t rows = size_t(seqs_) * hkv_ * cap_;
  for (int w = 0; w < 2; ++w) {
    const core::Plane& h = src.plane(w);
    const DevPlane& p = plane(w);
    TQKV_CUDA_CHECK(cudaMemcpyAsync(p.data, h.data.get(), rows * p.stride, cudaMemcpyHostToDevice, st));
    const size_t sb = fmt::scale_bytes(p.type, p.scale_f16);
    if (sb) TQKV_CUDA_CHECK(cudaMemcpyAsync(p.scales, h.scales.get(), rows * sb, cudaMemcpyHostToDevice, st));
  }
  TQKV_CUDA_CHECK(cudaStreamSynchronize(st));
  for (uint32_t s = 0; s < seqs_; ++s) meta.restore(s, src.length(s), src.k_center(s));
  push_state(meta);
}

void DeviceCache::download(const core::Cache& meta, core::Cache& dst) const {
  if (!dst.host_storage()) invalid("dst: must be a host cache to download into");
  DeviceScope scope(device_);
  // Reading the rows back waits for the stream, which would invalidate the caller's capture.
  if (capturing(stream_))
    fail(TQKV_ERROR_UNSUPPORTED, "cache: reading a CUDA cache back to the host (tqkv_cache_read, "
                                 "tqkv_attend_reference, tqkv_cache_copy to a CPU cache) waits for its stream, which is "
                                 "being captured into a CUDA graph; do it outside the capture");
  auto st = static_cast<cudaStream_t>(stream_);
  const size_t rows = size_t(seqs_) * hkv_ * cap_;
  for (int w = 0; w < 2; ++w) {
    core::Plane& h = dst.mutable_plane(w);
    const DevPlane& p = plane(w);
    TQKV_CUDA_CHECK(cudaMemcpyAsync(h.data.get(), p.data, rows * p.stride, cudaMemcpyDeviceToHost, st));
    const size_t sb = fmt::scale_bytes(p.type, p.scale_f16);
    if (sb) TQKV_CUDA_CHECK(cudaMemcpyAsync(h.scales.get(), p.scales, rows * sb, cudaMemcpyDeviceToHost, st));
  }
  TQKV_CUDA_CHECK(cudaStreamSynchronize(st));
  check_no_failure();
  const std::vector<float> mu = device_centers();
  const std::vector<int64_t> len = graph_appends_ ? device_lengths() : std::vector<int64_t>();
  for (uint32_t s = 0; s < seqs_; ++s) {
    const float* c = meta.k_center(s);
    if (c && center_serial_[s]) c = mu.data() + size_t(s) * hkv_ * d_;  // defined by an asynchronous append
    dst.restore(s, graph_appends_ ? len[s] : meta.length(s), c);
  }
}

void DeviceCache::grow(void*& buf, size_t& have, size_t bytes, bool pinned, const char* what, bool retire) {
  if (bytes <= have) return;
  // The new buffer first: when it cannot be had, the old one (and its size) stay as they were.
  void* fresh = nullptr;
  const cudaError_t e = pinned ? cudaMallocHost(&fresh, bytes) : cudaMalloc(&fresh, bytes);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    fail(e == cudaErrorMemoryAllocation ? TQKV_ERROR_OUT_OF_MEMORY : TQKV_ERROR_BACKEND,
         "cuda: cannot allocate " + std::to_string(bytes) + " bytes of " + what + ": " + cudaGetErrorString(e));
  }
  if (pinned) cudaFreeHost(buf);
  else if (retire && buf) retired_.push_back(buf);
  else cudaFree(buf);
  buf = fresh;
  have = bytes;
}

uint8_t* DeviceCache::host_stage(size_t bytes) {
  if (bytes > host_stage_bytes_)
    grow(host_stage_, host_stage_bytes_, std::max(bytes, 2 * host_stage_bytes_), true, "pinned append staging");
  return static_cast<uint8_t*>(host_stage_);
}

void* DeviceCache::workspace(size_t bytes, bool capturing) {
  DeviceScope scope(device_);
  if (bytes <= ws_bytes_) {
    if (capturing) ws_captured_ = true;
    return ws_;
  }
  if (capturing)
    fail(TQKV_ERROR_INVALID_ARGUMENT,
         "workspace: the cache's own attention workspace (" + std::to_string(ws_bytes_) + " bytes) is smaller than the " +
             std::to_string(bytes) + " bytes needed, and it cannot grow during CUDA graph capture; pass "
             "params.workspace (size from tqkv_attend_workspace_size) or call tqkv_attend once before capturing");
  TQKV_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(stream_)));  // the old one may be in use
  grow(ws_, ws_bytes_, bytes, false, "attention workspace", ws_captured_);  // captured graphs still point at it
  return ws_;
}

}  // namespace tqkv::cuda
