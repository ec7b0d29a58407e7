// Flash-Decoding (decode.metal) as a building block: the decode op (decode.cpp) runs it, and so do
// flash_attn_func's decode steps (prefill.cpp), with k/v viewed as a cache of one block per sequence.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "launch.h"

namespace metal_flash_sdpa {

// flash_attn_func calls with at most this many queries per sequence (decode steps) run the decode kernel.
constexpr int64_t kDecodeMaxNewTokens = 4;

// q [B, Sq, H, D] against keys [kv_start[b], seqlens_k[b]) of a paged cache read through block_table.
// Indices must already be valid (checked, or built by the caller); writes out and lse.
void run_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                const at::Tensor& block_table, const at::Tensor& seqlens_k, const std::optional<at::Tensor>& kv_start,
                int64_t max_keys, int64_t num_splits,
                const AttentionOptions& options, const std::optional<at::Tensor>& alibi_slopes,
                const std::optional<at::Tensor>& s_aux, const at::Tensor& out, const at::Tensor& lse);

}  // namespace metal_flash_sdpa
