// Checks of the tensors every op takes (dtype, device, head layout) and their strides as the plans want
// them. Every message names the argument, the value and what is accepted; TORCH_CHECK_{VALUE,TYPE,
// NOT_IMPLEMENTED} surface in Python as ValueError / TypeError / NotImplementedError.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "launch.h"

namespace metal_flash_sdpa {

inline ElementType element_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return ElementType::Float32;
    case at::kHalf: return ElementType::Float16;
    case at::kBFloat16: return ElementType::BFloat16;
    default:
      TORCH_CHECK_TYPE(false, name, " has dtype ", t.scalar_type(),
                       "; supported: torch.float16, torch.bfloat16, torch.float32");
  }
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK_VALUE(t.device() == q.device(), name, " is on ", t.device(), " but q is on ", q.device(),
                    "; all tensors must be on the same device");
}

inline void check_head_groups(int64_t num_heads, int64_t num_kv_heads) {
  TORCH_CHECK_VALUE(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "the number of query heads (", num_heads,
                    ") must be a multiple of the number of key/value heads (", num_kv_heads, ")");
}

// Head layout every kernel supports: an instantiated head dim, and GQA/MQA groups of whole query heads.
inline void check_heads(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
  TORCH_CHECK_NOT_IMPLEMENTED(is_supported_head_dim(head_dim), "head_dim ", head_dim,
                              " is not supported; supported head dims: ", supported_head_dims());
  check_head_groups(num_heads, num_kv_heads);
}

// The same for the forward ops, whose kernels have more head dims, and V's head dim head_dim_v (v_name: the argument
// holding V) may differ from q's and k's in the pairs they have (flash-attn 3's headdim_v).
inline void check_forward_heads(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t head_dim_v,
                                const char* v_name) {
  TORCH_CHECK_NOT_IMPLEMENTED(head_dim != head_dim_v || is_supported_forward_head_dims(head_dim, head_dim),
                              "head_dim ", head_dim, " is not supported; supported head dims: ",
                              supported_forward_head_dims(), " (and (q/k, v) pairs ", supported_head_dim_pairs(), ")");
  TORCH_CHECK_VALUE(head_dim == head_dim_v || is_supported_forward_head_dims(head_dim, head_dim_v), v_name,
                    " has head_dim ", head_dim_v, " but q and k have ", head_dim, "; v's head dim may differ from "
                    "q's only as (q/k, v) = ", supported_head_dim_pairs(), ", else it must be equal");
  check_head_groups(num_heads, num_kv_heads);
}

// The backward's kernels (backward.metal) have the head dims of FOR_EACH_HEAD_DIM, one for q, k and v alike: the forward's
// wider heads and (q/k, v) pairs get an error saying they are forward only (other head dims, and mismatched ones, get
// check_heads' and the shape checks' errors).
inline void check_backward_head_dims(int64_t head_dim, int64_t head_dim_v) {
  TORCH_CHECK_NOT_IMPLEMENTED((head_dim == head_dim_v && is_supported_head_dim(head_dim)) ||
                                  !is_supported_forward_head_dims(head_dim, head_dim_v),
                              "the backward has no kernel for head_dim ", head_dim, " (q, k) and head_dim_v ",
                              head_dim_v, " (v); its head dims (q, k and v alike): ", supported_head_dims(),
                              ". Wider heads and a V head dim that differs are forward only: run under "
                              "torch.no_grad() / torch.inference_mode()");
}

// [total, H, D] (batch stride 0) or [B, S, H, D] / [blocks, slots, H, D] views; the head dim is contiguous.
inline Strides3 token_strides(const at::Tensor& t, bool varlen) {
  return varlen ? Strides3{0, t.stride(0), t.stride(1)} : Strides3{t.stride(0), t.stride(1), t.stride(2)};
}

// True when every [..., D] row of t starts on a 16-byte boundary (Metal buffers are page-aligned, so the storage
// offset and the strides decide): the kernels then copy K/V tiles 16 bytes at a time.
inline bool rows_aligned_16(const at::Tensor& t) {
  const int64_t bytes = t.element_size();
  if (t.storage_offset() * bytes % 16 != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) * bytes % 16 != 0) return false;
  return true;
}

// Whether v's rows are the first elements of k's rows, as MLA's v = k_cache[..., :head_dim_v]: one storage, offset
// and strides (then the kernels take V from the K tile: FC_V_IN_K_TILE).
inline bool v_in_k_rows(const at::Tensor& k, const at::Tensor& v) {
  return v.is_alias_of(k) && v.scalar_type() == k.scalar_type() && v.storage_offset() == k.storage_offset() &&
         v.strides() == k.strides() && v.size(-1) <= k.size(-1);
}

inline at::Tensor unit_stride_head_dim(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

}  // namespace metal_flash_sdpa
