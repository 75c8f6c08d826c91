// Internal errors. Library code throws tqkv::Error (the public C++ API's error type, so one
// status type runs through everything); src/api/c_api.cpp is the only place that turns it into
// a tqkv_status and a message.
#pragma once
#include <string>

#include "tqkv/tqkv.hpp"

namespace tqkv {

[[noreturn]] inline void fail(tqkv_status status, const std::string& message) { throw Error(status, message); }
[[noreturn]] inline void invalid(const std::string& message) { fail(TQKV_ERROR_INVALID_ARGUMENT, message); }

}  // namespace tqkv
