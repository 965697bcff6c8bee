// The exported C functions: each converts its arguments, calls the C++ library, and turns any
// exception into a status code plus a per-thread message. Nothing may unwind across the C
// boundary, so every entry point goes through `guarded`.
#include <memory>
#include <new>
#include <string>

#include "capi/config_options.hpp"
#include "capi/dlpack_view.hpp"
#include "svgear/attention.hpp"
#include "svgear/error.hpp"
#include "svgear/svgear.h"

#ifdef SVGEAR_HAS_CUDA
#include <cuda_runtime.h>
#endif

struct svgear_config {
  svgear::MethodConfig config;
  std::string description;  // backs svgear_config_describe's pointer
};

struct svgear_state {
  svgear::LayerState state;
};

namespace {

thread_local std::string last_error;

template <typename Body>
svgear_status guarded(Body&& body) noexcept {
  try {
    body();
    last_error.clear();
    return SVGEAR_OK;
  } catch (const svgear::Error& error) {
    last_error = error.what();
    switch (error.kind()) {
      case svgear::ErrorKind::type: return SVGEAR_ERROR_TYPE;
      case svgear::ErrorKind::runtime: return SVGEAR_ERROR_RUNTIME;
      case svgear::ErrorKind::value: return SVGEAR_ERROR_VALUE;
    }
    return SVGEAR_ERROR_VALUE;
  } catch (const std::bad_alloc&) {
    last_error = "out of memory";
    return SVGEAR_ERROR_MEMORY;
  } catch (const std::exception& error) {
    last_error = std::string("internal error: ") + error.what();
    return SVGEAR_ERROR_RUNTIME;
  } catch (...) {
    last_error = "internal error: unknown exception";
    return SVGEAR_ERROR_RUNTIME;
  }
}

void require_handle(const void* handle, const char* what) {
  if (handle == nullptr) throw svgear::Error(std::string(what) + " is NULL: create it first");
}

// Runs the call on the tensors' GPU and gives the caller back its current device.
class CudaDeviceScope {
 public:
  explicit CudaDeviceScope(int device) {
#ifdef SVGEAR_HAS_CUDA
    if (device < 0) return;
    if (cudaGetDevice(&previous_) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) {
      cudaGetLastError();
      throw svgear::Error("cannot select CUDA device " + std::to_string(device), svgear::ErrorKind::runtime);
    }
    switched_ = true;
#else
    (void)device;
#endif
  }
  ~CudaDeviceScope() {
#ifdef SVGEAR_HAS_CUDA
    if (switched_) cudaSetDevice(previous_);
#endif
  }
  CudaDeviceScope(const CudaDeviceScope&) = delete;
  CudaDeviceScope& operator=(const CudaDeviceScope&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

bool has_negative_stride(const svgear::TensorView& view) {
  for (const auto stride : view.strides) {
    if (stride < 0) return true;
  }
  return false;
}

}  // namespace

extern "C" {

const char* svgear_last_error(void) { return last_error.c_str(); }

int32_t svgear_c_api_version(void) { return SVGEAR_C_API_VERSION; }

const char* svgear_version(void) { return SVGEAR_VERSION_STRING; }

int32_t svgear_has_cuda(void) {
#ifdef SVGEAR_HAS_CUDA
  return 1;
#else
  return 0;
#endif
}

svgear_status svgear_config_create(const char* method, svgear_config** config) {
  return guarded([&] {
    require_handle(config, "the config output pointer");
    *config = nullptr;
    if (method == nullptr) throw svgear::Error("method is NULL: pass \"dense\", \"svg2\" or \"ear\"");
    auto created = std::make_unique<svgear_config>();
    created->config = svgear::preset(svgear::parse_method(method));
    *config = created.release();
  });
}

svgear_status svgear_config_set(svgear_config* config, const char* key, const char* value) {
  return guarded([&] {
    require_handle(config, "config");
    if (key == nullptr || value == nullptr) throw svgear::Error("option key and value must not be NULL");
    svgear::capi::set_option(config->config, key, value);
  });
}

const char* svgear_config_describe(const svgear_config* config) {
  if (config == nullptr) return "";
  auto* mutable_config = const_cast<svgear_config*>(config);
  mutable_config->description = svgear::capi::describe(config->config);
  return mutable_config->description.c_str();
}

void svgear_config_destroy(svgear_config* config) { delete config; }

svgear_status svgear_state_create(svgear_state** state) {
  return guarded([&] {
    require_handle(state, "the state output pointer");
    *state = new svgear_state();
  });
}

svgear_status svgear_state_reset(svgear_state* state) {
  return guarded([&] {
    require_handle(state, "state");
    state->state.reset();
  });
}

svgear_status svgear_state_synchronize(svgear_state* state) {
  return guarded([&] {
    require_handle(state, "state");
    svgear::synchronize(state->state);
  });
}

int64_t svgear_state_steps(const svgear_state* state) { return state == nullptr ? 0 : state->state.steps; }

void svgear_state_destroy(svgear_state* state) {
#ifdef SVGEAR_HAS_CUDA
  // Device centroids and the deferred check are freed by the state's deleters; a sticky error
  // from them must not leak into the caller's next CUDA call.
  const bool on_device = state != nullptr && (state->state.device_centroids != nullptr ||
                                              state->state.deferred_check != nullptr);
  delete state;
  if (on_device) cudaGetLastError();  // never touch CUDA (and create a context) for CPU states
#else
  delete state;
#endif
}

svgear_status svgear_attention(const svgear_config* config, svgear_state* state, const DLTensor* q,
                               const DLTensor* k, const DLTensor* v, const DLTensor* out,
                               const DLTensor* lse, svgear_layout layout, void* stream,
                               svgear_report* report) {
  return guarded([&] {
    using svgear::capi::view_attention_tensor;
    require_handle(config, "config");
    const svgear::TensorView q_view = view_attention_tensor(q, layout, "q");
    const svgear::TensorView k_view = view_attention_tensor(k, layout, "k");
    const svgear::TensorView v_view = view_attention_tensor(v, layout, "v");
    const svgear::TensorView out_view = view_attention_tensor(out, layout, "out");
    // q, k, v share a dtype; out may differ where the backend allows it (the CPU path writes
    // any dtype, e.g. float32 results of bf16 inputs; the CUDA path rejects it itself).
    for (const auto& [view, name] : {std::pair{&k_view, "k"}, std::pair{&v_view, "v"}}) {
      if (view->dtype != q_view.dtype) {
        throw svgear::Error(std::string("tensor '") + name + "' is " + svgear::dtype_name(view->dtype) +
                                " but q is " + svgear::dtype_name(q_view.dtype) + ": pass q, k and v in one dtype",
                            svgear::ErrorKind::type);
      }
    }
    const int device = svgear::capi::cuda_device_of(q);
    for (const auto& [tensor, name] : {std::pair{k, "k"}, std::pair{v, "v"}, std::pair{out, "out"}}) {
      if (svgear::capi::cuda_device_of(tensor) != device) {
        throw svgear::Error(std::string("tensor '") + name + "' is on another device than q: put q, k, v and out on one device",
                            svgear::ErrorKind::type);
      }
    }
    svgear::TensorView lse_view;
    if (lse != nullptr) {
      lse_view = svgear::capi::view_lse_tensor(lse);
      if (svgear::capi::cuda_device_of(lse) != device) {
        throw svgear::Error("tensor 'lse' is on another device than q: allocate it beside q", svgear::ErrorKind::type);
      }
    }
    // Writing `out` while reading an input it overlaps would corrupt the result silently.
    if (!has_negative_stride(out_view)) {
      const auto out_range = svgear::capi::byte_range(out_view);
      for (const auto& [view, name] : {std::pair{&q_view, "q"}, std::pair{&k_view, "k"}, std::pair{&v_view, "v"}}) {
        if (!has_negative_stride(*view) && out_range.overlaps(svgear::capi::byte_range(*view))) {
          throw svgear::Error(std::string("out overlaps the memory of ") + name + ": pass a separate output tensor");
        }
      }
    }
    CudaDeviceScope scope(device);
    const svgear::AttentionReport result =
        svgear::attention(q_view, k_view, v_view, out_view, config->config, state ? &state->state : nullptr,
                          stream, lse != nullptr ? &lse_view : nullptr);
    if (report != nullptr) {
      report->density = result.density;
      report->exact_pairs = result.exact_pairs;
      report->selected_blocks = result.selected_blocks;
      report->total_blocks = result.total_blocks;
      report->warm_started = result.warm_started ? 1 : 0;
      report->check_ms = result.times.check_ms;
      report->cluster_ms = result.times.cluster_ms;
      report->permute_ms = result.times.permute_ms;
      report->score_ms = result.times.score_ms;
      report->select_ms = result.times.select_ms;
      report->attend_ms = result.times.attend_ms;
      report->total_ms = result.times.total_ms;
      report->complete = result.complete ? 1 : 0;
    }
  });
}

}  // extern "C"
