// GPT-2 byte-level BPE as Hugging Face tokenizers' ByteLevel pre-tokenizer + BPE model define it
// (and llama.cpp's "gpt2" vocabularies follow).
#include <string>

#include "core/error.h"
#include "model/tokenizer_impl.h"
#include "model/unicode.h"

namespace tqkv::model::detail {

namespace {

using unicode::CharClass;

// The stand-in alphabet: printable Latin-1 bytes spell themselves, the other 68 bytes take the
// code points from U+0100 up, in byte order, so every token is printable text.
std::array<uint32_t, 256> byte_to_char() {
  std::array<uint32_t, 256> map{};
  uint32_t extra = 256;
  for (uint32_t b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
    map[b] = printable ? b : extra++;
  }
  return map;
}

struct CodeUnit {
  uint32_t offset;  // byte offset in the text
  uint32_t cp;
  CharClass cls;
};

// The GPT-2 pattern  's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// with the regex engine's leftmost-first choice among alternatives, over units [b, e); the end
// of the range counts as the end of the text for the lookahead. Emits [first, last) unit ranges.
template <typename Emit>
void split_gpt2(const std::vector<CodeUnit>& u, size_t b, size_t e, Emit&& emit) {
  size_t i = b;
  while (i < e) {
    const uint32_t cp = u[i].cp;
    if (cp == '\'' && i + 1 < e) {
      const uint32_t c1 = u[i + 1].cp;
      if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') {
        emit(i, i + 2);
        i += 2;
        continue;
      }
      if (i + 2 < e) {
        const uint32_t c2 = u[i + 2].cp;
        if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) {
          emit(i, i + 3);
          i += 3;
          continue;
        }
      }
    }
    // The optional leading space of the three run alternatives only joins a run that follows it.
    const size_t j = (cp == ' ' && i + 1 < e && u[i + 1].cls != CharClass::Space) ? i + 1 : i;
    const CharClass cls = u[j].cls;
    if (cls != CharClass::Space) {
      size_t k = j + 1;
      while (k < e && u[k].cls == cls) ++k;
      emit(i, k);
      i = k;
      continue;
    }
    size_t k = i + 1;
    while (k < e && u[k].cls == CharClass::Space) ++k;
    // \s+(?!\S) backs off one character to leave it to the next token, unless that would leave
    // nothing; a single space before a non-space then goes to the last alternative, \s+.
    if (k < e && k - i >= 2) --k;
    emit(i, k);
    i = k;
  }
}

}  // namespace

BpeModel::BpeModel(const Vocab& vocab, const std::vector<std::string>& merges, const std::string& pre)
    : vocab_(vocab) {
  if (pre.empty() || pre == "default" || pre == "gpt2" || pre == "gpt-2") {
    split_digits_ = false;
  } else if (pre == "smollm" || pre == "starcoder" || pre == "refact") {
    split_digits_ = true;
  } else {
    fail(TQKV_ERROR_UNSUPPORTED, "tokenizer: pre-tokenizer '" + pre + "' is not supported (gpt2, smollm, starcoder, refact)");
  }
  const auto to_char = byte_to_char();
  char_byte_.fill(-1);
  for (uint32_t b = 0; b < 256; ++b) {
    char_byte_[to_char[b]] = static_cast<int32_t>(b);
    std::string s;
    unicode::append_utf8(s, to_char[b]);
    byte_token_[b] = vocab_.find(s);
  }
  merges_.reserve(merges.size());
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const std::string& m = merges[rank];
    const size_t sp = m.find(' ', 1);
    if (sp == std::string::npos || sp + 1 >= m.size())
      invalid("tokenizer: merge " + std::to_string(rank) + " '" + m + "' is not two tokens separated by a space");
    const std::string_view left(m.data(), sp), right(m.data() + sp + 1, m.size() - sp - 1);
    const int32_t l = vocab_.find(left), r = vocab_.find(right);
    const int32_t t = vocab_.find(std::string(left) + std::string(right));
    if (l < 0 || r < 0 || t < 0)
      invalid("tokenizer: merge " + std::to_string(rank) + " '" + m + "' names a token missing from the vocabulary");
    // An earlier (better) rank for the same pair wins, as in a rank-ordered merge list.
    merges_.try_emplace((uint64_t(uint32_t(l)) << 32) | uint32_t(r), MergeTarget{static_cast<int32_t>(rank), t});
  }
}

void BpeModel::encode(std::string_view text, std::vector<int32_t>& out) const {
  std::vector<CodeUnit> units;
  units.reserve(text.size());
  for (size_t pos = 0; pos < text.size();) {
    uint32_t cp;
    const size_t n = unicode::decode_utf8(text, pos, cp);
    units.push_back({static_cast<uint32_t>(pos), cp, unicode::char_class(cp)});
    pos += n;
  }
  const auto emit = [&](size_t first, size_t last) {
    const size_t begin = units[first].offset;
    const size_t end = last < units.size() ? units[last].offset : text.size();
    encode_word(text.substr(begin, end - begin), out);
  };
  if (!split_digits_) {
    split_gpt2(units, 0, units.size(), emit);
    return;
  }
  size_t run = 0;
  for (size_t i = 0; i < units.size(); ++i) {
    if (units[i].cls != CharClass::Number) continue;
    split_gpt2(units, run, i, emit);
    emit(i, i + 1);
    run = i + 1;
  }
  split_gpt2(units, run, units.size(), emit);
}

void BpeModel::encode_word(std::string_view word, std::vector<int32_t>& out) const {
  std::vector<Symbol> syms;
  syms.reserve(word.size());
  for (size_t i = 0; i < word.size(); ++i) {
    const int32_t id = byte_token_[static_cast<unsigned char>(word[i])];
    // A byte the vocabulary cannot spell is dropped, as Hugging Face's BPE does without an unknown
    // token: GGUF files name one for byte-level vocabularies (SmolLM2: <|endoftext|>), but
    // emitting it mid-text would end generation or derail the model.
    if (id < 0) continue;
    Symbol s;
    s.start = static_cast<uint32_t>(i);
    s.len = 1;
    s.id = id;
    s.prev = static_cast<int32_t>(syms.size()) - 1;
    syms.push_back(s);
  }
  if (syms.empty()) return;
  for (size_t i = 0; i + 1 < syms.size(); ++i) syms[i].next = static_cast<int32_t>(i + 1);
  if (syms.size() > 1) {
    merge_symbols(syms, [this](const Symbol& a, const Symbol& b, double& priority, int32_t& id) {
      auto it = merges_.find((uint64_t(uint32_t(a.id)) << 32) | uint32_t(b.id));
      if (it == merges_.end()) return false;
      priority = it->second.rank;
      id = it->second.id;
      return true;
    });
  }
  for (int32_t i = 0; i >= 0; i = syms[i].next) out.push_back(syms[i].id);
}

void BpeModel::append_piece(int32_t id, std::string& out) const {
  const std::string& t = vocab_.text[id];
  for (size_t pos = 0; pos < t.size();) {
    uint32_t cp;
    const size_t n = unicode::decode_utf8(t, pos, cp);
    // Characters outside the stand-in alphabet only occur in malformed vocabularies; keep them.
    if (cp < char_byte_.size() && char_byte_[cp] >= 0)
      out += static_cast<char>(char_byte_[cp]);
    else
      out.append(t, pos, n);
    pos += n;
  }
}

}  // namespace tqkv::model::detail
