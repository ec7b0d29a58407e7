// Flash-Decoding (decode.metal) as a building block: the decode op (decode.cpp) runs it, and so do
// flash_attn_func's decode steps (prefill.cpp), with k/v viewed as a cache of one block per sequence.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "kv_cache_write.h"
#include "launch.h"

namespace metal_flash_sdpa {

// flash_attn_func calls with at most this many queries per sequence (decode steps) run the decode kernel.
constexpr int64_t kDecodeMaxNewTokens = 4;

// Split-K bounds: at most this many partitions per (sequence, KV head), and at most this much fp32 scratch
// (partial max, sum and output of every (sequence, head, query, partition)) per call; past them partitions get
// longer. Bounds the scratch whatever num_splits says or however long the (possibly unread) lengths are.
constexpr int64_t kDecodeMaxPartitions = 64;
constexpr int64_t kDecodeScratchBytes = int64_t(64) << 20;

// The split-K heuristic (num_splits = 0) fills the GPU's threadgroup slots: cores x threadgroups resident per core,
// bounded by threadgroup memory and threads per core (params.h: CORE_THREADGROUP_MEMORY, CORE_MAX_THREADS, as
// benchmarks/cost_model.py uses them). A partition costs its keys plus this fixed work (q, key offsets, partials,
// the reduce), in keys.
// Threadgroups the GPU holds at once: cores x those resident per core (at least one) for this threadgroup memory and
// thread count (the decode split and the backward's chunk count size their grids by it).
inline int64_t threadgroup_slots(int64_t gpu_cores, int64_t threadgroup_bytes, int64_t threads) {
  const int64_t resident =
      std::max<int64_t>(1, std::min<int64_t>(CORE_THREADGROUP_MEMORY / threadgroup_bytes, CORE_MAX_THREADS / threads));
  return std::max<int64_t>(gpu_cores, 1) * resident;
}
constexpr int64_t kDecodePartitionOverheadKeys = 64;

// How a causal decode call of these sizes splits its keys: {partitions, keys per partition, scratch bytes (0 without
// a split, <= kDecodeScratchBytes)}. num_splits as the op takes it; window_left -1: no window; gpu_cores 0: this
// device's; head_dim_v 0: head_dim.
std::vector<int64_t> decode_split(int64_t batch, int64_t num_heads, int64_t num_kv_heads, int64_t seqlen_q,
                                  int64_t head_dim, int64_t element_bytes, int64_t max_keys, int64_t window_left,
                                  int64_t num_splits, int64_t gpu_cores, int64_t head_dim_v);

// The block table of a contiguous cache [B, S, Hkv, D] read as B blocks of S slots: row b -> block b, on like's
// device (built there: no host round trip).
inline at::Tensor contiguous_cache_table(int64_t batch, const at::Tensor& like) {
  return at::arange(batch, like.options().dtype(at::kInt)).view({batch, 1});
}

// q [B, Sq, H, D] against keys [kv_start[b], seqlens_k[b] + new_keys) of a paged cache read through table
// (index tensors from index_tensor(); kv_start undefined when absent). Values are clamped by the kernel; max_keys
// bounds the key ranges and sizes the partitions. Writes out and lse. quant: the caches' formats (plain by default).
void run_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& table,
                const at::Tensor& seqlens_k, int64_t new_keys, const at::Tensor& kv_start, int64_t max_keys,
                int64_t num_splits, const AttentionOptions& options, const std::optional<at::Tensor>& alibi_slopes,
                const std::optional<at::Tensor>& s_aux, const at::Tensor& out, const at::Tensor& lse,
                const KvQuant& quant = {});

}  // namespace metal_flash_sdpa
