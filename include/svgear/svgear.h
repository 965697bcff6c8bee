/* svgear's stable C API: what the Python package (ctypes) and the CLI call.
 *
 * Why C: one shared library serves every Python and every torch version, because nothing of
 * Python's or libtorch's binary interface crosses it. Tensors cross as DLPack `DLTensor`s
 * (CPU or CUDA; bf16, fp16 or fp32; any strides), configurations and per-layer states as opaque
 * handles, and every function returns a status code; svgear_last_error() then holds the message
 * of the failure on the calling thread.
 *
 * Thread safety: handles are not shared between threads without the caller's locking; distinct
 * handles may be used from distinct threads at once. */
#ifndef SVGEAR_SVGEAR_H
#define SVGEAR_SVGEAR_H

#include <dlpack/dlpack.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SVGEAR_C_API_VERSION 2 /* 2: option synchronize, svgear_state_synchronize, report.complete */

typedef enum svgear_status {
  SVGEAR_OK = 0,
  SVGEAR_ERROR_VALUE = 1,   /* a bad value: shape, density, option, NaN input (Python ValueError) */
  SVGEAR_ERROR_TYPE = 2,    /* a bad kind: dtype, device, tensor rank (Python TypeError) */
  SVGEAR_ERROR_RUNTIME = 3, /* the library or the GPU failed (Python RuntimeError) */
  SVGEAR_ERROR_MEMORY = 4   /* out of host or device memory (Python MemoryError) */
} svgear_status;

/* Which axes of a 4-D tensor hold heads and tokens. diffusers' attention backends pass
 * (B, S, H, D); torch.nn.functional.scaled_dot_product_attention takes (B, H, S, D). */
typedef enum svgear_layout {
  SVGEAR_LAYOUT_BHSD = 0,
  SVGEAR_LAYOUT_BSHD = 1
} svgear_layout;

typedef struct svgear_config svgear_config; /* a method and its options */
typedef struct svgear_state svgear_state;   /* one attention layer's memory across steps */

/* What one call did; times are milliseconds. An asynchronous CUDA call (option synchronize =
 * false) returns before the GPU has run, so its report is partial: complete = 0, density and
 * the times NaN, exact_pairs and selected_blocks -1; total_blocks and warm_started are valid. */
typedef struct svgear_report {
  double density;          /* query x key pairs computed exactly / all pairs */
  int64_t exact_pairs;
  int64_t selected_blocks; /* (query cluster, key cluster) blocks computed exactly */
  int64_t total_blocks;
  int32_t warm_started;    /* 1 when k-means started from the state's centroids */
  double check_ms, cluster_ms, permute_ms, score_ms, select_ms, attend_ms, total_ms;
  int32_t complete;        /* 1: every field is known; 0: a partial report (above) */
} svgear_report;

/* The message of the last failure on this thread ("" after a success). The pointer stays valid
 * until this thread's next svgear call. */
const char* svgear_last_error(void);
int32_t svgear_c_api_version(void);
const char* svgear_version(void);
/* 1 when this library was built with its CUDA path. */
int32_t svgear_has_cuda(void);

/* method: "dense", "svg2" or "ear" (their published presets with svgear's defaults). */
svgear_status svgear_config_create(const char* method, svgear_config** config);
/* Sets one option from its text form, e.g. ("density", "0.2"), ("clusters_k", "1024"),
 * ("top_p", "0.9"), ("budget_scope", "head"). Unknown keys and unparsable or out-of-range values
 * fail with SVGEAR_ERROR_VALUE and a message listing what is accepted.
 * ("synchronize", "false") makes CUDA calls asynchronous (default "true"; no effect on CPU
 * tensors): svgear_attention then returns without waiting for the GPU, so the host can queue
 * the next layer's work. It needs a state (without one the call fails with
 * SVGEAR_ERROR_VALUE), whose next call or svgear_state_synchronize raises what the GPU found
 * (NaN/Inf inputs); the report is partial. */
svgear_status svgear_config_set(svgear_config* config, const char* key, const char* value);
/* The configuration as JSON (every option and its value), valid until the next call on it. */
const char* svgear_config_describe(const svgear_config* config);
void svgear_config_destroy(svgear_config* config);

svgear_status svgear_state_create(svgear_state** state);
/* Forgets the cached centroids: the next call starts cold (use between videos). A deferred error
 * of an earlier asynchronous call is kept for the next call or svgear_state_synchronize. */
svgear_status svgear_state_reset(svgear_state* state);
/* Waits until the last asynchronous call on this state (option synchronize = false) has run on
 * the GPU and returns what it could not: SVGEAR_ERROR_VALUE when its q, k or v held NaN or Inf
 * (its output is not valid; the message says it comes from an earlier asynchronous call),
 * SVGEAR_ERROR_RUNTIME when the GPU failed. Each deferred error is returned once, and a state
 * that had one starts cold again. SVGEAR_OK at once when nothing is pending (CPU or synchronous
 * calls). Call it where a result is consumed, e.g. after each denoising step. */
svgear_status svgear_state_synchronize(svgear_state* state);
/* Calls that used this state so far. */
int64_t svgear_state_steps(const svgear_state* state);
/* Waits for the state's asynchronous work, then frees it; a deferred error is dropped (call
 * svgear_state_synchronize first to see it). */
void svgear_state_destroy(svgear_state* state);

/* out = attention(q, k, v) under `config`.
 * q, out: 4-D, (B, H, Sq, D) or (B, Sq, H, D) by `layout`; k, v: the same with Sk tokens.
 * All on one device; q, k, v in one dtype (CPU: fp32/fp16/bf16; CUDA: fp16/bf16, D = 64 or 128,
 * last axis contiguous). `out` may have any strides of that shape and must not overlap the
 * inputs; on the CPU it may have another dtype (e.g. fp32 results of bf16 inputs), on CUDA not. 
 * lse (may be NULL): fp32, (B, H, Sq) for either layout; receives the natural log of each query
 * row's softmax denominator over svgear's terms (scores scaled by 1/sqrt(D)), so callers can
 * merge this output with attention over other keys.
 * state (may be NULL, except for an asynchronous CUDA call): warm-starts k-means from the
 * previous call's centroids. A deferred error of the state's previous asynchronous call is
 * returned first, and then this call does nothing.
 * stream: the cudaStream_t to run on for CUDA tensors (NULL: the default stream); the call
 * returns after the stream has finished this work, or at once with option synchronize =
 * false (the tensors are then read and written in the stream's order, as by any kernel).
 * Ignored for CPU tensors.
 * report (may be NULL): filled on success; partial after an asynchronous call. */
svgear_status svgear_attention(const svgear_config* config, svgear_state* state,
                               const DLTensor* q, const DLTensor* k, const DLTensor* v,
                               const DLTensor* out, const DLTensor* lse, svgear_layout layout,
                               void* stream, svgear_report* report);

#ifdef __cplusplus
}
#endif

#endif /* SVGEAR_SVGEAR_H */
