// A cache whose rows live in device memory (cudaMalloc), in exactly the format of docs/format.md.
// The host-side core::Cache (built without host storage) keeps the bookkeeping: lengths, key
// means, validation, masks. This header has no CUDA types so the C API can include it.
#pragma once
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

#include "core/cache.h"
#include "cuda/half_bytes.h"
#include "tqkv/tqkv.h"

namespace tqkv::cuda {

bool device_available();
// Where p points, as cudaPointerGetAttributes says: kHostMemory (host or unknown), kManaged, or
// the device's number for device memory. One lookup costs about a microsecond of host time.
constexpr int kHostMemory = -2, kManaged = -1;
int pointer_device(const void* p);
// Whether p points to device (or managed) memory.
inline bool on_device(const void* p) { return pointer_device(p) != kHostMemory; }
// pointer_device(p) for a pointer the cache on `device` is given (NULL: kHostMemory). Throws
// INVALID_ARGUMENT naming `what` when it is device memory of another device: a kernel there would
// fault without peer access. Managed memory is accepted anywhere.
int locate(const void* p, int device, const char* what);

// Makes `device` the calling thread's current device until the scope ends (CUDA's runtime calls
// act on the current device: a cache made on GPU 1 must not allocate or launch on GPU 0 because
// the caller's thread last used GPU 0).
class DeviceScope {
 public:
  explicit DeviceScope(int device);
  ~DeviceScope();
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int prev_ = -1;
};
// Whether stream (a cudaStream_t) is being captured into a graph.
bool capturing(void* stream);
// Asynchronous host-to-device copy on stream (src must stay valid until the stream reaches it).
void copy_to_device(void* dst, const void* src, size_t bytes, void* stream);

// One plane (K or V) on the device.
struct DevPlane {
  uint32_t type = 0;
  size_t stride = 0;           // bytes between rows
  bool scale_f16 = false;
  uint8_t* data = nullptr;     // rows, [seq][kv_head][slot]
  void* scales = nullptr;      // one scale per row (TQ types)
  float* centroids = nullptr;  // [levels] (TQ types)
  float* boundaries = nullptr; // [levels - 1] (TQ types)
  bool lsq = false;
  HalfBytes tab;               // f16 codebook for the attention kernel (2/3/4-bit types)
  uint8_t* lut = nullptr;      // the encoder's quantization table (cuda/quant_table.h)
  uint32_t lut_size = 0, lut_off = 0;
  float lut_scale = 0;
};

namespace enc {
struct State;
}

class DeviceCache {
 public:
  // Allocates and zeroes every buffer on the current device. Throws tqkv::Error
  // (OUT_OF_MEMORY, BACKEND) naming what failed.
  explicit DeviceCache(const core::Cache& meta);
  ~DeviceCache();
  DeviceCache(const DeviceCache&) = delete;
  DeviceCache& operator=(const DeviceCache&) = delete;

  // Waits for the old stream first, so that work queued there runs before the new stream's.
  void set_stream(void* stream);
  void* stream() const { return stream_; }
  int device() const { return device_; }
  int sm_count() const { return sm_count_; }
  int cc_major() const { return cc_major_; }
  int smem_per_sm() const { return smem_per_sm_; }        // shared memory of one multiprocessor
  int smem_per_block() const { return smem_per_block_; }  // the most one block may opt into

  const DevPlane& plane(int which) const { return which == 0 ? k_ : v_; }
  const float* signs() const { return signs_; }       // [head_dim]
  // [num_seqs]: the lengths the kernels use. The host lengths count asynchronous appends at once
  // and graph replays at the next sync, so the two differ in between.
  const int64_t* lengths() const { return lengths_; }
  const float* centers() const { return centers_; }   // [num_seqs][kv_heads][head_dim]; zero = no key mean

  // Appends counts[s] tokens to every sequence s (the layout of tqkv_cache_append_batch). Every
  // value is checked on the device before the append lands; a failed append changes nothing.
  // Synchronous (async = false): reports an earlier asynchronous failure first (sync()), then
  // waits for this append and reports its failure; k and v may be device or host memory.
  // Asynchronous: k and v in device memory, nothing waits; the host bookkeeping counts the
  // append at once and sync() reports a failure later, taking back it and every append after it.
  // During graph capture (asynchronous only) the host counts nothing: replays are counted by
  // sync(), which then takes the lengths from the device.
  void append(core::Cache& meta, const uint32_t* counts, tqkv_dtype dtype, const void* k, const void* v,
              bool async = false);
  // Waits for the stream (refused during capture). If an asynchronous append failed since the
  // last sync, brings the host bookkeeping back to the device's (which never took the failed
  // append or any after it) and throws its error; fetches the key means that asynchronous
  // appends defined, and the lengths graph replays reached.
  void sync(core::Cache& meta);
  void reset(core::Cache& meta, uint32_t seq);
  void set_k_center(core::Cache& meta, uint32_t seq, const float* mu_host);

  // Byte-for-byte copies between a host cache and this one (same configuration but backend).
  // download throws while an asynchronous failure waits for sync().
  void upload(const core::Cache& host_src, core::Cache& meta);
  void download(const core::Cache& meta, core::Cache& host_dst) const;

  // A cache-owned attention workspace, grown outside graph capture only. Once a capture has
  // used it, a grown one replaces it without freeing it (retired_): the captured graphs keep
  // pointing at the old one.
  void* workspace(size_t bytes, bool capturing);
  // Serialises tqkv_attend calls that share this cache's workspace and stream: the header lets
  // several threads attend on one cache at once, and their partials must not interleave.
  std::mutex& attend_mutex() const { return attend_mu_; }

  // Mirrors the host lengths and key means after the host changed them.
  void push_state(const core::Cache& meta);

 private:
  void* stream_ = nullptr;
  int device_ = 0, sm_count_ = 0, cc_major_ = 0, smem_per_sm_ = 0, smem_per_block_ = 0;
  DevPlane k_, v_;
  float* signs_ = nullptr;
  uint32_t sign_bits_[16] = {};  // the signs as bits, for the encoder's parameters (enc::EncodeArgs)
  int64_t* lengths_ = nullptr;
  float* centers_ = nullptr;
  // The append pipeline (cuda/encode.h): its device state; serial numbers of the last append and
  // of the last one sync() has seen.
  enc::State* state_ = nullptr;
  unsigned serial_ = 0, synced_ = 0;
  static constexpr unsigned kGraphSerial = ~0u;  // the serial of every captured append
  // An append was captured into a graph: its replays move the device lengths without the host
  // knowing, so sync() and download() take the lengths from the device.
  bool graph_appends_ = false;
  // A captured append encodes keys without a key mean (none was set at capture): a key mean set
  // later would not match its rows, so set_k_center and copies that bring key means are refused.
  bool graph_uncentered_ = false;
  std::vector<int64_t> device_lengths() const;
  std::vector<unsigned> center_serial_;  // [seq] append that defined its key mean, not fetched yet; 0: none
  void* stage_event_ = nullptr;  // cudaEvent_t: the last upload from host_stage_ is done
  struct SyncContext;             // the synchronous append being checked, for its error message
  void sync_impl(core::Cache& meta, const SyncContext* ctx);
  // The device's key means, [num_seqs][hkv][d], when center_serial_ marks any; else empty.
  std::vector<float> device_centers() const;
  // Throws the failure of an asynchronous append that sync() has not reported yet (after the
  // caller waited for the stream).
  void check_no_failure() const;
  void* staging_ = nullptr;  // host input copied here before encoding
  size_t staging_bytes_ = 0;
  // Pinned host memory for append's tables (up, when they do not fit the kernel parameters) and
  // the pipeline state (down), so those copies are asynchronous DMA instead of staged pageable
  // copies. An append waits for stage_event_ before writing it.
  uint8_t* host_stage(size_t bytes);
  void* host_stage_ = nullptr;
  size_t host_stage_bytes_ = 0;
  // Replaces buf (have bytes; device memory, or pinned host memory) by one of `bytes` bytes,
  // contents not kept, if it is smaller; `what` names it in the error, and buf stays as it was
  // when the new one cannot be allocated.
  // retire: a captured graph may still use buf, so it is kept (freed with the cache) instead.
  void grow(void*& buf, size_t& have, size_t bytes, bool pinned, const char* what, bool retire = false);
  void* ws_ = nullptr;
  size_t ws_bytes_ = 0;
  bool ws_captured_ = false;      // a captured attend used ws_
  std::vector<void*> retired_;    // device buffers captured graphs may still use
  mutable std::mutex attend_mu_;
  void release();                 // frees everything (the destructor, a failed constructor)
  uint32_t d_ = 0, hkv_ = 0, seqs_ = 0, cap_ = 0;
};

}  // namespace tqkv::cuda
