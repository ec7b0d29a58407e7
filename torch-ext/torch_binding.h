// The C++ entry points behind the op schemas in torch_binding.cpp (implemented in metal-flash-sdpa/).
#pragma once
#include <ATen/core/Tensor.h>

#include <array>
#include <map>
#include <optional>
#include <string>
#include <tuple>

namespace metal_flash_sdpa {

// Prefill: packed varlen ([total, H, D] + cu_seqlens) or batched ([B, S, H, D], cu_seqlens None). Varlen with
// block_table [B, max_blocks]: k/v are paged caches [num_blocks, block_size, Hkv, D] and sequence b's keys are its
// first cu_seqlens_k[b + 1] - cu_seqlens_k[b] (or seqused_k[b]) cache positions. seqused_k [B] without a table: the
// first seqused_k[b] keys of each cu_seqlens_k span.
// Returns the output (q's shape and dtype) and the fp32 natural-log LSE ([H, total] or [B, H, S]).
using FlashAttnVarlen = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, std::optional<double> softmax_scale, bool causal, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& s_aux, const std::optional<at::Tensor>& block_table,
    const std::optional<at::Tensor>& seqused_k);
FlashAttnVarlen flash_attn_varlen;        // MPS or CPU (simulator), per build
FlashAttnVarlen flash_attn_varlen_meta;   // shapes only, for torch.compile / fake tensors

// Backward of flash_attn_varlen: (dq, dk, dv, d s_aux) from the gradient of the output (and optionally of the LSE),
// the forward's arguments, output and LSE. d s_aux is [H] in s_aux's dtype, or empty without sinks. num_splits: chunks
// of key blocks per (sequence, KV head), 0: backward_chunks' heuristic. output_mask: which of dq, dk, dv to compute
// (one left out is returned empty and costs no work).
using FlashAttnVarlenBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& softmax_lse, const std::optional<at::Tensor>& dsoftmax_lse,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, std::optional<double> softmax_scale, bool causal, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& s_aux, int64_t num_splits, std::array<bool, 3> output_mask);
FlashAttnVarlenBackward flash_attn_varlen_backward;
FlashAttnVarlenBackward flash_attn_varlen_backward_meta;
// The chunks the backward of these sizes runs with (num_splits as the op takes it; gpu_cores 0: this device's).
int64_t backward_chunks(int64_t batch, int64_t num_kv_heads, int64_t head_dim, int64_t element_bytes,
                        int64_t max_seqlen_k, int64_t num_splits, int64_t gpu_cores);

// Decode over a paged KV cache [num_blocks, block_size, Hkv, D] read through block_table [B, max_blocks] (or a
// contiguous cache [B_cache, S, Hkv, D], rows cache_batch_idx[b], default b): optional new k/v [B, n, Hkv, D]
// are first written in place at cache_seqlens[b] (tokens already cached; default: the whole cache), then
// q [B, Sq, H, D] attends to keys [kv_start[b], cache_seqlens[b] + n) of its sequence (bottom-right aligned).
using FlashAttnDecode = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache, const std::optional<at::Tensor>& k_new,
    const std::optional<at::Tensor>& v_new, const std::optional<at::Tensor>& block_table,
    const std::optional<at::Tensor>& cache_batch_idx, const std::optional<at::Tensor>& cache_seqlens,
    const std::optional<at::Tensor>& kv_start, int64_t num_splits, std::optional<double> softmax_scale, bool causal,
    int64_t window_left, int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& s_aux, const std::optional<at::Tensor>& k_scales,
    const std::optional<at::Tensor>& k_biases, const std::optional<at::Tensor>& v_scales,
    const std::optional<at::Tensor>& v_biases, int64_t k_bits, int64_t v_bits, int64_t group_size,
    const std::optional<at::Tensor>& k_descale, const std::optional<at::Tensor>& v_descale);
FlashAttnDecode flash_attn_decode;
FlashAttnDecode flash_attn_decode_meta;

// Writes k/v [B, n, Hkv, D] into the paged caches at positions cache_seqlens[b] + i, in place.
// Quantized caches (both ops): uint32 words with k/v_bits, kv group_size and k/v_scales, k/v_biases
// [..., Hkv, D / group_size] (quantized on write), or fp8 e4m3 with k/v_descale [B, Hkv] fp32.
using KvCacheWrite = void(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                          const at::Tensor& block_table, const at::Tensor& cache_seqlens,
                          const std::optional<at::Tensor>& k_scales, const std::optional<at::Tensor>& k_biases,
                          const std::optional<at::Tensor>& v_scales, const std::optional<at::Tensor>& v_biases,
                          int64_t k_bits, int64_t v_bits, int64_t group_size,
                          const std::optional<at::Tensor>& k_descale, const std::optional<at::Tensor>& v_descale);
KvCacheWrite kv_cache_write;
KvCacheWrite kv_cache_write_meta;

// x [..., D] -> (packed uint32 [..., D * bits / 32], scales, biases [..., D / group_size] in x's dtype), bit for bit
// mlx.core.quantize(x, group_size, bits) (mode "affine").
using QuantizeKv = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor& x, int64_t bits,
                                                                  int64_t group_size);
QuantizeKv quantize_kv;
QuantizeKv quantize_kv_meta;

}  // namespace metal_flash_sdpa
