#include "model/unicode.h"

#include <algorithm>
#include <iterator>

namespace tqkv::model::unicode {

namespace {

enum RangeClass : uint8_t { kL, kN };
struct CodeRange {
  uint32_t first, last;
  RangeClass cls;
};

#include "model/unicode_tables.inc"

bool is_white_space(uint32_t cp) {
  switch (cp) {
    case 0x20: case 0x85: case 0xA0: case 0x1680: case 0x2028: case 0x2029: case 0x202F:
    case 0x205F: case 0x3000:
      return true;
    default:
      return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x2000 && cp <= 0x200A);
  }
}

}  // namespace

size_t decode_utf8(std::string_view s, size_t pos, uint32_t& cp) {
  const auto b0 = static_cast<unsigned char>(s[pos]);
  if (b0 < 0x80) {
    cp = b0;
    return 1;
  }
  size_t len;
  uint32_t v, min;
  if ((b0 & 0xE0) == 0xC0) {
    len = 2, v = b0 & 0x1Fu, min = 0x80;
  } else if ((b0 & 0xF0) == 0xE0) {
    len = 3, v = b0 & 0x0Fu, min = 0x800;
  } else if ((b0 & 0xF8) == 0xF0) {
    len = 4, v = b0 & 0x07u, min = 0x10000;
  } else {
    cp = kInvalid;
    return 1;
  }
  if (s.size() - pos < len) {
    cp = kInvalid;
    return 1;
  }
  for (size_t i = 1; i < len; ++i) {
    const auto b = static_cast<unsigned char>(s[pos + i]);
    if ((b & 0xC0) != 0x80) {
      cp = kInvalid;
      return 1;
    }
    v = (v << 6) | (b & 0x3Fu);
  }
  if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) {
    cp = kInvalid;
    return 1;
  }
  cp = v;
  return len;
}

CharClass char_class(uint32_t cp) {
  if (cp < 0x80) {
    if ((cp | 0x20) >= 'a' && (cp | 0x20) <= 'z') return CharClass::Letter;
    if (cp >= '0' && cp <= '9') return CharClass::Number;
    return is_white_space(cp) ? CharClass::Space : CharClass::Other;
  }
  if (cp == kInvalid) return CharClass::Other;
  if (is_white_space(cp)) return CharClass::Space;
  const auto* end = std::end(kCodeRanges);
  const auto* it = std::upper_bound(std::begin(kCodeRanges), end, cp,
                                    [](uint32_t v, const CodeRange& r) { return v < r.first; });
  if (it == std::begin(kCodeRanges)) return CharClass::Other;
  --it;
  if (cp > it->last) return CharClass::Other;
  return it->cls == kL ? CharClass::Letter : CharClass::Number;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

}  // namespace tqkv::model::unicode
