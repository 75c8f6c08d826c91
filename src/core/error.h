// Internal error type. Library code throws tqkv::Error; src/api/c_api.cpp is the only place
// that turns it into a tqkv_status and a message.
#pragma once
#include <stdexcept>
#include <string>

#include "tqkv/tqkv.h"

namespace tqkv {

class Error : public std::runtime_error {
 public:
  Error(tqkv_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
  tqkv_status status() const noexcept { return status_; }

 private:
  tqkv_status status_;
};

[[noreturn]] inline void fail(tqkv_status status, const std::string& message) { throw Error(status, message); }
[[noreturn]] inline void invalid(const std::string& message) { fail(TQKV_ERROR_INVALID_ARGUMENT, message); }

}  // namespace tqkv
