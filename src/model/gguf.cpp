// GGUF reader. The whole file is mapped read-only and parsed once, up front, through a cursor
// that checks every read against the end of the file; counts, sizes and offsets from the file
// are only used after a check that cannot overflow. Metadata values are validated in that pass
// but decoded lazily from the mapping, so the 262k-entry vocabularies cost nothing until asked.
#include "model/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <functional>
#include <limits>
#include <unordered_map>

#include "core/error.h"

namespace tqkv::model {

namespace {

constexpr uint32_t kMaxDims = 4;
// Arrays of arrays are legal; the bound keeps the recursive validation off the end of the stack
// for a crafted file that nests millions deep.
constexpr int kMaxNesting = 16;
// Smallest encodings, used to bound counts by the bytes left before anything is allocated: a
// key-value pair is a key length, a type and at least one value byte; a tensor info is a name
// length, n_dims, one dimension, a type and an offset.
constexpr uint64_t kMinKvBytes = 8 + 4 + 1;
constexpr uint64_t kMinTensorInfoBytes = 8 + 4 + 8 + 4 + 8;
constexpr uint64_t kMinArrayBytes = 4 + 8;

const char* value_type_name(GgufType t) {
  switch (t) {
    case GgufType::UINT8: return "UINT8";
    case GgufType::INT8: return "INT8";
    case GgufType::UINT16: return "UINT16";
    case GgufType::INT16: return "INT16";
    case GgufType::UINT32: return "UINT32";
    case GgufType::INT32: return "INT32";
    case GgufType::FLOAT32: return "FLOAT32";
    case GgufType::BOOL: return "BOOL";
    case GgufType::STRING: return "STRING";
    case GgufType::ARRAY: return "ARRAY";
    case GgufType::UINT64: return "UINT64";
    case GgufType::INT64: return "INT64";
    case GgufType::FLOAT64: return "FLOAT64";
  }
  return "unknown";
}

bool value_type_known(uint32_t t) { return t <= uint32_t(GgufType::FLOAT64); }

// Byte size of a fixed-size value type; 0 for STRING and ARRAY.
uint64_t scalar_size(GgufType t) {
  switch (t) {
    case GgufType::UINT8: case GgufType::INT8: case GgufType::BOOL: return 1;
    case GgufType::UINT16: case GgufType::INT16: return 2;
    case GgufType::UINT32: case GgufType::INT32: case GgufType::FLOAT32: return 4;
    case GgufType::UINT64: case GgufType::INT64: case GgufType::FLOAT64: return 8;
    default: return 0;
  }
}

bool is_unsigned(GgufType t) {
  return t == GgufType::UINT8 || t == GgufType::UINT16 || t == GgufType::UINT32 || t == GgufType::UINT64;
}
bool is_signed(GgufType t) {
  return t == GgufType::INT8 || t == GgufType::INT16 || t == GgufType::INT32 || t == GgufType::INT64;
}
bool is_float(GgufType t) { return t == GgufType::FLOAT32 || t == GgufType::FLOAT64; }

uint64_t load_le(const uint8_t* p, uint64_t n) {
  uint64_t v = 0;
  for (uint64_t k = 0; k < n; ++k) v |= uint64_t(p[k]) << (8 * k);
  return v;
}

// Decodes one fixed-size value already known to lie inside the mapping.
GgufValue scalar_at(GgufType t, const uint8_t* p) {
  GgufValue v;
  v.type = t;
  const uint64_t raw = load_le(p, scalar_size(t));
  switch (t) {
    case GgufType::UINT8: case GgufType::UINT16: case GgufType::UINT32: case GgufType::UINT64: v.u = raw; break;
    case GgufType::INT8: v.i = int8_t(uint8_t(raw)); break;
    case GgufType::INT16: v.i = int16_t(uint16_t(raw)); break;
    case GgufType::INT32: v.i = int32_t(uint32_t(raw)); break;
    case GgufType::INT64: v.i = std::bit_cast<int64_t>(raw); break;
    case GgufType::FLOAT32: v.f = double(std::bit_cast<float>(uint32_t(raw))); break;
    case GgufType::FLOAT64: v.f = std::bit_cast<double>(raw); break;
    case GgufType::BOOL: v.b = raw != 0; break;
    default: break;
  }
  return v;
}

std::string quoted(const std::string& s) {
  // Names come from the file: keep messages printable and bounded whatever the bytes.
  std::string out = "'";
  for (size_t k = 0; k < s.size() && k < 96; ++k) {
    const unsigned char c = static_cast<unsigned char>(s[k]);
    if (c >= 0x20 && c < 0x7F) {
      out += char(c);
    } else {
      static const char hex[] = "0123456789abcdef";
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  if (s.size() > 96) out += "...";
  return out + "'";
}

}  // namespace

struct GgufFile::Impl {
  struct Kv {
    std::string key;
    GgufType type;
    uint64_t off;  // of the value, after the type tag
  };

  std::string path;
  const uint8_t* map = nullptr;
  uint64_t size = 0;
  uint32_t version = 0;
  uint64_t alignment = 32;
  std::vector<Kv> kvs;
  std::unordered_map<std::string, size_t> kv_index;
  std::vector<GgufTensor> tensors;
  std::unordered_map<std::string, size_t> tensor_index;
  std::vector<uint64_t> offsets;  // tensor data offsets relative to the data section
  uint64_t pos = 0;               // parse cursor

  Impl() = default;
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;
  ~Impl() {
    if (map) munmap(const_cast<uint8_t*>(map), size);
  }

  [[noreturn]] void bad(const std::string& msg) const { fail(TQKV_ERROR_IO, "gguf: " + path + ": " + msg); }

  // Cursor reads. `what` is only called to build the message of a failure.
  template <class What>
  void need(uint64_t n, What&& what) const {
    if (n > size - pos)
      bad("truncated: " + what() + " needs " + std::to_string(n) + " bytes at offset " + std::to_string(pos) +
          " but the file (size " + std::to_string(size) + ") ends " + std::to_string(size - pos) + " bytes later");
  }
  template <class What>
  uint64_t read(uint64_t n, What&& what) {
    need(n, what);
    const uint64_t v = load_le(map + pos, n);
    pos += n;
    return v;
  }
  template <class What>
  std::string read_string(What&& what) {
    const uint64_t len = read(8, [&] { return what() + " length"; });
    need(len, what);
    std::string s(reinterpret_cast<const char*>(map + pos), size_t(len));
    pos += len;
    return s;
  }

  void open_file(const std::string& p);
  void parse();
  void parse_kv(uint64_t index);
  // Not a template: it recurses into nested arrays with a new description each level.
  void skip_value(GgufType t, int depth, const std::function<std::string()>& what);
  void parse_tensor_info(uint64_t index);
  void place_tensors();

  const Kv& kv(const std::string& key) const {
    auto it = kv_index.find(key);
    if (it == kv_index.end()) bad("key " + quoted(key) + " not found");
    return kvs[it->second];
  }
  [[noreturn]] void wrong_type(const Kv& k, const std::string& expected) const {
    std::string actual = value_type_name(k.type);
    if (k.type == GgufType::ARRAY) actual += std::string(" of ") + value_type_name(array_elem(k));
    bad("key " + quoted(k.key) + " has type " + actual + ", expected " + expected);
  }
  GgufType array_elem(const Kv& k) const { return GgufType(uint32_t(load_le(map + k.off, 4))); }
  uint64_t array_count(const Kv& k) const { return load_le(map + k.off + 4, 8); }
  // Decodes a value whose bytes parse() has validated; pos-independent.
  GgufValue decode(GgufType t, uint64_t& off) const;
  int64_t to_int(const Kv& k, const GgufValue& v) const;
  uint64_t to_uint(const Kv& k, const GgufValue& v) const;
};

void GgufFile::Impl::open_file(const std::string& p) {
  path = p;
  const int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) bad(std::string("cannot open: ") + std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    bad(std::string("cannot stat: ") + std::strerror(e));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    bad("not a regular file");
  }
  size = uint64_t(st.st_size);
  if (size == 0) {
    ::close(fd);
    bad("empty file, not GGUF");
  }
  void* m = mmap(nullptr, size_t(size), PROT_READ, MAP_PRIVATE, fd, 0);
  const int e = errno;
  ::close(fd);  // the mapping keeps the file alive
  // A file truncated by someone else while mapped would fault on access (SIGBUS); model files
  // are not rewritten in place, and copying them instead would double the memory they take.
  if (m == MAP_FAILED) {
    size = 0;
    bad(std::string("cannot map: ") + std::strerror(e));
  }
  map = static_cast<const uint8_t*>(m);
}

void GgufFile::Impl::skip_value(GgufType t, int depth, const std::function<std::string()>& what) {
  if (t == GgufType::STRING) {
    const uint64_t len = read(8, [&] { return what() + " string length"; });
    need(len, [&] { return what() + " string of " + std::to_string(len) + " bytes"; });
    pos += len;
    return;
  }
  if (t != GgufType::ARRAY) {
    const uint64_t n = scalar_size(t);
    need(n, [&] { return what() + " " + value_type_name(t) + " value"; });
    if (t == GgufType::BOOL && map[pos] > 1) bad(what() + ": BOOL value " + std::to_string(map[pos]) + " is neither 0 nor 1");
    pos += n;
    return;
  }
  if (depth >= kMaxNesting) bad(what() + ": arrays nested deeper than " + std::to_string(kMaxNesting));
  const uint64_t at = pos;
  const uint32_t et = uint32_t(read(4, [&] { return what() + " array element type"; }));
  if (!value_type_known(et))
    bad(what() + ": unknown array element type " + std::to_string(et) + " at offset " + std::to_string(at));
  const GgufType elem = GgufType(et);
  const uint64_t count = read(8, [&] { return what() + " array length"; });
  const uint64_t esize = scalar_size(elem);
  const uint64_t min_elem = esize ? esize : elem == GgufType::STRING ? 8 : kMinArrayBytes;
  if (count > (size - pos) / min_elem)
    bad(what() + ": array of " + std::to_string(count) + " " + value_type_name(elem) + " elements cannot fit in the " +
        std::to_string(size - pos) + " bytes left (offset " + std::to_string(at) + ")");
  if (esize) {
    if (elem == GgufType::BOOL)
      for (uint64_t k = 0; k < count; ++k)
        if (map[pos + k] > 1) bad(what() + ": element " + std::to_string(k) + ": BOOL value " + std::to_string(map[pos + k]) + " is neither 0 nor 1");
    pos += count * esize;  // count * esize <= size - pos: checked above
    return;
  }
  for (uint64_t k = 0; k < count; ++k) {
    if (elem == GgufType::STRING) {  // the common case (vocabularies), kept out of the recursion
      const uint64_t len = read(8, [&] { return what() + " element " + std::to_string(k) + " string length"; });
      need(len, [&] { return what() + " element " + std::to_string(k) + " string of " + std::to_string(len) + " bytes"; });
      pos += len;
    } else {
      skip_value(elem, depth + 1, [&] { return what() + " element " + std::to_string(k); });
    }
  }
}

void GgufFile::Impl::parse_kv(uint64_t index) {
  const uint64_t at = pos;
  std::string key = read_string([&] { return "key #" + std::to_string(index); });
  const auto what = [&] { return "key " + quoted(key); };
  const uint32_t t = uint32_t(read(4, [&] { return what() + " value type"; }));
  if (!value_type_known(t)) bad(what() + " has unknown value type " + std::to_string(t) + " (pair at offset " + std::to_string(at) + ")");
  const uint64_t off = pos;
  skip_value(GgufType(t), 0, what);
  auto [it, inserted] = kv_index.emplace(key, kvs.size());
  if (!inserted) bad("duplicate key " + quoted(key) + " (pairs #" + std::to_string(it->second) + " and #" + std::to_string(index) + ")");
  kvs.push_back(Kv{std::move(key), GgufType(t), off});
}

void GgufFile::Impl::parse_tensor_info(uint64_t index) {
  GgufTensor t;
  t.name = read_string([&] { return "tensor #" + std::to_string(index) + " name"; });
  const auto what = [&] { return "tensor " + quoted(t.name); };
  const uint32_t n_dims = uint32_t(read(4, [&] { return what() + " n_dims"; }));
  if (n_dims == 0 || n_dims > kMaxDims) bad(what() + ": n_dims " + std::to_string(n_dims) + " is outside 1.." + std::to_string(kMaxDims));
  t.dims.resize(n_dims);
  uint64_t n = 1;
  for (uint32_t d = 0; d < n_dims; ++d) {
    const uint64_t ne = read(8, [&] { return what() + " dimension " + std::to_string(d); });
    if (ne == 0) bad(what() + ": dimension " + std::to_string(d) + " is 0");
    // ggml keeps element counts in int64_t.
    if (ne > uint64_t(std::numeric_limits<int64_t>::max()) / n)
      bad(what() + ": element count overflows at dimension " + std::to_string(d) + " (" + std::to_string(ne) + ")");
    n *= ne;
    t.dims[d] = ne;
  }
  t.n_elements = n;
  const uint32_t type = uint32_t(read(4, [&] { return what() + " type"; }));
  t.type = TensorType(type);
  if (!type_known(t.type)) bad(what() + " has unknown tensor type " + std::to_string(type));
  const uint64_t be = type_block_elems(t.type), bb = type_block_bytes(t.type);
  if (t.dims[0] % be != 0)
    bad(what() + ": ne[0] = " + std::to_string(t.dims[0]) + " is not a multiple of the " + type_name(t.type) + " block size " + std::to_string(be));
  if (n / be > std::numeric_limits<uint64_t>::max() / bb) bad(what() + ": byte size overflows");
  t.n_bytes = n / be * bb;
  // Relative to the data section, whose start is known only after the last info:
  // place_tensors() checks the range.
  const uint64_t offset = read(8, [&] { return what() + " data offset"; });
  if (offset % alignment != 0)
    bad(what() + ": data offset " + std::to_string(offset) + " is not a multiple of the alignment " + std::to_string(alignment));
  auto [it, inserted] = tensor_index.emplace(t.name, tensors.size());
  if (!inserted) bad("duplicate tensor name " + quoted(t.name) + " (tensors #" + std::to_string(it->second) + " and #" + std::to_string(index) + ")");
  tensors.push_back(std::move(t));
  offsets.push_back(offset);
}

void GgufFile::Impl::place_tensors() {
  // The data section starts at the first alignment boundary after the tensor infos.
  const uint64_t pad = (alignment - pos % alignment) % alignment;
  if (tensors.empty()) return;
  if (pad > size - pos) bad("data section (aligned start after offset " + std::to_string(pos) + ") lies past the end of the file (size " + std::to_string(size) + ")");
  const uint64_t start = pos + pad, avail = size - start;
  std::vector<size_t> order(tensors.size());
  for (size_t k = 0; k < tensors.size(); ++k) {
    GgufTensor& t = tensors[k];
    const uint64_t off = offsets[k];
    if (off > avail || t.n_bytes > avail - off)
      bad("tensor " + quoted(t.name) + ": data [offset " + std::to_string(off) + ", +" + std::to_string(t.n_bytes) +
          " bytes) from the data section at " + std::to_string(start) + " runs past the end of the file (size " + std::to_string(size) + ")");
    t.data = map + start + off;
    order[k] = k;
  }
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return offsets[a] < offsets[b]; });
  for (size_t k = 1; k < order.size(); ++k) {
    const size_t a = order[k - 1], b = order[k];
    if (offsets[a] + tensors[a].n_bytes > offsets[b])
      bad("tensors " + quoted(tensors[a].name) + " and " + quoted(tensors[b].name) + " overlap");
  }
}

void GgufFile::Impl::parse() {
  need(4, [] { return std::string("magic"); });
  if (std::memcmp(map, "GGUF", 4) != 0) {
    std::string m(reinterpret_cast<const char*>(map), 4);
    bad("bad magic " + quoted(m) + ", expected 'GGUF': not a GGUF file");
  }
  pos = 4;
  version = uint32_t(read(4, [] { return std::string("version"); }));
  if (version != 2 && version != 3) {
    const uint32_t swapped = (version >> 24) | ((version >> 8) & 0xFF00u);
    bad("unsupported GGUF version " + std::to_string(version) + " (supported: 2, 3)" +
        (swapped == 2 || swapped == 3 ? "; big-endian files are not supported" : ""));
  }
  const uint64_t n_tensors = read(8, [] { return std::string("tensor count"); });
  const uint64_t n_kv = read(8, [] { return std::string("metadata count"); });
  if (n_kv > (size - pos) / kMinKvBytes)
    bad("metadata count " + std::to_string(n_kv) + " is impossible: the " + std::to_string(size - pos) + " bytes left hold at most " +
        std::to_string((size - pos) / kMinKvBytes) + " key-value pairs");
  if (n_tensors > (size - pos) / kMinTensorInfoBytes)
    bad("tensor count " + std::to_string(n_tensors) + " is impossible: the " + std::to_string(size - pos) + " bytes left hold at most " +
        std::to_string((size - pos) / kMinTensorInfoBytes) + " tensor infos");

  // Counts are bounded by the file size, but a corrupt count must not reserve gigabytes either.
  kvs.reserve(size_t(std::min<uint64_t>(n_kv, 4096)));
  for (uint64_t k = 0; k < n_kv; ++k) parse_kv(k);

  if (auto it = kv_index.find("general.alignment"); it != kv_index.end()) {
    const Kv& k = kvs[it->second];
    if (!is_unsigned(k.type) && !is_signed(k.type)) wrong_type(k, "an integer (UINT32)");
    uint64_t off = k.off;
    const GgufValue v = decode(k.type, off);
    if (is_signed(k.type) && v.i <= 0) bad("general.alignment " + std::to_string(v.i) + " is not a power of two");
    const uint64_t a = is_signed(k.type) ? uint64_t(v.i) : v.u;
    if (!std::has_single_bit(a)) bad("general.alignment " + std::to_string(a) + " is not a power of two");
    alignment = a;
  }

  tensors.reserve(size_t(std::min<uint64_t>(n_tensors, 4096)));
  offsets.reserve(size_t(std::min<uint64_t>(n_tensors, 4096)));
  for (uint64_t k = 0; k < n_tensors; ++k) parse_tensor_info(k);
  place_tensors();
}

GgufValue GgufFile::Impl::decode(GgufType t, uint64_t& off) const {
  if (t == GgufType::STRING) {
    GgufValue v;
    v.type = t;
    const uint64_t len = load_le(map + off, 8);
    v.s.assign(reinterpret_cast<const char*>(map + off + 8), size_t(len));
    off += 8 + len;
    return v;
  }
  if (t == GgufType::ARRAY) {
    GgufValue v;
    v.type = t;
    v.elem_type = GgufType(uint32_t(load_le(map + off, 4)));
    const uint64_t count = load_le(map + off + 4, 8);
    off += 12;
    v.items.reserve(size_t(count));
    for (uint64_t k = 0; k < count; ++k) v.items.push_back(decode(v.elem_type, off));
    return v;
  }
  GgufValue v = scalar_at(t, map + off);
  off += scalar_size(t);
  return v;
}

int64_t GgufFile::Impl::to_int(const Kv& k, const GgufValue& v) const {
  if (is_signed(v.type)) return v.i;
  if (v.u > uint64_t(std::numeric_limits<int64_t>::max()))
    bad("key " + quoted(k.key) + ": value " + std::to_string(v.u) + " does not fit a signed 64-bit integer");
  return int64_t(v.u);
}

uint64_t GgufFile::Impl::to_uint(const Kv& k, const GgufValue& v) const {
  if (is_unsigned(v.type)) return v.u;
  if (v.i < 0) bad("key " + quoted(k.key) + ": value " + std::to_string(v.i) + " does not fit an unsigned integer");
  return uint64_t(v.i);
}

GgufFile GgufFile::open(const std::string& path) {
  auto impl = std::make_unique<Impl>();
  impl->open_file(path);
  impl->parse();
  return GgufFile(std::move(impl));
}

GgufFile::GgufFile(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GgufFile::GgufFile(GgufFile&&) noexcept = default;
GgufFile& GgufFile::operator=(GgufFile&&) noexcept = default;
GgufFile::~GgufFile() = default;

const std::string& GgufFile::path() const { return impl_->path; }
uint32_t GgufFile::version() const { return impl_->version; }
uint64_t GgufFile::alignment() const { return impl_->alignment; }

std::vector<std::string> GgufFile::keys() const {
  std::vector<std::string> out;
  out.reserve(impl_->kvs.size());
  for (const Impl::Kv& k : impl_->kvs) out.push_back(k.key);
  return out;
}
bool GgufFile::has(const std::string& key) const { return impl_->kv_index.count(key) != 0; }
GgufType GgufFile::type_of(const std::string& key) const { return impl_->kv(key).type; }

GgufType GgufFile::array_type_of(const std::string& key) const {
  const Impl::Kv& k = impl_->kv(key);
  if (k.type != GgufType::ARRAY) impl_->wrong_type(k, "ARRAY");
  return impl_->array_elem(k);
}
uint64_t GgufFile::array_size(const std::string& key) const {
  const Impl::Kv& k = impl_->kv(key);
  if (k.type != GgufType::ARRAY) impl_->wrong_type(k, "ARRAY");
  return impl_->array_count(k);
}

GgufValue GgufFile::get_value(const std::string& key) const {
  const Impl::Kv& k = impl_->kv(key);
  uint64_t off = k.off;
  return impl_->decode(k.type, off);
}

uint64_t GgufFile::get_uint(const std::string& key) const {
  const Impl::Kv& k = impl_->kv(key);
  if (!is_unsigned(k.type) && !is_signed(k.type)) impl_->wrong_type(k, "an integer");
  return impl_->to_uint(k, scalar_at(k.type, impl_->map + k.off));
}
int64_t GgufFile::get_int(const std::string& key) const {
  const Impl::Kv& k = impl_->kv(key);
  if (!is_unsigned(k.type) && !is_signed(k.type)) impl_->wrong_type(k, "an integer");
  return impl_->to_int(k, scalar_at(k.type, impl_->map + k.off));
}
double GgufFile::get_float(const std::string& key) const {
  const Impl::Kv& k = impl_->kv(key);
  if (!is_float(k.type)) impl_->wrong_type(k, "FLOAT32 or FLOAT64");
  return scalar_at(k.type, impl_->map + k.off).f;
}
bool GgufFile::get_bool(const std::string& key) const {
  const Impl::Kv& k = impl_->kv(key);
  if (k.type != GgufType::BOOL) impl_->wrong_type(k, "BOOL");
  return impl_->map[k.off] != 0;
}
std::string GgufFile::get_string(const std::string& key) const {
  const Impl::Kv& k = impl_->kv(key);
  if (k.type != GgufType::STRING) impl_->wrong_type(k, "STRING");
  uint64_t off = k.off;
  return impl_->decode(k.type, off).s;
}

std::vector<std::string> GgufFile::get_string_array(const std::string& key) const {
  const Impl::Kv& k = impl_->kv(key);
  if (k.type != GgufType::ARRAY || impl_->array_elem(k) != GgufType::STRING) impl_->wrong_type(k, "ARRAY of STRING");
  const uint64_t n = impl_->array_count(k);
  std::vector<std::string> out;
  out.reserve(size_t(n));
  const uint8_t* p = impl_->map + k.off + 12;
  for (uint64_t i = 0; i < n; ++i) {
    const uint64_t len = load_le(p, 8);
    out.emplace_back(reinterpret_cast<const char*>(p + 8), size_t(len));
    p += 8 + len;
  }
  return out;
}

std::vector<double> GgufFile::get_float_array(const std::string& key) const {
  const Impl::Kv& k = impl_->kv(key);
  const GgufType et = k.type == GgufType::ARRAY ? impl_->array_elem(k) : GgufType::ARRAY;
  if (!is_float(et)) impl_->wrong_type(k, "ARRAY of FLOAT32 or FLOAT64");
  const uint64_t n = impl_->array_count(k), es = scalar_size(et);
  std::vector<double> out(static_cast<size_t>(n));
  const uint8_t* p = impl_->map + k.off + 12;
  for (uint64_t i = 0; i < n; ++i) out[i] = scalar_at(et, p + i * es).f;
  return out;
}

std::vector<int64_t> GgufFile::get_int_array(const std::string& key) const {
  const Impl::Kv& k = impl_->kv(key);
  const GgufType et = k.type == GgufType::ARRAY ? impl_->array_elem(k) : GgufType::ARRAY;
  if (!is_signed(et) && !is_unsigned(et)) impl_->wrong_type(k, "ARRAY of an integer type");
  const uint64_t n = impl_->array_count(k), es = scalar_size(et);
  std::vector<int64_t> out(static_cast<size_t>(n));
  const uint8_t* p = impl_->map + k.off + 12;
  for (uint64_t i = 0; i < n; ++i) out[i] = impl_->to_int(k, scalar_at(et, p + i * es));
  return out;
}

uint64_t GgufFile::get_uint_or(const std::string& key, uint64_t def) const { return has(key) ? get_uint(key) : def; }
double GgufFile::get_float_or(const std::string& key, double def) const { return has(key) ? get_float(key) : def; }
bool GgufFile::get_bool_or(const std::string& key, bool def) const { return has(key) ? get_bool(key) : def; }
std::string GgufFile::get_string_or(const std::string& key, const std::string& def) const {
  return has(key) ? get_string(key) : def;
}

const std::vector<GgufTensor>& GgufFile::tensors() const { return impl_->tensors; }
const GgufTensor* GgufFile::find(const std::string& name) const {
  auto it = impl_->tensor_index.find(name);
  return it == impl_->tensor_index.end() ? nullptr : &impl_->tensors[it->second];
}
const GgufTensor& GgufFile::tensor(const std::string& name) const {
  const GgufTensor* t = find(name);
  if (!t) impl_->bad("tensor " + quoted(name) + " not found");
  return *t;
}

std::vector<float> GgufFile::to_f32(const GgufTensor& t) const {
  if (!type_supported(t.type)) dequantize(t.type, t.data, nullptr, 0);  // throws, naming the type
  std::vector<float> out(size_t(t.n_elements));
  const uint64_t be = type_block_elems(t.type), bb = type_block_bytes(t.type);
  // Chunks of whole blocks, dequantized in parallel; exceptions cannot leave an OpenMP region,
  // and none can be thrown here: the type and the block multiple were checked at open.
  const uint64_t chunk_blocks = std::max<uint64_t>(1, (uint64_t(1) << 16) / be);
  const int64_t n_chunks = int64_t((t.n_elements / be + chunk_blocks - 1) / chunk_blocks);
#pragma omp parallel for schedule(static) if (n_chunks > 1)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const uint64_t b0 = uint64_t(c) * chunk_blocks;
    const uint64_t nb = std::min(chunk_blocks, t.n_elements / be - b0);
    dequantize(t.type, t.data + b0 * bb, out.data() + b0 * be, nb * be);
  }
  return out;
}

}  // namespace tqkv::model
