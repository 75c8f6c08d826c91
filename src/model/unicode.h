// The few Unicode facts the tokenizers need: UTF-8 decoding that never fails (a byte that does
// not start a well-formed sequence stands for itself) and the classes the GPT-2 pre-tokenizer's
// regex distinguishes.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace tqkv::model::unicode {

// Stands in for a byte that is not part of well-formed UTF-8 (never a real code point).
inline constexpr uint32_t kInvalid = 0xFFFFFFFFu;

// \p{L}, \p{N}, \s (the White_Space property) and everything else.
enum class CharClass : uint8_t { Other, Letter, Number, Space };

// Decodes the sequence at s[pos]; returns its length in bytes (>= 1 when pos < s.size()).
// Overlong forms, surrogates, values past U+10FFFF and truncated sequences give kInvalid with
// length 1, so every byte of the input belongs to exactly one unit.
size_t decode_utf8(std::string_view s, size_t pos, uint32_t& cp);

CharClass char_class(uint32_t cp);

void append_utf8(std::string& out, uint32_t cp);

}  // namespace tqkv::model::unicode
