// Argument checks and tensor-to-plan helpers shared by the ops (attention.cpp, kvcache.cpp). Every message
// names the argument, the value and what is accepted; the TORCH_CHECK_{VALUE,TYPE,NOT_IMPLEMENTED} forms
// surface in Python as ValueError / TypeError / NotImplementedError.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>

#include "dispatch.h"
#include "launch_plan.h"

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

// Head layout every kernel supports: an instantiated head dim, and GQA/MQA groups of whole query heads.
inline void check_heads(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
  TORCH_CHECK_NOT_IMPLEMENTED(is_supported_head_dim(head_dim), "head_dim ", head_dim,
                              " is not supported; supported head dims: ", supported_head_dims());
  TORCH_CHECK_VALUE(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "the number of query heads (", num_heads,
                    ") must be a multiple of the number of key/value heads (", num_kv_heads, ")");
}

// Host copy of a small index tensor (the data checks read cu_seqlens, cache_seqlens, block_table once).
inline at::Tensor host_ints(const at::Tensor& t) { return t.to(at::kCPU).contiguous(); }

// Checks of the mask and score arguments every attention op takes; returns them as the plan's options.
inline AttentionOptions check_attention_options(const at::Tensor& q, int64_t num_seqs, int64_t num_heads,
                                                double softmax_scale, bool causal, int64_t window_left,
                                                int64_t window_right, double softcap,
                                                const std::optional<at::Tensor>& alibi_slopes,
                                                const std::optional<at::Tensor>& s_aux) {
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1, "window_size entries must be >= -1 (-1: unbounded), got (",
                    window_left, ", ", window_right, ")");
  TORCH_CHECK_VALUE(softcap >= 0.0, "softcap must be >= 0 (0 disables it), got ", softcap);
  TORCH_CHECK_VALUE(std::isfinite(softmax_scale), "softmax_scale must be finite, got ", softmax_scale);
  if (s_aux) {
    TORCH_CHECK_VALUE(s_aux->dim() == 1 && s_aux->size(0) == num_heads, "s_aux (sinks) must be [num_heads] = [",
                      num_heads, "], got shape ", s_aux->sizes());
    TORCH_CHECK_TYPE(s_aux->is_floating_point(), "s_aux must be a floating-point tensor, got ", s_aux->scalar_type());
    check_same_device(*s_aux, q, "s_aux");
  }
  const bool per_seq_slopes = alibi_slopes && alibi_slopes->dim() == 2;
  if (alibi_slopes) {
    const bool per_head = alibi_slopes->dim() == 1 && alibi_slopes->size(0) == num_heads;
    const bool per_seq = per_seq_slopes && alibi_slopes->size(0) == num_seqs && alibi_slopes->size(1) == num_heads;
    TORCH_CHECK_VALUE(per_head || per_seq, "alibi_slopes must be [num_heads] or [batch, num_heads] = [", num_seqs, ", ",
                      num_heads, "], got shape ", alibi_slopes->sizes());
    TORCH_CHECK_TYPE(alibi_slopes->scalar_type() == at::kFloat, "alibi_slopes must be torch.float32, got ",
                     alibi_slopes->scalar_type());
    check_same_device(*alibi_slopes, q, "alibi_slopes");
  }
  return {float(softmax_scale), causal, window_left, window_right, float(softcap), s_aux.has_value(),
          alibi_slopes.has_value(), per_seq_slopes ? num_heads : 0};
}

// Sinks and ALiBi slopes as the shaders read them: contiguous fp32 (sinks may arrive in q's dtype).
struct ScoreInputs {
  at::Tensor sinks, slopes;   // undefined when absent
};

inline ScoreInputs score_inputs(const std::optional<at::Tensor>& s_aux, const std::optional<at::Tensor>& alibi_slopes) {
  return {s_aux ? s_aux->to(at::kFloat).contiguous() : at::Tensor(),
          alibi_slopes ? alibi_slopes->contiguous() : at::Tensor()};
}

// Metal needs every buffer argument bound, even ones a function constant switches off: a 4-byte stand-in.
inline BufferBinding bind_optional(int index, const at::Tensor& tensor) {
  return tensor.defined() ? bind_tensor(index, tensor) : bind_bytes(index, int32_t(0));
}

// Checks that read index data (cu_seqlens, cache_seqlens, block_table) on the host. On by default; setting
// METAL_FLASH_SDPA_SKIP_DATA_CHECKS=1 skips the device-to-host copies they cost on MPS. The kernels guard
// every index they derive from data anyway, so skipping can give wrong answers for bad data, never
// out-of-bounds accesses (the tests use it to prove exactly that).
inline bool data_checks_enabled() {
  const char* skip = std::getenv("METAL_FLASH_SDPA_SKIP_DATA_CHECKS");
  return !(skip && std::strcmp(skip, "1") == 0);
}

// [total, H, D] (batch stride 0) or [B, S, H, D] / [blocks, slots, H, D] views; the head dim is contiguous.
inline Strides3 token_strides(const at::Tensor& t, bool varlen) {   // [total, H, D] or [B, S, H, D]
  return varlen ? Strides3{0, t.stride(0), t.stride(1)} : Strides3{t.stride(0), t.stride(1), t.stride(2)};
}

inline at::Tensor unit_stride_head_dim(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// Flash-Decoding of q [B, Sq, H, D] over a paged cache (kvcache.cpp); also serves flash_attn_func's decode
// steps. Indices must already be valid (checked, or built by the caller); writes out and lse.
void run_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                const at::Tensor& block_table, const at::Tensor& seqlens_k, const std::optional<at::Tensor>& kv_start,
                int64_t max_keys, int64_t num_splits,
                const AttentionOptions& options, const std::optional<at::Tensor>& alibi_slopes,
                const std::optional<at::Tensor>& s_aux, const at::Tensor& out, const at::Tensor& lse);

}  // namespace metal_flash_sdpa
