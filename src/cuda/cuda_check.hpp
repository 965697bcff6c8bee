// Every CUDA runtime call and kernel launch goes through these, so a failure surfaces as
// svgear::Error naming the call and CUDA's own explanation instead of a later, unrelated crash.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "svgear/error.hpp"

namespace svgear::cuda {

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw Error(std::string("CUDA error in ") + what + ": " + cudaGetErrorName(status) + " (" +
                cudaGetErrorString(status) + ")",
                ErrorKind::runtime);
  }
}

// After a <<<...>>> launch: catches bad configurations (too much shared memory, too many
// blocks) at once; faults inside the kernel surface at the next synchronizing call.
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

}  // namespace svgear::cuda
