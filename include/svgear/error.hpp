// The one exception type svgear throws for anything a caller can fix: bad tensors, bad files,
// bad configuration. The CLI maps it to exit code 2; the C API (later) to an error code plus
// svgear_last_error().
#pragma once

#include <stdexcept>
#include <string>

namespace svgear {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

}  // namespace svgear
