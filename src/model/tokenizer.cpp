// The Tokenizer front: metadata from GGUF, validation, special-token splitting, BOS/EOS, decode.
// The models themselves live in tokenizer_bpe.cpp and tokenizer_spm.cpp.
#include "model/tokenizer.h"

#include <array>
#include <limits>
#include <optional>
#include <unordered_set>

#include "core/error.h"
#include "model/gguf.h"
#include "model/tokenizer_impl.h"

namespace tqkv::model {

using detail::kControl;
using detail::kNormal;
using detail::kUserDefined;

namespace {

// Tokens that end a turn in common chat formats, for files that do not name them by id.
constexpr std::array<std::string_view, 10> kEogTexts = {
    "<|endoftext|>", "<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|eom_id|>",
    "<|end|>",       "<EOT>",      "<|end_of_text|>", "<end_of_utterance>", "<|return|>"};

// Byte trie over the control and user-defined tokens, for leftmost-longest matching in the text.
class SpecialMatcher {
 public:
  void add(std::string_view text, int32_t id) {
    uint32_t node = 0;
    for (char c : text) {
      const uint64_t key = (uint64_t(node) << 8) | static_cast<unsigned char>(c);
      auto [it, inserted] = edges_.try_emplace(key, static_cast<uint32_t>(token_.size()));
      if (inserted) token_.push_back(-1);
      node = it->second;
    }
    token_[node] = id;
    first_[static_cast<unsigned char>(text[0])] = true;
  }
  bool may_start(char c) const { return first_[static_cast<unsigned char>(c)]; }
  // The longest token spelled at text[pos...]: {id, length}, or id -1.
  std::pair<int32_t, size_t> match(std::string_view text, size_t pos) const {
    std::pair<int32_t, size_t> best{-1, 0};
    uint32_t node = 0;
    for (size_t i = pos; i < text.size(); ++i) {
      auto it = edges_.find((uint64_t(node) << 8) | static_cast<unsigned char>(text[i]));
      if (it == edges_.end()) break;
      node = it->second;
      if (token_[node] >= 0) best = {token_[node], i + 1 - pos};
    }
    return best;
  }

 private:
  std::unordered_map<uint64_t, uint32_t> edges_;  // (node << 8 | byte) -> node
  std::vector<int32_t> token_{-1};                // node -> token ending there, -1 if none
  std::array<bool, 256> first_{};
};

int32_t token_id_or_none(const GgufFile& f, const std::string& key, size_t n_tokens) {
  if (!f.has(key)) return -1;
  const int64_t v = f.get_int(key);
  // As llama.cpp does, an id outside the vocabulary (some files write 0xFFFFFFFF for "none")
  // counts as absent rather than making the file unusable.
  return v >= 0 && static_cast<uint64_t>(v) < n_tokens ? static_cast<int32_t>(v) : -1;
}

}  // namespace

TokenizerData tokenizer_data_from_gguf(const GgufFile& f) {
  TokenizerData d;
  d.model = f.get_string("tokenizer.ggml.model");
  d.pre = f.get_string_or("tokenizer.ggml.pre", "");
  d.tokens = f.get_string_array("tokenizer.ggml.tokens");
  if (f.has("tokenizer.ggml.scores")) {
    const auto s = f.get_float_array("tokenizer.ggml.scores");
    d.scores.assign(s.begin(), s.end());
  }
  if (f.has("tokenizer.ggml.token_type")) {
    const auto t = f.get_int_array("tokenizer.ggml.token_type");
    d.token_types.reserve(t.size());
    for (int64_t v : t) {
      if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max())
        fail(TQKV_ERROR_IO, "tokenizer.ggml.token_type: value " + std::to_string(v) + " out of range");
      d.token_types.push_back(static_cast<int32_t>(v));
    }
  }
  if (f.has("tokenizer.ggml.merges")) d.merges = f.get_string_array("tokenizer.ggml.merges");
  const size_t n = d.tokens.size();
  d.bos = token_id_or_none(f, "tokenizer.ggml.bos_token_id", n);
  d.eos = token_id_or_none(f, "tokenizer.ggml.eos_token_id", n);
  d.unk = token_id_or_none(f, "tokenizer.ggml.unknown_token_id", n);
  d.pad = token_id_or_none(f, "tokenizer.ggml.padding_token_id", n);
  d.eot = token_id_or_none(f, "tokenizer.ggml.eot_token_id", n);
  d.eom = token_id_or_none(f, "tokenizer.ggml.eom_token_id", n);
  // Defaults as llama.cpp has them: SentencePiece vocabularies add BOS and a leading space
  // unless the file says otherwise.
  const bool spm = d.model == "llama";
  d.add_bos = f.get_bool_or("tokenizer.ggml.add_bos_token", spm);
  d.add_eos = f.get_bool_or("tokenizer.ggml.add_eos_token", false);
  d.add_space_prefix = f.get_bool_or("tokenizer.ggml.add_space_prefix", spm);
  if (d.add_bos && d.bos < 0) d.add_bos = false;
  if (d.add_eos && d.eos < 0) d.add_eos = false;
  return d;
}

struct Tokenizer::Impl {
  TokenizerData data;
  detail::Vocab vocab;
  std::optional<detail::BpeModel> bpe;
  std::optional<detail::SpmModel> spm;
  SpecialMatcher specials;
  std::unordered_set<int32_t> eog;

  // Every stretch of plain text starts the text or follows a special token, and llama.cpp gives
  // each one the leading space.
  void encode_fragment(std::string_view text, std::vector<int32_t>& out) const {
    if (bpe)
      bpe->encode(text, out);
    else
      spm->encode(text, spm->add_space_prefix(), out);
  }
  void check_id(int32_t id) const {
    if (id < 0 || static_cast<size_t>(id) >= vocab.text.size())
      invalid("tokenizer: token id " + std::to_string(id) + " outside the vocabulary of " + std::to_string(vocab.text.size()));
  }
  void append_piece(int32_t id, std::string& out) const {
    const int32_t type = vocab.type[id];
    // Control and user-defined tokens are stored as plain text in both kinds of vocabulary.
    if (type == kControl || type == kUserDefined)
      out += vocab.text[id];
    else if (bpe)
      bpe->append_piece(id, out);
    else
      spm->append_piece(id, out);
  }
};

Tokenizer::Tokenizer(TokenizerData data) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.data = std::move(data);
  TokenizerData& d = m.data;
  if (d.model != "gpt2" && d.model != "llama")
    fail(TQKV_ERROR_UNSUPPORTED, "tokenizer: model '" + d.model + "' is not supported (gpt2, llama)");
  const size_t n = d.tokens.size();
  if (n == 0 || n > size_t(std::numeric_limits<int32_t>::max())) invalid("tokenizer: vocabulary of " + std::to_string(n) + " tokens");
  if (!d.scores.empty() && d.scores.size() != n)
    invalid("tokenizer: " + std::to_string(d.scores.size()) + " scores for " + std::to_string(n) + " tokens");
  if (!d.token_types.empty() && d.token_types.size() != n)
    invalid("tokenizer: " + std::to_string(d.token_types.size()) + " token types for " + std::to_string(n) + " tokens");
  for (auto [name, id] : {std::pair{"bos", d.bos}, {"eos", d.eos}, {"unk", d.unk}, {"pad", d.pad}, {"eot", d.eot}, {"eom", d.eom}}) {
    if (id < -1 || id >= static_cast<int64_t>(n))
      invalid(std::string("tokenizer: ") + name + " id " + std::to_string(id) + " outside the vocabulary of " + std::to_string(n));
  }
  if (d.add_bos && d.bos < 0) invalid("tokenizer: add_bos without a bos token");
  if (d.add_eos && d.eos < 0) invalid("tokenizer: add_eos without an eos token");

  detail::Vocab& v = m.vocab;
  // The vocabulary takes the big arrays over; data keeps only the scalars.
  v.text = std::move(d.tokens);
  if (d.token_types.empty()) {
    // Without types, the ids the metadata names are still special: decode must not print them.
    v.type.assign(n, kNormal);
    for (int32_t id : {d.bos, d.eos, d.unk, d.pad, d.eot, d.eom})
      if (id >= 0) v.type[id] = kControl;
  } else {
    v.type = std::move(d.token_types);
  }
  v.score = d.scores.empty() ? std::vector<float>(n, 0.0f) : std::move(d.scores);
  v.unk = d.unk;
  v.ids.reserve(n);
  // A duplicated spelling resolves to its last id, as in llama.cpp's and Hugging Face's maps.
  for (size_t i = 0; i < n; ++i) v.ids[v.text[i]] = static_cast<int32_t>(i);

  if (d.model == "gpt2")
    m.bpe.emplace(v, d.merges, d.pre);
  else
    m.spm.emplace(v, d.add_space_prefix);
  d.merges = {};

  for (size_t i = 0; i < n; ++i) {
    const int32_t type = v.type[i];
    if ((type == kControl || type == kUserDefined) && !v.text[i].empty()) m.specials.add(v.text[i], static_cast<int32_t>(i));
  }
  for (int32_t id : {d.eos, d.eot, d.eom})
    if (id >= 0) m.eog.insert(id);
  for (std::string_view t : kEogTexts) {
    const int32_t id = v.find(t);
    if (id >= 0 && v.type[id] == kControl) m.eog.insert(id);
  }
}

Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special) const {
  const Impl& m = *impl_;
  // Offsets inside the models are 32-bit, and SentencePiece normalization can triple the size.
  if (text.size() > (size_t(1) << 30)) invalid("tokenizer: text of " + std::to_string(text.size()) + " bytes (at most 1 GiB)");
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  if (add_special && m.data.add_bos) out.push_back(m.data.bos);
  size_t start = 0;
  for (size_t pos = 0; pos < text.size();) {
    if (!m.specials.may_start(text[pos])) {
      ++pos;
      continue;
    }
    const auto [id, len] = m.specials.match(text, pos);
    if (id < 0) {
      ++pos;
      continue;
    }
    if (pos > start) m.encode_fragment(text.substr(start, pos - start), out);
    out.push_back(id);
    pos += len;
    start = pos;
  }
  if (start < text.size()) m.encode_fragment(text.substr(start), out);
  if (add_special && m.data.add_eos) out.push_back(m.data.eos);
  return out;
}

std::string Tokenizer::decode(std::span<const int32_t> ids) const {
  const Impl& m = *impl_;
  std::string out;
  bool first = true;
  for (int32_t id : ids) {
    m.check_id(id);
    if (m.vocab.type[id] == kControl) continue;
    const size_t at = out.size();
    m.append_piece(id, out);
    // Undo the space encode put in front of the text.
    if (first && m.spm && m.spm->add_space_prefix() && out.size() > at && out[at] == ' ') out.erase(at, 1);
    first = false;
  }
  return out;
}

std::string Tokenizer::token_piece(int32_t id) const {
  impl_->check_id(id);
  std::string out;
  impl_->append_piece(id, out);
  return out;
}

size_t Tokenizer::vocab_size() const { return impl_->vocab.text.size(); }
int32_t Tokenizer::bos() const { return impl_->data.bos; }
int32_t Tokenizer::eos() const { return impl_->data.eos; }
bool Tokenizer::is_eog(int32_t id) const { return impl_->eog.count(id) != 0; }

}  // namespace tqkv::model
