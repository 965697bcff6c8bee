// The one exception type svgear throws for anything a caller can fix: bad tensors, bad files,
// bad configuration; and for failures of the GPU underneath. The CLI maps it to exit code 2;
// the C API to an error code (by its kind) plus svgear_last_error().
#pragma once

#include <stdexcept>
#include <string>

namespace svgear {

// What went wrong, so bindings can raise the matching exception (Python: ValueError,
// TypeError, RuntimeError).
enum class ErrorKind {
  value,    // a bad value: shape, budget, option, file contents, NaN input
  type,     // a bad kind of thing: dtype, device, tensor rank
  runtime,  // the library or the GPU failed on valid input
};

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message, ErrorKind kind = ErrorKind::value)
      : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const noexcept { return kind_; }

 private:
  ErrorKind kind_;
};

}  // namespace svgear
