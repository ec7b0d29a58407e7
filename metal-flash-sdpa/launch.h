// What every launch plan is made of: tensor shapes and options in, kernel name + grid + function constants +
// param struct out. Plain C++ (no torch, no Metal) shared by the Metal launcher (.mm) and the simulator
// backend, so the exact grid and constants a Mac uses are built and tested on Linux. Each op's plan lives
// beside its shader (prefill.cpp, decode.cpp, kv_cache_write.cpp); the pieces they share are here.
#pragma once
#include <stdint.h>

#include <string>
#include <vector>

#include "common/params.h"

namespace metal_flash_sdpa {

enum class ElementType { Float32, Float16, BFloat16 };
inline int64_t element_bytes(ElementType dtype) { return dtype == ElementType::Float32 ? 4 : 2; }

struct FunctionConstant {   // one MTLFunctionConstantValues entry (all ours are bools)
  int32_t index;
  bool value;
};

struct KernelLaunch {
  std::string kernel;                       // host name of the [[kernel]] instantiation
  uint32_t threadgroups[3];                 // dispatchThreadgroups
  uint32_t threads_per_threadgroup;
  std::vector<FunctionConstant> constants;  // the pipeline is specialised (and cached) per constant set
};

// The head dims of FOR_EACH_HEAD_DIM (common/params.h), for checks and error messages.
#define METAL_FLASH_SDPA_HEAD_DIM_ENTRY(unused, d) d,
constexpr int64_t kHeadDims[] = {FOR_EACH_HEAD_DIM(METAL_FLASH_SDPA_HEAD_DIM_ENTRY, _)};
#undef METAL_FLASH_SDPA_HEAD_DIM_ENTRY
bool is_supported_head_dim(int64_t head_dim);
const std::string& supported_head_dims();   // "32, 64, ..."
// The forward kernels' (prefill, decode) head dims beyond those: FOR_EACH_FORWARD_ONLY_HEAD_DIM, and the (K, V) pairs
// of FOR_EACH_HEAD_DIM_PAIR.
#define METAL_FLASH_SDPA_HEAD_DIM_ENTRY(unused, d) d,
constexpr int64_t kForwardOnlyHeadDims[] = {FOR_EACH_FORWARD_ONLY_HEAD_DIM(METAL_FLASH_SDPA_HEAD_DIM_ENTRY, _)};
#undef METAL_FLASH_SDPA_HEAD_DIM_ENTRY
#define METAL_FLASH_SDPA_HEAD_DIM_PAIR_ENTRY(unused, dk, dv) {dk, dv},
constexpr int64_t kHeadDimPairs[][2] = {FOR_EACH_HEAD_DIM_PAIR(METAL_FLASH_SDPA_HEAD_DIM_PAIR_ENTRY, _)};
#undef METAL_FLASH_SDPA_HEAD_DIM_PAIR_ENTRY
// Whether prefill and decode have a kernel for q/k head dim head_dim and v head dim head_dim_v.
bool is_supported_forward_head_dims(int64_t head_dim, int64_t head_dim_v);
const std::string& supported_forward_head_dims();   // "32, 64, ..., 512"
const std::string& supported_head_dim_pairs();      // "(192, 128), (576, 512)"

struct Strides3 {
  int64_t batch, token, head;   // elements; the head dim itself is contiguous
};

// The tensors of an attention call (AttentionShape on the shader side).
struct AttentionTensors {
  ElementType dtype;
  int64_t num_seqs, num_heads, num_kv_heads, head_dim;
  Strides3 q, k, v, out;   // decode: k/v are the caches, {block, slot, head}
  Strides3 lse;            // note: {batch, head, token} order for the LSE
  bool kv_rows_aligned = false;   // every k/v row starts on a 16-byte boundary (see kv_vector_copies)
  int64_t head_dim_v = 0;         // v's and out's head dim (forward kernels); 0: head_dim
  bool v_in_k_rows = false;       // v's rows are the first head_dim_v elements of k's (FC_V_IN_K_TILE)
  int64_t value_head_dim() const { return head_dim_v > 0 ? head_dim_v : head_dim; }
};

// Masks and score options (MaskParams + function constants on the shader side).
struct AttentionOptions {
  float scale;
  bool causal;
  int64_t window_left, window_right;   // -1: unbounded
  float softcap;                       // 0: off
  bool has_sinks;
  bool has_alibi;
  int64_t alibi_seq_stride;            // 0: slopes [H]; H: slopes [B, H]
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
// The FastDivisor (common/params.h) of 1 <= divisor < 2^31.
FastDivisor fast_divisor(int64_t divisor);

// "<base>_<type>_<head_dim>", as the [[host_name]] of the shader instantiations (head_dim < 0: no suffix);
// "<base>_<type>_<head_dim>_<head_dim_v>" when v's head dim differs.
std::string kernel_name(const char* base, ElementType dtype, int64_t head_dim = -1, int64_t head_dim_v = -1);
void copy_strides(int64_t dst[3], const Strides3& strides);
AttentionShape attention_shape(const AttentionTensors& tensors);
MaskParams mask_params(const AttentionOptions& options);
std::vector<FunctionConstant> mask_constants(const AttentionOptions& options);   // FC_DO_CAUSAL .. FC_HAS_ALIBI
// FC_KV_VECTOR (common/kv_tile.h): aligned k/v rows and a K/V tile's token span within 32 bits.
FunctionConstant kv_vector_constant(const AttentionTensors& tensors);
// FC_V_IN_K_TILE (common/kv_tile.h).
inline FunctionConstant v_in_k_tile_constant(const AttentionTensors& tensors) {
  return {FC_V_IN_K_TILE, tensors.v_in_k_rows};
}
// The same for any copy_kv_tile source: tiles of tile_rows tokens, token_stride elements apart.
FunctionConstant vector_copy_constant(bool rows_aligned, int64_t tile_rows, int64_t token_stride, int64_t head_dim);

}  // namespace metal_flash_sdpa
