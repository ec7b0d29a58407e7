// The C++ entry points behind the op schemas in torch_binding.cpp (implemented in metal-flash-sdpa/).
#pragma once
#include <ATen/core/Tensor.h>

#include <map>
#include <optional>
#include <string>
#include <tuple>

namespace metal_flash_sdpa {

// Prefill: packed varlen ([total, H, D] + cu_seqlens) or batched ([B, S, H, D], cu_seqlens None).
// Returns the output (q's shape and dtype) and the fp32 natural-log LSE ([H, total] or [B, H, S]).
using FlashAttnVarlen = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, bool causal, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& s_aux);
FlashAttnVarlen flash_attn_varlen;        // MPS or CPU (simulator), per build
FlashAttnVarlen flash_attn_varlen_meta;   // shapes only, for torch.compile / fake tensors

}  // namespace metal_flash_sdpa
