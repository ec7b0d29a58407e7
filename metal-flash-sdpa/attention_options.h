// The mask and score arguments every attention op takes (scale, causal, window, softcap, ALiBi, sinks):
// checked once here and turned into the plan's AttentionOptions and the shaders' fp32 inputs.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

#include "launch.h"
#include "tensor_checks.h"

namespace metal_flash_sdpa {

// A window edge as the shaders take it: flash-attn clamps a window that reaches past every key to -1
// (unbounded); done here in 64-bit, before narrowing, with `reach` a bound the host knows (the longest
// possible distance on that side), so (2^32 + 3, -1) is unbounded, never window 3.
inline int64_t clamp_window(int64_t window, int64_t reach) { return window >= reach ? -1 : window; }

// Checks of the mask and score arguments every attention op takes; returns them as the plan's options.
// max_seqlen_q / max_seqlen_k bound the sequence lengths (the totals when nothing better is known): a key at
// signed distance d = q_pos - k_pos has d < max_seqlen_k and -d < max_seqlen_q.
inline AttentionOptions check_attention_options(const at::Tensor& q, int64_t num_seqs, int64_t num_heads,
                                                int64_t head_dim, int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                std::optional<double> softmax_scale, bool causal,
                                                int64_t window_left, int64_t window_right, double softcap,
                                                const std::optional<at::Tensor>& alibi_slopes,
                                                const std::optional<at::Tensor>& s_aux) {
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1, "window_size entries must be >= -1 (-1: unbounded), got (",
                    window_left, ", ", window_right, ")");
  // The shaders compute in fp32: a value finite as a double can still overflow (1e39) or vanish (1e-46) there.
  TORCH_CHECK_VALUE(softcap == 0.0 || (float(softcap) > 0.0f && std::isfinite(float(softcap))),
                    "softcap must be >= 0 (0: off) and finite as a float32, got ", softcap);
  const double scale = softmax_scale ? *softmax_scale : 1.0 / std::sqrt(double(head_dim));
  TORCH_CHECK_VALUE(std::isfinite(float(scale)), "softmax_scale must be a finite float32, got ", scale);
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
  return {float(scale), causal, clamp_window(window_left, max_seqlen_k), clamp_window(window_right, max_seqlen_q),
          float(softcap), s_aux.has_value(), alibi_slopes.has_value(), per_seq_slopes ? num_heads : 0};
}

// Sinks and ALiBi slopes as the shaders read them: contiguous fp32 (sinks may arrive in q's dtype).
struct ScoreInputs {
  at::Tensor sinks, slopes;   // undefined when absent
};

inline ScoreInputs score_inputs(const std::optional<at::Tensor>& s_aux, const std::optional<at::Tensor>& alibi_slopes) {
  return {s_aux ? s_aux->to(at::kFloat).contiguous() : at::Tensor(),
          alibi_slopes ? alibi_slopes->contiguous() : at::Tensor()};
}

}  // namespace metal_flash_sdpa
