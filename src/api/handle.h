// Access from a public handle to the core object, for tests and tools that check internals.
#pragma once
#include "core/cache.h"
#include "tqkv/tqkv.h"

namespace tqkv::api {
const core::Cache& unwrap(const tqkv_cache* cache);
}
