// GGUF v3 reader: memory-mapped, every count, offset, size and alignment validated before use.
// A truncated or corrupt file gives tqkv::Error(TQKV_ERROR_IO) naming what is wrong.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace tqkv::model {

// Metadata value types, as numbered by the GGUF specification.
enum class GgufType : uint32_t {
  UINT8 = 0, INT8 = 1, UINT16 = 2, INT16 = 3, UINT32 = 4, INT32 = 5, FLOAT32 = 6, BOOL = 7,
  STRING = 8, ARRAY = 9, UINT64 = 10, INT64 = 11, FLOAT64 = 12
};

// Tensor types, as numbered by ggml.
enum class TensorType : uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15, BF16 = 30
};

// Any ggml type id, not only those named above; "unknown" for ids ggml never assigned.
const char* type_name(TensorType t);
// Whether the block layout of t is known (such tensors can be opened and listed).
bool type_known(TensorType t);
// Whether dequantize handles t.
bool type_supported(TensorType t);
// Elements per block and bytes per block of any known type; throws TQKV_ERROR_UNSUPPORTED for
// ids ggml never assigned.
uint64_t type_block_elems(TensorType t);
uint64_t type_block_bytes(TensorType t);
// Dequantizes n elements (a multiple of the block size) of type t. Throws TQKV_ERROR_UNSUPPORTED
// naming the type when !type_supported(t).
void dequantize(TensorType t, const uint8_t* src, float* dst, uint64_t n);

// A metadata value of any type, arrays (nested ones included) decoded recursively.
struct GgufValue {
  GgufType type = GgufType::UINT8;
  uint64_t u = 0;    // UINT8/16/32/64
  int64_t i = 0;     // INT8/16/32/64
  double f = 0;      // FLOAT32/64
  bool b = false;    // BOOL
  std::string s;     // STRING
  GgufType elem_type = GgufType::UINT8;  // ARRAY
  std::vector<GgufValue> items;          // ARRAY
};

struct GgufTensor {
  std::string name;
  TensorType type;
  std::vector<uint64_t> dims;  // ne[0] first: ne[0] is the contiguous (row) dimension
  uint64_t n_elements = 0;
  uint64_t n_bytes = 0;
  const uint8_t* data = nullptr;  // inside the mapping, valid while the GgufFile lives
  uint64_t rows() const { return dims.empty() ? 0 : n_elements / dims[0]; }
};

class GgufFile {
 public:
  static GgufFile open(const std::string& path);
  GgufFile(GgufFile&&) noexcept;
  GgufFile& operator=(GgufFile&&) noexcept;
  ~GgufFile();

  const std::string& path() const;
  uint32_t version() const;
  uint64_t alignment() const;
  std::vector<std::string> keys() const;
  bool has(const std::string& key) const;
  GgufType type_of(const std::string& key) const;  // throws if missing
  // Element type and length of an ARRAY key; throws if missing or not an array.
  GgufType array_type_of(const std::string& key) const;
  uint64_t array_size(const std::string& key) const;
  // Any value, decoded in full (for generic dumps and nested arrays); throws if missing.
  GgufValue get_value(const std::string& key) const;

  // Typed getters throw TQKV_ERROR_IO naming the key, the expected and the actual type when
  // the key is missing or of another type. Integer getters accept any integer type whose value
  // fits; float getters accept FLOAT32 and FLOAT64.
  uint64_t get_uint(const std::string& key) const;
  int64_t get_int(const std::string& key) const;
  double get_float(const std::string& key) const;
  bool get_bool(const std::string& key) const;
  std::string get_string(const std::string& key) const;
  std::vector<std::string> get_string_array(const std::string& key) const;
  std::vector<double> get_float_array(const std::string& key) const;
  std::vector<int64_t> get_int_array(const std::string& key) const;
  uint64_t get_uint_or(const std::string& key, uint64_t def) const;
  double get_float_or(const std::string& key, double def) const;
  bool get_bool_or(const std::string& key, bool def) const;
  std::string get_string_or(const std::string& key, const std::string& def) const;

  const std::vector<GgufTensor>& tensors() const;
  const GgufTensor* find(const std::string& name) const;
  const GgufTensor& tensor(const std::string& name) const;  // throws TQKV_ERROR_IO naming it
  // The whole tensor dequantized to f32.
  std::vector<float> to_f32(const GgufTensor& t) const;

 private:
  struct Impl;
  explicit GgufFile(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tqkv::model
