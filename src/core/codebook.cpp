// Lookup of the shipped codebook tables (generated into codebook_tables.inc).
#include "core/codebook.h"

#include <string>

#include "core/error.h"

namespace tqkv::core {
namespace {

struct CodebookTable {
  uint32_t head_dim;  // 0 = Gaussian law, shared by every head_dim
  uint32_t bits;
  const float* centroids;
  const float* boundaries;
};

#include "core/codebook_tables.inc"

}  // namespace

Codebook codebook(uint32_t bits, uint32_t head_dim, CodebookKind kind) {
  if (bits != 2 && bits != 3 && bits != 4 && bits != 8)
    invalid("bits: " + std::to_string(bits) + " is not supported; allowed: 2, 3, 4, 8");
  // The Gaussian codebook does not depend on head_dim, but an unsupported head_dim is still
  // a caller error, and rejecting it here keeps the two kinds interchangeable.
  if (head_dim != 64 && head_dim != 128 && head_dim != 256 && head_dim != 512)
    invalid("head_dim: " + std::to_string(head_dim) + " is not supported; allowed: 64, 128, 256, 512");
  if (kind != CodebookKind::exact && kind != CodebookKind::gaussian)
    invalid("codebook kind: " + std::to_string(static_cast<uint32_t>(kind)) +
            " is not supported; allowed: 0 (exact), 1 (gaussian)");
  const uint32_t law = kind == CodebookKind::gaussian ? 0 : head_dim;
  for (const CodebookTable& t : kCodebookTables) {
    if (t.head_dim == law && t.bits == bits) {
      Codebook cb;
      cb.bits = bits;
      cb.levels = 1u << bits;
      cb.centroids = t.centroids;
      cb.boundaries = t.boundaries;
      return cb;
    }
  }
  fail(TQKV_ERROR_INTERNAL, "codebook: no table for bits " + std::to_string(bits) + ", head_dim " +
                                std::to_string(head_dim));
}

}  // namespace tqkv::core
