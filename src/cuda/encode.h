// The append pipeline's kernels (encode.cu) and what they take; append.cu drives them.
//
// An append is one or two kernels on the cache's stream, after the key-mean kernels when it
// defines a key mean:
// - direct: encode_kernel writes every row into its slot; its last block to finish decides.
//   Used when no slot of the append holds a live row (linear layout, or a ring this append does
//   not wrap, as far as the host knows: a ring with captured appends always takes the staged
//   path), so rows written by an append that then fails are past the lengths and never seen.
// - staged: encode_kernel writes into scratch and commit_kernel scatters into the slots, its
//   last block deciding; used when a ring append overwrites live rows.
// The deciding block commits the lengths and key means only if no error key is set; otherwise
// it records the failure in State, and every later append sees it there and does nothing, so
// the cache stays as it was before the failed append until the host has read the failure
// (DeviceCache::sync). No host synchronisation is needed between appends.
#pragma once
#include <cstdint>

#include "tqkv/tqkv.h"

namespace tqkv::cuda::enc {

// Error keys: atomicMin over (kind << kKindShift | flat input index) per tensor, so that a
// non-finite input wins over overflows and, within a kind, the first position wins.
constexpr unsigned long long kNoError = ~0ull;
constexpr int kKindShift = 60;
// kRotation: a row of finite values whose rotation overflows f32 (core::rotation_overflow_message).
enum ErrorKind : unsigned {
  kNonFinite = 0,
  kDenseOverflow = 1,
  kScaleF16 = 2,
  kScaleF32 = 3,
  kCapacity = 4,
  kRotation = 5
};
constexpr uint32_t kMeanChunk = 256;  // tokens summed sequentially per key-mean partial
// Appends over at most this many sequences carry their tables in the kernel parameters (no copy
// on the stream, nothing the host must keep alive); larger ones upload them.
constexpr uint32_t kTabSeqs = 64;

// Device state of the append pipeline, one per cache. At creation and between appends:
// flags = kNoError, ticket = 0.
struct State {
  unsigned long long flags[2];  // error keys (K, V) of the append in flight
  unsigned int ticket;          // blocks of the deciding kernel done so far (low 16 bits; see decide)
  unsigned int failed;          // serial of the first failed append since the host last looked; 0: none
  unsigned int dropped;         // appends skipped because of it
  unsigned long long rows_back; // rows (K and V) of the failed append and the skipped ones
  unsigned int w, kind, seq, head, coord;  // where it failed (w: 0 = k, 1 = v)
  unsigned long long token, flat;  // token within seq; flat index into that tensor's input (kCapacity: the position)
};

// Where each sequence's rows go comes from the device lengths when the kernels run, not from the
// host, so appends replayed from a CUDA graph land after the previous replay (and a linear
// cache's capacity is checked there too).
struct SeqTables {
  uint64_t prefix[kTabSeqs + 1];  // first input token of each sequence, then the total
  int32_t center[kTabSeqs];       // -1 none, -2 stored key mean (zero: none), i >= 0: the i-th mean defined now
  int32_t def_seq[kTabSeqs];      // sequences whose key mean this append defines
};

// The same tables, in the parameters (inline) or in device memory.
struct Tables {
  SeqTables in;
  bool inline_tabs = false;
  const uint64_t* prefix = nullptr;
  const int32_t* center = nullptr;
  const int32_t* def_seq = nullptr;
};

struct PlaneArgs {
  uint32_t bits = 0;  // 2, 3, 4, 8; 0 = dense f16
  uint32_t stride = 0, sb = 0;  // row and scale bytes
  bool lsq = false, scale_f16 = false;
  const float* boundaries = nullptr;  // device, levels - 1
  const float* centroids = nullptr;   // device, levels
  // Quantization table (cuda/quant_table.h): cell k = round(u * lut_scale) holds the number of
  // boundaries below the cell; one comparison with the next boundary finishes.
  const uint8_t* lut = nullptr;
  uint32_t lut_size = 0, lut_off = 0;
  float lut_scale = 0;
  uint8_t* rows = nullptr;    // where encode_kernel writes: the cache rows (direct) or scratch
  uint8_t* scales = nullptr;
  uint8_t* dst_rows = nullptr;    // the cache's rows and scales
  uint8_t* dst_scales = nullptr;
};

// What the deciding block needs.
struct Finish {
  State* state = nullptr;
  unsigned int serial = 0;   // this append's number (> 0)
  uint64_t rows2 = 0;        // its rows, K and V
  int64_t* lengths = nullptr;
  float* centers = nullptr;  // [num_seqs][hkv][d]
  const float* mu_new = nullptr;  // [ndef][hkv][d]
  uint32_t ndef = 0, cols = 0, d = 0;
};

struct EncodeArgs {
  const void* in[2] = {nullptr, nullptr};  // device K, V input [tokens][hkv][d]
  PlaneArgs plane[2];
  Tables tabs;
  Finish fin;
  uint64_t rows = 0;   // R = tokens * hkv per tensor
  uint64_t tasks = 0;  // warp tasks per tensor: ceil(R / rows_per_warp(d, vpl))
  uint32_t vpl = 32;   // values of a row per lane (values_per_lane)
  uint32_t hkv = 0, num_seqs = 0, cap = 0;
  // r / hkv as __umulhi(r, hkv_mul) >> hkv_shift for r < 2^31 (hkv > 1; append() fills them).
  uint32_t hkv_mul = 0, hkv_shift = 0;
  bool ring = false;
  bool direct = false;               // rows go to their slots, and this kernel decides
  bool centered = false;             // some sequence stores keys minus a mean
  const float* centers = nullptr;    // stored key means
  uint32_t sign_bits[16] = {};  // bit j % 32 of word j / 32: coordinate j is negated (d <= 512)
  float inv_sqrt_d = 0;  // float(1 / sqrt(d)), as core/rotation.cpp
  double sqrt_d = 0;
};

struct CommitArgs {
  PlaneArgs plane[2];
  Tables tabs;
  Finish fin;
  uint32_t nrows = 0;  // R < 2^32 (append() checks)
  uint32_t hkv = 0, cap = 0, num_seqs = 0;
  bool ring = false;
};

struct MeanArgs {
  const void* k = nullptr;
  Tables tabs;
  uint32_t ndef = 0, cols = 0, chunks = 0;
  double* partial = nullptr;
  float* mu = nullptr;
};

// Launchers (stream: a cudaStream_t). Each checks its launch.
void launch_means(tqkv_dtype dt, const MeanArgs& m, void* stream);
void launch_encode(uint32_t d, tqkv_dtype dt, const EncodeArgs& a, int sm_count, void* stream);
void launch_commit(const CommitArgs& a, int sm_count, void* stream);
// Values of a row per lane for an append of `rows` rows per plane: 32, or fewer for a small append
// (see Geo in encode.cu); the launch reads it from EncodeArgs::vpl, and tasks count warps of
// rows_per_warp(d, vpl) rows.
uint32_t values_per_lane(uint32_t d, tqkv_dtype dt, uint64_t rows, int sm_count);
uint32_t rows_per_warp(uint32_t d, uint32_t vpl);

// Fixes values_per_lane's choice for every later append in the process (tests and A/B runs; the
// environment variable TQKV_CUDA_ENCODE_VPL=32 or =small sets it at start).
enum class Lanes : int { kAuto = 0, kWide = 1, kNarrow = 2 };
void force_lanes(Lanes lanes);

}  // namespace tqkv::cuda::enc
