// SentencePiece-style BPE as llama.cpp runs "llama" vocabularies (Gemma, Llama 2): no
// pre-splitting, merges chosen by the score of the token they form.
#include <cstdio>
#include <string>

#include "model/tokenizer_impl.h"
#include "model/unicode.h"

namespace tqkv::model::detail {

namespace {
constexpr std::string_view kSpace = "\xE2\x96\x81";  // U+2581, SentencePiece's visible space
}

SpmModel::SpmModel(const Vocab& vocab, bool add_space_prefix) : vocab_(vocab), add_space_prefix_(add_space_prefix) {
  byte_token_.fill(-1);
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    byte_token_[b] = vocab_.find(name);
  }
}

void SpmModel::encode(std::string_view text, bool space_prefix, std::vector<int32_t>& out) const {
  std::string s;
  s.reserve(text.size() + 8);
  if (space_prefix) s += kSpace;
  for (char c : text) {
    if (c == ' ')
      s += kSpace;
    else
      s += c;
  }
  if (s.empty()) return;

  std::vector<Symbol> syms;
  syms.reserve(s.size());
  for (size_t pos = 0; pos < s.size();) {
    uint32_t cp;
    const size_t n = unicode::decode_utf8(s, pos, cp);
    Symbol sym;
    sym.start = static_cast<uint32_t>(pos);
    sym.len = static_cast<uint32_t>(n);
    sym.id = vocab_.find(std::string_view(s).substr(pos, n));
    sym.prev = static_cast<int32_t>(syms.size()) - 1;
    syms.push_back(sym);
    pos += n;
  }
  for (size_t i = 0; i + 1 < syms.size(); ++i) syms[i].next = static_cast<int32_t>(i + 1);
  if (syms.size() > 1) {
    const std::string_view sv(s);
    merge_symbols(syms, [&](const Symbol& a, const Symbol& b, double& priority, int32_t& id) {
      id = vocab_.find(sv.substr(a.start, a.len + b.len));
      if (id < 0) return false;
      priority = -double(vocab_.score[id]);
      return true;
    });
  }
  // Only single characters can lack a token (merges always form one); they are spelled in bytes.
  for (int32_t i = 0; i >= 0; i = syms[i].next) {
    const Symbol& sym = syms[i];
    if (sym.id >= 0) {
      out.push_back(sym.id);
      continue;
    }
    for (uint32_t k = 0; k < sym.len; ++k) {
      const int32_t b = byte_token_[static_cast<unsigned char>(s[sym.start + k])];
      if (b >= 0)
        out.push_back(b);
      else if (vocab_.unk >= 0)
        out.push_back(vocab_.unk);
    }
  }
}

void SpmModel::append_piece(int32_t id, std::string& out) const {
  const std::string& t = vocab_.text[id];
  unsigned v = 0;
  if (t.size() == 6 && std::sscanf(t.c_str(), "<0x%2X>", &v) == 1 && byte_token_[v] == id) {
    out += static_cast<char>(v);
    return;
  }
  for (size_t pos = 0; pos < t.size();) {
    if (t.compare(pos, kSpace.size(), kSpace) == 0) {
      out += ' ';
      pos += kSpace.size();
    } else {
      out += t[pos++];
    }
  }
}

}  // namespace tqkv::model::detail
