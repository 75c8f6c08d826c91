// Tokenizers: hand-made vocabularies pin down the algorithms (always run); the real SmolLM2 and
// Gemma 3 vocabularies are checked against ids from an independent implementation
// (tests/data/tokenizer/*.json, written by scripts/gen_tokenizer_golden.py) when the model files
// are in the cache.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "model/gguf.h"
#include "model/tokenizer.h"

namespace tqkv::model {
namespace {

namespace fs = std::filesystem;
using Ids = std::vector<int32_t>;

// ---- A JSON reader just big enough for the golden files ------------------------------------

struct Json {
  enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
  double num = 0;
  bool b = false;
  std::string str;
  std::vector<Json> items;
  std::map<std::string, Json> fields;
  const Json& operator[](const std::string& k) const { return fields.at(k); }
};

class JsonParser {
 public:
  explicit JsonParser(std::string text) : s_(std::move(text)) {}
  Json parse() {
    Json v = value();
    ws();
    if (p_ != s_.size()) bad("trailing characters");
    return v;
  }

 private:
  [[noreturn]] void bad(const std::string& what) { throw std::runtime_error("golden JSON: " + what + " at byte " + std::to_string(p_)); }
  void ws() {
    while (p_ < s_.size() && (s_[p_] == ' ' || s_[p_] == '\n' || s_[p_] == '\r' || s_[p_] == '\t')) ++p_;
  }
  bool eat(char c) {
    ws();
    if (p_ < s_.size() && s_[p_] == c) return ++p_, true;
    return false;
  }
  void expect(char c) {
    if (!eat(c)) bad(std::string("expected '") + c + "'");
  }
  uint32_t hex4() {
    if (s_.size() - p_ < 4) bad("short \\u escape");
    const uint32_t v = static_cast<uint32_t>(std::stoul(s_.substr(p_, 4), nullptr, 16));
    p_ += 4;
    return v;
  }
  static void put_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += char(cp);
    } else if (cp < 0x800) {
      out += char(0xC0 | (cp >> 6)), out += char(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += char(0xE0 | (cp >> 12)), out += char(0x80 | ((cp >> 6) & 0x3F)), out += char(0x80 | (cp & 0x3F));
    } else {
      out += char(0xF0 | (cp >> 18)), out += char(0x80 | ((cp >> 12) & 0x3F));
      out += char(0x80 | ((cp >> 6) & 0x3F)), out += char(0x80 | (cp & 0x3F));
    }
  }
  std::string string() {
    expect('"');
    std::string out;
    while (true) {
      if (p_ >= s_.size()) bad("unterminated string");
      const char c = s_[p_++];
      if (c == '"') return out;
      if (c != '\\') {
        out += c;
        continue;
      }
      const char e = s_[p_++];
      switch (e) {
        case 'n': out += '\n'; break;
        case 't': out += '\t'; break;
        case 'r': out += '\r'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && s_.compare(p_, 2, "\\u") == 0) {
            p_ += 2;
            cp = 0x10000 + ((cp - 0xD800) << 10) + (hex4() - 0xDC00);
          }
          put_utf8(out, cp);
          break;
        }
        default: out += e;
      }
    }
  }
  Json value() {
    ws();
    Json v;
    if (p_ >= s_.size()) bad("unexpected end");
    const char c = s_[p_];
    if (c == '{') {
      v.kind = Json::Object;
      ++p_;
      if (eat('}')) return v;
      do {
        ws();
        std::string k = string();
        expect(':');
        v.fields[k] = value();
      } while (eat(','));
      expect('}');
    } else if (c == '[') {
      v.kind = Json::Array;
      ++p_;
      if (eat(']')) return v;
      do v.items.push_back(value());
      while (eat(','));
      expect(']');
    } else if (c == '"') {
      v.kind = Json::String;
      v.str = string();
    } else if (s_.compare(p_, 4, "true") == 0 || s_.compare(p_, 5, "false") == 0) {
      v.kind = Json::Bool;
      v.b = s_[p_] == 't';
      p_ += v.b ? 4 : 5;
    } else if (s_.compare(p_, 4, "null") == 0) {
      p_ += 4;
    } else {
      v.kind = Json::Number;
      size_t used = 0;
      v.num = std::stod(s_.substr(p_, 32), &used);
      p_ += used;
    }
    return v;
  }
  std::string s_;
  size_t p_ = 0;
};

std::string read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  if (!f) return {};
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// ---- Tiny hand-made vocabularies ---------------------------------------------------------

std::string utf8(uint32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s += char(cp);
  } else if (cp < 0x800) {
    s += char(0xC0 | (cp >> 6)), s += char(0x80 | (cp & 0x3F));
  } else {
    s += char(0xE0 | (cp >> 12)), s += char(0x80 | ((cp >> 6) & 0x3F)), s += char(0x80 | (cp & 0x3F));
  }
  return s;
}

// GPT-2's spelling of a byte: printable Latin-1 spells itself, the rest count up from U+0100.
std::string byte_char(int b) {
  int extra = 0;
  for (int x = 0; x < b; ++x)
    if (!((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || x >= 174)) ++extra;
  const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
  return utf8(printable ? uint32_t(b) : uint32_t(256 + extra));
}

// A byte-level vocabulary: the 256 bytes, then `extra` tokens (in byte-level spelling), then
// the control token "<|end|>" and the user-defined token "<x>".
struct TinyBpe {
  TokenizerData d;
  std::map<std::string, int32_t> id;
  TinyBpe(const std::vector<std::string>& extra, const std::vector<std::string>& merges, std::string pre = "gpt2") {
    d.model = "gpt2";
    d.pre = std::move(pre);
    for (int b = 0; b < 256; ++b) add(byte_char(b), 1);
    for (const auto& t : extra) add(t, 1);
    d.eos = add("<|end|>", 3);
    add("<x>", 4);
    d.merges = merges;
  }
  int32_t add(const std::string& t, int32_t type) {
    id[t] = int32_t(d.tokens.size());
    d.tokens.push_back(t);
    d.token_types.push_back(type);
    return id[t];
  }
};

const std::string kG = byte_char(' ');  // "Ġ"

TEST(TokenizerBpe, MergesApplyInRankOrder) {
  {
    TinyBpe v({"ab", "bc", "abc"}, {"a b", "b c", "ab c"});
    Tokenizer t(v.d);
    EXPECT_EQ(t.encode("abc", false), Ids{v.id["abc"]});
    EXPECT_EQ(t.encode("abcbc", false), (Ids{v.id["abc"], v.id["bc"]}));
  }
  {
    // "b c" outranks "a b" now, so "abc" is reached through "a bc", or not at all.
    TinyBpe v({"ab", "bc", "abc"}, {"b c", "a b"});
    Tokenizer t(v.d);
    EXPECT_EQ(t.encode("abc", false), (Ids{v.id["a"], v.id["bc"]}));
  }
  {
    // Equal pairs merge leftmost first.
    TinyBpe v({"aa"}, {"a a"});
    Tokenizer t(v.d);
    EXPECT_EQ(t.encode("aaa", false), (Ids{v.id["aa"], v.id["a"]}));
  }
}

TEST(TokenizerBpe, PreTokenizerBoundsMerges) {
  TinyBpe v({kG + kG, kG + "b", "'s", "12"}, {kG + " " + kG, kG + " b", "' s", "1 2"});
  Tokenizer t(v.d);
  const int32_t sp = v.id[kG], sp2 = v.id[kG + kG], a = v.id["a"], gb = v.id[kG + "b"];
  // \s+(?!\S) leaves the last space to the word after it, so "ĠĠ" cannot form before "b".
  EXPECT_EQ(t.encode("a  b", false), (Ids{a, sp, gb}));
  EXPECT_EQ(t.encode("a   b", false), (Ids{a, sp2, gb}));
  EXPECT_EQ(t.encode("a  ", false), (Ids{a, sp2}));
  EXPECT_EQ(t.encode("it's", false), (Ids{v.id["i"], v.id["t"], v.id["'s"]}));
  EXPECT_EQ(t.encode("12", false), Ids{v.id["12"]});
  EXPECT_EQ(t.encode("a12", false), (Ids{a, v.id["12"]}));  // letters and digits never share a word

  // "smollm" isolates every digit first.
  TinyBpe s({kG + kG, "12"}, {kG + " " + kG, "1 2"}, "smollm");
  Tokenizer ts(s.d);
  EXPECT_EQ(ts.encode("12", false), (Ids{s.id["1"], s.id["2"]}));
  EXPECT_EQ(ts.encode("a  1", false), (Ids{s.id["a"], s.id[kG + kG], s.id["1"]}));
}

TEST(TokenizerBpe, SpecialTokensSplitTheText) {
  TinyBpe v({"ab"}, {"a b"});
  Tokenizer t(v.d);
  const int32_t end = v.id["<|end|>"], x = v.id["<x>"], ab = v.id["ab"];
  EXPECT_EQ(t.encode("ab<|end|>ab<x>", false), (Ids{ab, end, ab, x}));
  // Merges never cross a special token.
  EXPECT_EQ(t.encode("a<x>b", false), (Ids{v.id["a"], x, v.id["b"]}));
  // An unfinished special token is plain text.
  EXPECT_EQ(t.decode(t.encode("<|end", false)), "<|end");
  // decode skips control tokens, keeps user-defined ones; token_piece shows both.
  EXPECT_EQ(t.decode(t.encode("ab<|end|>ab<x>", false)), "abab<x>");
  EXPECT_EQ(t.token_piece(end), "<|end|>");
  EXPECT_EQ(t.token_piece(v.id[kG]), " ");
  EXPECT_TRUE(t.is_eog(end));
  EXPECT_FALSE(t.is_eog(x));
}

TEST(TokenizerBpe, AnyBytesRoundTrip) {
  TinyBpe v({"ab"}, {"a b"});
  Tokenizer t(v.d);
  // Invalid UTF-8 (stray continuation, truncated and overlong sequences, 0xFF) is kept byte by byte.
  const std::string inputs[] = {std::string("\xff\xfe ab \xc3", 7), "a\x80\x80" "b", "\xe2\x96", "\xc0\xaf x",
                                std::string("\0a\0", 3), "\xed\xa0\x80 surrogate"};
  for (const std::string& s : inputs) EXPECT_EQ(t.decode(t.encode(s, false)), s);
  EXPECT_TRUE(t.encode("", false).empty());

  // A byte the vocabulary has no token for is dropped (never replaced by a control token).
  TinyBpe gap({}, {});
  gap.d.tokens[0xFF] = "unused";
  Tokenizer tg(gap.d);
  EXPECT_EQ(tg.encode("a\xff" "b", false), (Ids{gap.id["a"], gap.id["b"]}));
}

// ---- SentencePiece-style -------------------------------------------------------------------

const std::string kSp = "\xE2\x96\x81";  // "▁"

struct TinySpm {
  TokenizerData d;
  std::map<std::string, int32_t> id;
  explicit TinySpm(const std::vector<std::pair<std::string, float>>& pieces, bool bytes = true) {
    d.model = "llama";
    d.unk = add("<unk>", 0, 2);
    d.bos = add("<s>", 0, 3);
    d.eos = add("</s>", 0, 3);
    add("<start_of_turn>", 0, 3);
    add("<end_of_turn>", 0, 3);
    add("\n", 0, 4);
    add("  ", 0, 4);
    if (bytes)
      for (int b = 0; b < 256; ++b) {
        char name[8];
        std::snprintf(name, sizeof name, "<0x%02X>", b);
        add(name, 0, 6);
      }
    for (const auto& [t, s] : pieces) add(t, s, 1);
  }
  int32_t add(const std::string& t, float score, int32_t type) {
    id[t] = int32_t(d.tokens.size());
    d.tokens.push_back(t);
    d.scores.push_back(score);
    d.token_types.push_back(type);
    return id[t];
  }
};

TEST(TokenizerSpm, MergesFollowScores) {
  {
    TinySpm v({{"a", -1}, {"b", -1}, {"c", -1}, {"ab", -2}, {"bc", -3}, {"abc", -4}});
    Tokenizer t(v.d);
    EXPECT_EQ(t.encode("abc", false), Ids{v.id["abc"]});
  }
  {
    // "bc" scores higher, so "ab" never forms and "abc" (reachable only from "ab") neither.
    TinySpm v({{"a", -1}, {"b", -1}, {"c", -1}, {"ab", -3}, {"bc", -2}});
    Tokenizer t(v.d);
    EXPECT_EQ(t.encode("abc", false), (Ids{v.id["a"], v.id["bc"]}));
  }
  {
    // Equal scores: leftmost first.
    TinySpm v({{"a", -1}, {"aa", -2}});
    Tokenizer t(v.d);
    EXPECT_EQ(t.encode("aaa", false), (Ids{v.id["aa"], v.id["a"]}));
  }
}

TEST(TokenizerSpm, SpacesAndPrefix) {
  TinySpm v({{"a", -1}, {"b", -1}, {kSp, -1}, {kSp + "a", -2}, {kSp + "b", -3}});
  Tokenizer plain(v.d);
  EXPECT_EQ(plain.encode("a b", false), (Ids{v.id["a"], v.id[kSp + "b"]}));
  EXPECT_EQ(plain.decode(plain.encode("a b", false)), "a b");
  // "  " is a user-defined token, matched in the raw text before any merging.
  EXPECT_EQ(plain.encode("a  b", false), (Ids{v.id["a"], v.id["  "], v.id["b"]}));
  EXPECT_EQ(plain.decode(plain.encode(" a  b ", false)), " a  b ");

  v.d.add_space_prefix = true;
  v.d.add_bos = true;
  Tokenizer prefixed(v.d);
  EXPECT_EQ(prefixed.encode("a b", true), (Ids{v.id["<s>"], v.id[kSp + "a"], v.id[kSp + "b"]}));
  EXPECT_EQ(prefixed.decode(prefixed.encode("a b", true)), "a b");
  EXPECT_EQ(prefixed.decode(prefixed.encode(" a", true)), " a");
  EXPECT_EQ(prefixed.encode("", true), Ids{v.id["<s>"]});
  EXPECT_TRUE(prefixed.encode("", false).empty());
}

TEST(TokenizerSpm, ByteFallback) {
  TinySpm v({{"a", -1}});
  Tokenizer t(v.d);
  // "é" has no token: its UTF-8 bytes are spelled with <0xC3> <0xA9>.
  EXPECT_EQ(t.encode("a\xC3\xA9", false), (Ids{v.id["a"], v.id["<0xC3>"], v.id["<0xA9>"]}));
  const std::string inputs[] = {"a\xC3\xA9", "\xff", "\xe2\x96", std::string("a\0b", 3), "\xf0\x9f\x98\x80!"};
  for (const std::string& s : inputs) EXPECT_EQ(t.decode(t.encode(s, false)), s);
  EXPECT_EQ(t.token_piece(v.id["<0x41>"]), "A");

  // Without byte tokens the unknown token stands in.
  TinySpm nb({{"a", -1}}, false);
  Tokenizer tn(nb.d);
  EXPECT_EQ(tn.encode("a\xC3\xA9", false), (Ids{nb.id["a"], nb.d.unk, nb.d.unk}));
}

TEST(TokenizerSpm, SpecialTokens) {
  TinySpm v({{"a", -1}, {"u", -1}, {"s", -1}, {"e", -1}, {"r", -1}});
  v.d.add_bos = true;
  Tokenizer t(v.d);
  const Ids ids = t.encode("<start_of_turn>user\na<end_of_turn>", true);
  ASSERT_GE(ids.size(), 4u);
  EXPECT_EQ(ids.front(), v.d.bos);
  EXPECT_EQ(ids[1], v.id["<start_of_turn>"]);
  EXPECT_EQ(ids.back(), v.id["<end_of_turn>"]);
  EXPECT_EQ(t.decode(ids), "user\na");
  EXPECT_TRUE(t.is_eog(v.d.eos));
  EXPECT_TRUE(t.is_eog(v.id["<end_of_turn>"]));
  EXPECT_FALSE(t.is_eog(v.id["<start_of_turn>"]));
  EXPECT_FALSE(t.is_eog(v.d.bos));
}

TEST(Tokenizer, RejectsBadData) {
  auto code = [](TokenizerData d) {
    try {
      Tokenizer t(std::move(d));
    } catch (const Error& e) {
      return e.status();
    }
    return TQKV_OK;
  };
  TinySpm v({{"a", -1}});
  TokenizerData d = v.d;
  d.model = "bert";
  EXPECT_EQ(code(d), TQKV_ERROR_UNSUPPORTED);
  d = v.d;
  d.scores.pop_back();
  EXPECT_EQ(code(d), TQKV_ERROR_INVALID_ARGUMENT);
  d = v.d;
  d.eos = int32_t(d.tokens.size());
  EXPECT_EQ(code(d), TQKV_ERROR_INVALID_ARGUMENT);
  d = v.d;
  d.tokens.clear(), d.scores.clear(), d.token_types.clear();
  EXPECT_EQ(code(d), TQKV_ERROR_INVALID_ARGUMENT);
  TinyBpe b({}, {});
  b.d.merges = {"a zz"};
  EXPECT_EQ(code(b.d), TQKV_ERROR_INVALID_ARGUMENT);
  b.d.merges = {"ab"};
  EXPECT_EQ(code(b.d), TQKV_ERROR_INVALID_ARGUMENT);
  b.d.merges = {};
  b.d.pre = "no-such-pre";
  EXPECT_EQ(code(b.d), TQKV_ERROR_UNSUPPORTED);

  Tokenizer t(v.d);
  const Ids bad = {0, -1};
  EXPECT_THROW(t.decode(bad), Error);
  EXPECT_THROW(t.token_piece(int32_t(v.d.tokens.size())), Error);
}

// ---- tokenizer_data_from_gguf on small written files -------------------------------------

// Just enough of a GGUF v3 writer for metadata-only files.
class GgufWriter {
 public:
  void str(const std::string& key, const std::string& v) { head(key, 8), text(v); }
  void u32(const std::string& key, uint32_t v) { head(key, 4), raw(&v, 4); }
  void boolean(const std::string& key, bool v) {
    head(key, 7);
    const uint8_t b = v;
    raw(&b, 1);
  }
  void str_array(const std::string& key, const std::vector<std::string>& v) {
    head(key, 9), type(8), count(v.size());
    for (const auto& x : v) text(x);
  }
  void i32_array(const std::string& key, const std::vector<int32_t>& v) {
    head(key, 9), type(5), count(v.size());
    for (int32_t x : v) raw(&x, 4);
  }
  std::string write(const std::string& name) const {
    std::string out = "GGUF";
    const uint32_t version = 3;
    const uint64_t tensors = 0;
    out.append(reinterpret_cast<const char*>(&version), 4);
    out.append(reinterpret_cast<const char*>(&tensors), 8);
    out.append(reinterpret_cast<const char*>(&n_), 8);
    out += body_;
    out.resize((out.size() + 31) / 32 * 32, '\0');
    const std::string path = ::testing::TempDir() + name;
    std::ofstream(path, std::ios::binary) << out;
    return path;
  }

 private:
  void raw(const void* p, size_t n) { body_.append(static_cast<const char*>(p), n); }
  void type(uint32_t t) { raw(&t, 4); }
  void count(uint64_t n) { raw(&n, 8); }
  void text(const std::string& v) { count(v.size()), body_ += v; }
  void head(const std::string& key, uint32_t t) { ++n_, text(key), type(t); }
  std::string body_;
  uint64_t n_ = 0;
};

TEST(TokenizerGguf, MissingOptionalKeysTakeDefaults) {
  const std::vector<std::string> tokens = {"<unk>", "<s>", "</s>", "a", kSp + "a"};
  {
    GgufWriter w;
    w.str("tokenizer.ggml.model", "llama");
    w.str_array("tokenizer.ggml.tokens", tokens);
    w.u32("tokenizer.ggml.bos_token_id", 1);
    w.u32("tokenizer.ggml.eos_token_id", 99);  // outside the vocabulary: treated as absent
    const GgufFile f = GgufFile::open(w.write("tok_llama.gguf"));
    const TokenizerData d = tokenizer_data_from_gguf(f);
    EXPECT_EQ(d.model, "llama");
    EXPECT_EQ(d.pre, "");
    EXPECT_EQ(d.tokens, tokens);
    EXPECT_TRUE(d.scores.empty());
    EXPECT_TRUE(d.token_types.empty());
    EXPECT_TRUE(d.merges.empty());
    EXPECT_EQ(d.bos, 1);
    EXPECT_EQ(d.eos, -1);
    EXPECT_EQ(d.unk, -1);
    EXPECT_EQ(d.eot, -1);
    // SentencePiece vocabularies add BOS and a leading space unless the file says otherwise.
    EXPECT_TRUE(d.add_bos);
    EXPECT_TRUE(d.add_space_prefix);
    EXPECT_FALSE(d.add_eos);
    Tokenizer t(d);
    EXPECT_EQ(t.encode("a", true), (Ids{1, 4}));
    EXPECT_EQ(t.decode(t.encode("a", true)), "a");
  }
  {
    GgufWriter w;
    w.str("tokenizer.ggml.model", "gpt2");
    w.str("tokenizer.ggml.pre", "smollm");
    w.str_array("tokenizer.ggml.tokens", {"a", "b", "ab"});
    w.i32_array("tokenizer.ggml.token_type", {1, 1, 1});
    w.str_array("tokenizer.ggml.merges", {"a b"});
    w.boolean("tokenizer.ggml.add_space_prefix", true);
    const GgufFile f = GgufFile::open(w.write("tok_gpt2.gguf"));
    const TokenizerData d = tokenizer_data_from_gguf(f);
    EXPECT_EQ(d.pre, "smollm");
    EXPECT_EQ(d.token_types, (std::vector<int32_t>{1, 1, 1}));
    EXPECT_EQ(d.merges, std::vector<std::string>{"a b"});
    EXPECT_FALSE(d.add_bos);
    EXPECT_TRUE(d.add_space_prefix);
    EXPECT_EQ(Tokenizer(d).encode("ab", true), Ids{2});
  }
}

TEST(TokenizerGguf, WrongTypesThrow) {
  auto status_of = [](const std::string& path) {
    try {
      const GgufFile f = GgufFile::open(path);
      tokenizer_data_from_gguf(f);
    } catch (const Error& e) {
      return e.status();
    }
    return TQKV_OK;
  };
  GgufWriter w;
  w.str("tokenizer.ggml.model", "llama");
  w.i32_array("tokenizer.ggml.tokens", {1, 2, 3});
  EXPECT_EQ(status_of(w.write("tok_bad_tokens.gguf")), TQKV_ERROR_IO);
  GgufWriter w2;
  w2.str("tokenizer.ggml.model", "llama");
  w2.str_array("tokenizer.ggml.tokens", {"a"});
  w2.str("tokenizer.ggml.add_bos_token", "yes");
  EXPECT_EQ(status_of(w2.write("tok_bad_bool.gguf")), TQKV_ERROR_IO);
  GgufWriter w3;
  w3.str_array("tokenizer.ggml.tokens", {"a"});
  EXPECT_EQ(status_of(w3.write("tok_no_model.gguf")), TQKV_ERROR_IO);
}

// ---- The real vocabularies -----------------------------------------------------------------

fs::path model_dir() {
  if (const char* c = std::getenv("TQKV_CACHE_DIR"); c && *c) return fs::path(c) / "models";
  const char* home = std::getenv("HOME");
  return fs::path(home ? home : ".") / ".cache" / "tqkv" / "models";
}

struct Golden {
  std::string model_file;
  bool add_bos = false;
  int32_t bos = -1, eos = -1;
  std::vector<std::pair<std::string, Ids>> cases;
};

Golden load_golden(const std::string& name) {
  const fs::path p = fs::path(__FILE__).parent_path() / "data" / "tokenizer" / (name + ".json");
  const std::string text = read_file(p);
  if (text.empty()) throw std::runtime_error("cannot read " + p.string());
  const Json j = JsonParser(text).parse();
  Golden g;
  g.model_file = j["model_file"].str;
  g.add_bos = j["add_bos"].b;
  g.bos = int32_t(j["bos"].num);
  g.eos = int32_t(j["eos"].num);
  for (const Json& c : j["cases"].items) {
    Ids ids;
    for (const Json& x : c["ids"].items) ids.push_back(int32_t(x.num));
    g.cases.emplace_back(c["text"].str, std::move(ids));
  }
  return g;
}

// Loaded once per model for the whole binary: Gemma's 262k-token vocabulary takes a moment.
struct Loaded {
  Golden golden;
  std::unique_ptr<Tokenizer> tok;
  std::vector<int32_t> types;
};

const Loaded* load_model(const std::string& name) {
  static std::map<std::string, std::unique_ptr<Loaded>> cache;
  auto it = cache.find(name);
  if (it != cache.end()) return it->second.get();
  auto l = std::make_unique<Loaded>();
  l->golden = load_golden(name);
  const fs::path path = model_dir() / l->golden.model_file;
  if (fs::exists(path)) {
    const GgufFile f = GgufFile::open(path.string());
    TokenizerData d = tokenizer_data_from_gguf(f);
    l->types = d.token_types;
    l->tok = std::make_unique<Tokenizer>(std::move(d));
  }
  return cache.emplace(name, std::move(l)).first->second.get();
}

#define LOAD_OR_SKIP(var, name)                                                                        \
  const Loaded* var = load_model(name);                                                                \
  if (!var->tok) GTEST_SKIP() << (model_dir() / var->golden.model_file).string()                      \
                              << " is absent; scripts/fetch-models.sh downloads it"

std::string show(const Ids& ids) {
  std::string s;
  for (int32_t id : ids) s += std::to_string(id) + " ";
  return s;
}

class RealModel : public ::testing::TestWithParam<std::string> {};

TEST_P(RealModel, MatchesGoldenIds) {
  LOAD_OR_SKIP(m, GetParam());
  size_t matched = 0;
  for (const auto& [text, want] : m->golden.cases) {
    const Ids got = m->tok->encode(text, false);
    EXPECT_EQ(got, want) << "text: \"" << text << "\"\n  want " << show(want) << "\n  got  " << show(got);
    matched += got == want;
  }
  std::printf("[ golden   ] %s: %zu of %zu texts match\n", GetParam().c_str(), matched, m->golden.cases.size());
}

TEST_P(RealModel, DecodeInvertsEncode) {
  LOAD_OR_SKIP(m, GetParam());
  for (const auto& [text, want] : m->golden.cases) {
    const Ids ids = m->tok->encode(text, false);
    std::string pieces;
    bool control = false;
    for (int32_t id : ids) {
      pieces += m->tok->token_piece(id);
      control |= m->types[id] == 3;
    }
    EXPECT_EQ(pieces, text) << "concatenated pieces";
    if (!control) {
      EXPECT_EQ(m->tok->decode(ids), text);
    }
  }
  // Stray, truncated and surrogate-encoding bytes come back as they went in.
  const std::string odd = "\xc3( x \xe2\x82 \xed\xa0\x80 \x80\x80";
  EXPECT_EQ(m->tok->decode(m->tok->encode(odd, false)), odd);
}

TEST(RealModelSpecials, SmolLM2DropsBytesItCannotSpell) {
  LOAD_OR_SKIP(m, "smollm2");
  EXPECT_EQ(m->tok->decode(m->tok->encode("\xff\xfe x\xf5", false)), " x");
}

TEST_P(RealModel, WholeGplRoundTripAndSpeed) {
  LOAD_OR_SKIP(m, GetParam());
  const std::string gpl = read_file("/usr/share/common-licenses/GPL-3");
  if (gpl.empty()) GTEST_SKIP() << "/usr/share/common-licenses/GPL-3 is absent";
  Ids ids;
  double best_ms = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    ids = m->tok->encode(gpl, false);
    best_ms = std::min(best_ms, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::printf("[ speed    ] %s: GPL-3 (%zu bytes) -> %zu tokens in %.2f ms\n", GetParam().c_str(), gpl.size(), ids.size(), best_ms);
  EXPECT_EQ(m->tok->decode(ids), gpl);
#if defined(NDEBUG) && !defined(__SANITIZE_ADDRESS__)
  EXPECT_LT(best_ms, 100.0);
#endif
}

TEST_P(RealModel, BosEosAndEndOfGeneration) {
  LOAD_OR_SKIP(m, GetParam());
  const Tokenizer& t = *m->tok;
  EXPECT_EQ(t.bos(), m->golden.bos);
  EXPECT_EQ(t.eos(), m->golden.eos);
  EXPECT_TRUE(t.is_eog(t.eos()));
  EXPECT_FALSE(t.is_eog(t.bos()));
  const Ids plain = t.encode("Hello world", false);
  Ids with = plain;
  if (m->golden.add_bos) with.insert(with.begin(), t.bos());
  EXPECT_EQ(t.encode("Hello world", true), with);
  EXPECT_EQ(t.decode(with), "Hello world");
  EXPECT_EQ(t.encode("", true), m->golden.add_bos ? Ids{t.bos()} : Ids{});
}

INSTANTIATE_TEST_SUITE_P(Models, RealModel, ::testing::Values("smollm2", "gemma3"));

TEST(RealModelSpecials, SmolLM2ChatTokens) {
  LOAD_OR_SKIP(m, "smollm2");
  const Tokenizer& t = *m->tok;
  EXPECT_EQ(t.vocab_size(), 49152u);
  const Ids ids = t.encode("<|im_start|>user\nHi<|im_end|>", true);
  ASSERT_GE(ids.size(), 3u);
  EXPECT_EQ(ids.front(), 1);  // <|im_start|>; SmolLM2 adds no BOS
  EXPECT_EQ(ids.back(), 2);   // <|im_end|>, also the EOS
  EXPECT_EQ(t.decode(ids), "user\nHi");
  EXPECT_EQ(t.token_piece(1), "<|im_start|>");
  EXPECT_TRUE(t.is_eog(0));  // <|endoftext|>
  EXPECT_TRUE(t.is_eog(2));
  EXPECT_FALSE(t.is_eog(1));
}

TEST(RealModelSpecials, GemmaTurnTokens) {
  LOAD_OR_SKIP(m, "gemma3");
  const Tokenizer& t = *m->tok;
  EXPECT_EQ(t.vocab_size(), 262144u);
  const Ids ids = t.encode("<start_of_turn>user\nHi<end_of_turn>", true);
  ASSERT_GE(ids.size(), 4u);
  EXPECT_EQ(ids[0], 2);    // <bos>
  EXPECT_EQ(ids[1], 105);  // <start_of_turn>
  EXPECT_EQ(ids.back(), 106);
  EXPECT_EQ(t.decode(ids), "user\nHi");
  EXPECT_TRUE(t.is_eog(1));    // <eos>
  EXPECT_TRUE(t.is_eog(106));  // <end_of_turn>
  EXPECT_FALSE(t.is_eog(105));
  EXPECT_EQ(t.token_piece(t.encode(" world", false).front()), " world");
}

}  // namespace
}  // namespace tqkv::model
