// Internals shared by the tokenizer sources: the vocabulary, the bigram-merge engine both models
// use, and the two models (byte-level BPE in tokenizer_bpe.cpp, SentencePiece-style BPE in
// tokenizer_spm.cpp).
#pragma once
#include <array>
#include <cstdint>
#include <queue>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "model/tokenizer.h"

namespace tqkv::model::detail {

enum TokenType : int32_t { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6 };

struct Vocab {
  std::vector<std::string> text;
  std::vector<int32_t> type;
  std::vector<float> score;
  std::unordered_map<std::string_view, int32_t> ids;  // views into text
  int32_t unk = -1;

  int32_t find(std::string_view s) const {
    auto it = ids.find(s);
    return it == ids.end() ? -1 : it->second;
  }
};

// A unit of a word being merged: bytes [start, start + len) of the word, the token it stands for
// (-1 if none) and its live neighbours. Merging folds the right symbol into the left one.
struct Symbol {
  uint32_t start = 0, len = 0;
  int32_t id = -1;
  int32_t prev = -1, next = -1;
};

// Repeatedly merges the best adjacent pair until no pair merges. pair(a, b, priority, id) says
// whether a and b merge into token id; the lowest priority merges first, ties to the leftmost.
// A heap with lazy invalidation keeps long words O(n log n).
template <typename PairFn>
void merge_symbols(std::vector<Symbol>& syms, PairFn&& pair) {
  struct Cand {
    double priority;
    int32_t left, right;
    uint32_t len;  // combined length when pushed: a merge since then invalidates the candidate
    int32_t id;
    bool operator>(const Cand& o) const { return priority != o.priority ? priority > o.priority : left > o.left; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto consider = [&](int32_t l) {
    if (l < 0) return;
    const int32_t r = syms[l].next;
    if (r < 0) return;
    double priority;
    int32_t id;
    if (pair(syms[l], syms[r], priority, id)) heap.push({priority, l, r, syms[l].len + syms[r].len, id});
  };
  for (size_t i = 0; i + 1 < syms.size(); ++i) consider(static_cast<int32_t>(i));
  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    Symbol& l = syms[c.left];
    Symbol& r = syms[c.right];
    if (l.len == 0 || r.len == 0 || l.next != c.right || l.len + r.len != c.len) continue;
    l.len += r.len;
    l.id = c.id;
    l.next = r.next;
    if (r.next >= 0) syms[r.next].prev = c.left;
    r.len = 0;
    consider(l.prev);
    consider(c.left);
  }
}

// GPT-2 byte-level BPE: tokens are spelled in a printable stand-in alphabet of the 256 bytes.
class BpeModel {
 public:
  BpeModel(const Vocab& vocab, const std::vector<std::string>& merges, const std::string& pre);
  // Appends the tokens of one stretch of text that holds no special token.
  void encode(std::string_view text, std::vector<int32_t>& out) const;
  // Appends the bytes a normal token stands for.
  void append_piece(int32_t id, std::string& out) const;

 private:
  struct MergeTarget {
    int32_t rank, id;
  };
  void encode_word(std::string_view word, std::vector<int32_t>& out) const;

  const Vocab& vocab_;
  bool split_digits_ = false;  // isolate every \p{N} before the GPT-2 regex
  std::array<int32_t, 256> byte_token_{};
  std::array<int32_t, 0x144> char_byte_{};  // stand-in code point -> byte, -1 if none
  std::unordered_map<uint64_t, MergeTarget> merges_;  // (left id << 32 | right id) -> target
};

// SentencePiece-style BPE: spaces become U+2581, UTF-8 characters merge by the score of the
// token they form, characters without a token fall back to <0xXX> byte tokens.
class SpmModel {
 public:
  SpmModel(const Vocab& vocab, bool add_space_prefix);
  // Appends the tokens of one stretch of text that holds no special token, with U+2581 in front
  // if space_prefix.
  void encode(std::string_view text, bool space_prefix, std::vector<int32_t>& out) const;
  void append_piece(int32_t id, std::string& out) const;
  bool add_space_prefix() const { return add_space_prefix_; }

 private:
  const Vocab& vocab_;
  bool add_space_prefix_;
  std::array<int32_t, 256> byte_token_{};
};

}  // namespace tqkv::model::detail
