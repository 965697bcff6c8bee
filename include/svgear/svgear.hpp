// Everything a C++ user of svgear needs.
#pragma once

#include "svgear/attention.hpp"
#include "svgear/config.hpp"
#include "svgear/dtype.hpp"
#include "svgear/error.hpp"
#include "svgear/metrics.hpp"
#include "svgear/safetensors.hpp"
#include "svgear/state.hpp"
#include "svgear/tensor.hpp"
#include "svgear/workload.hpp"
