// SVGEAR_HOST_DEVICE: a function the CPU reference and the CUDA kernels both call, so a rule the
// two paths must follow decision for decision is written once.
#pragma once

#if defined(__CUDACC__)
#define SVGEAR_HOST_DEVICE __host__ __device__
#else
#define SVGEAR_HOST_DEVICE
#endif
