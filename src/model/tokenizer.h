// Tokenizers stored in GGUF metadata: GPT-2 byte-level BPE ("gpt2") and SentencePiece-style
// ("llama": score-driven BPE over UTF-8 pieces with byte fallback), with special tokens.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace tqkv::model {

class GgufFile;

// The tokenizer.ggml.* metadata, decoupled from the file.
struct TokenizerData {
  std::string model;  // tokenizer.ggml.model: "gpt2" or "llama"
  std::string pre;    // tokenizer.ggml.pre (pre-tokenizer name), may be empty
  std::vector<std::string> tokens;
  std::vector<float> scores;        // may be empty
  // May be empty (then every token is normal but the ids named below, which count as control).
  std::vector<int32_t> token_types;  // 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
  std::vector<std::string> merges;  // "a b" pairs, gpt2 only
  int32_t bos = -1, eos = -1, unk = -1, pad = -1;
  int32_t eot = -1, eom = -1;  // end of turn / end of message, when the file names them (-1: none)
  bool add_bos = false, add_eos = false, add_space_prefix = false;
};

TokenizerData tokenizer_data_from_gguf(const GgufFile& f);

class Tokenizer {
 public:
  explicit Tokenizer(TokenizerData data);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  // add_special: prepend BOS (and append EOS) as the metadata says. Control and user-defined
  // tokens written in the text are always recognised as themselves. Any bytes are accepted: bytes
  // that are not well-formed UTF-8 are kept as byte tokens, so decode gives them back, except
  // bytes a byte-level vocabulary has no token for (SmolLM2 lacks 0xF5..0xFF, among a few),
  // which are dropped.
  std::vector<int32_t> encode(std::string_view text, bool add_special) const;
  // The bytes the ids stand for; control tokens (BOS, EOS, <end_of_turn>, ...) are skipped.
  // Throws TQKV_ERROR_INVALID_ARGUMENT for an id outside the vocabulary.
  std::string decode(std::span<const int32_t> ids) const;
  // The bytes one token stands for, for streaming output (a piece may end inside a UTF-8
  // character); control tokens give their own text, unlike in decode.
  std::string token_piece(int32_t id) const;
  size_t vocab_size() const;
  int32_t bos() const;
  int32_t eos() const;
  bool is_eog(int32_t id) const;  // end of generation (eos, end_of_turn, ...)

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tqkv::model
