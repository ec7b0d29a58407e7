// The paged KV write op (kv_cache_write.metal) and the cache checks it shares with the decode op, which
// appends new tokens through it. Device-agnostic like prefill.cpp.
#include "kv_cache_write.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <limits>
#include <utility>

#include "../torch-ext/torch_binding.h"
#include "dispatch.h"
#include "launch.h"

namespace metal_flash_sdpa {

namespace {

struct KvWriteProblem {
  ElementType dtype;
  int64_t num_seqs, seqlen_new, num_kv_heads, head_dim;
  int64_t block_size, num_blocks, blocks_per_seq;
  Strides3 k, v, k_cache, v_cache;
};

KernelLaunch plan_kv_write(const KvWriteProblem& pb, KvWriteParams* params) {
  *params = KvWriteParams{};
  copy_strides(params->k_strides, pb.k);
  copy_strides(params->v_strides, pb.v);
  copy_strides(params->k_cache_strides, pb.k_cache);
  copy_strides(params->v_cache_strides, pb.v_cache);
  params->num_seqs = int32_t(pb.num_seqs);
  params->seqlen_new = int32_t(pb.seqlen_new);
  params->num_kv_heads = int32_t(pb.num_kv_heads);
  params->head_dim = int32_t(pb.head_dim);
  params->block_size = int32_t(pb.block_size);
  params->num_blocks = int32_t(pb.num_blocks);
  params->blocks_per_seq = int32_t(pb.blocks_per_seq);

  KernelLaunch launch;
  launch.kernel = kernel_name("kv_cache_write", pb.dtype);
  launch.threadgroups[0] = uint32_t(pb.seqlen_new);
  launch.threadgroups[1] = uint32_t(pb.num_kv_heads);
  launch.threadgroups[2] = uint32_t(pb.num_seqs);
  launch.threads_per_threadgroup = KV_WRITE_THREADS;
  return launch;
}

}  // namespace

CacheGeometry check_cache(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& table,
                          bool table_is_batch_idx, const at::Tensor& like, const char* like_name) {
  element_type(k_cache, "k_cache");
  TORCH_CHECK_TYPE(k_cache.scalar_type() == like.scalar_type() && v_cache.scalar_type() == like.scalar_type(),
                   "k_cache, v_cache and ", like_name, " must have the same dtype, got ", k_cache.scalar_type(), ", ",
                   v_cache.scalar_type(), ", ", like.scalar_type());
  check_same_device(k_cache, like, "k_cache");
  check_same_device(v_cache, like, "v_cache");
  TORCH_CHECK_VALUE(k_cache.dim() == 4, "k_cache must be [num_blocks, block_size, kv_heads, head_dim] (paged) or "
                    "[batch, seqlen, kv_heads, head_dim] (contiguous), got shape ", k_cache.sizes());
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "v_cache must have the shape of k_cache ", k_cache.sizes(),
                    ", got ", v_cache.sizes());
  TORCH_CHECK_VALUE(k_cache.stride(-1) == 1 && v_cache.stride(-1) == 1,
                    "k_cache and v_cache need a contiguous head dim (stride 1): the cache is read and written in place");
  TORCH_CHECK_VALUE(table.dim() == 2, "block_table must be [batch, max_blocks_per_sequence], got shape ", table.sizes());
  CacheGeometry g{k_cache.size(0), k_cache.size(1), k_cache.size(2), k_cache.size(3), table.size(0), table.size(1),
                  table_is_batch_idx};
  // Keys of a K tile (up to one tile past the last slot) stay within the decode shader's int32.
  constexpr int64_t int_max = std::numeric_limits<int32_t>::max();
  const int64_t max_slots = int_max - KV_TILE_KEYS(g.head_dim);
  TORCH_CHECK_NOT_IMPLEMENTED(g.capacity() <= max_slots && g.num_blocks <= int_max && g.num_seqs <= int_max,
                              "caches with more than ", max_slots, " slots per sequence (head_dim ", g.head_dim,
                              "), or 2^31 - 1 blocks or sequences");
  return g;
}

void check_new_tokens(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const CacheGeometry& g) {
  // The write kernel is chosen by the cache's dtype and copies element by element: k/v of another dtype would
  // be read (and the cache written) with the wrong element size.
  TORCH_CHECK_TYPE(k.scalar_type() == k_cache.scalar_type(), "k (new tokens) has dtype ", k.scalar_type(),
                   " but the cache has ", k_cache.scalar_type(), "; convert the new tokens to the cache's dtype");
  check_same_device(k, k_cache, "k (new tokens)");
  TORCH_CHECK_VALUE(k.dim() == 4 && k.size(0) == g.num_seqs && k.size(2) == g.num_kv_heads && k.size(3) == g.head_dim,
                    "k must be [batch, new_tokens, kv_heads, head_dim] = [", g.num_seqs, ", n, ", g.num_kv_heads, ", ",
                    g.head_dim, "], got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK_TYPE(v.scalar_type() == k.scalar_type(), "k and v must have the same dtype");
  check_same_device(v, k, "v");
  TORCH_CHECK_NOT_IMPLEMENTED(k.size(1) <= std::numeric_limits<int32_t>::max(), "more than 2^31 - 1 new tokens");
}

void write_new_tokens(const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& k_cache,
                      const at::Tensor& v_cache, const CacheIndices& indices, const CacheGeometry& g) {
  const int64_t new_tokens = k_in.size(1);
  if (g.num_seqs == 0 || new_tokens == 0 || g.num_kv_heads == 0) return;
  const at::Tensor k = unit_stride_head_dim(k_in), v = unit_stride_head_dim(v_in);
  KvWriteProblem pb{element_type(k, "k"), g.num_seqs, new_tokens, g.num_kv_heads, g.head_dim, g.block_size,
                    g.num_blocks, g.blocks_per_seq, token_strides(k, false), token_strides(v, false),
                    token_strides(k_cache, false), token_strides(v_cache, false)};
  KvWriteParams params;
  const KernelLaunch launch = plan_kv_write(pb, &params);
  dispatch(launch, {bind_tensor(KV_WRITE_BUFFER_K, k), bind_tensor(KV_WRITE_BUFFER_V, v),
                    bind_tensor(KV_WRITE_BUFFER_K_CACHE, k_cache), bind_tensor(KV_WRITE_BUFFER_V_CACHE, v_cache),
                    bind_tensor(KV_WRITE_BUFFER_BLOCK_TABLE, indices.table),
                    bind_tensor(KV_WRITE_BUFFER_CACHE_SEQLENS, indices.seqlens),
                    bind_bytes(KV_WRITE_BUFFER_PARAMS, params)});
}

namespace {

// Shape checks of the KV write op, shared with its meta kernel; the index tensors as the kernel reads them.
std::pair<CacheGeometry, CacheIndices> check_kv_write_args(const at::Tensor& k, const at::Tensor& v,
                                                           const at::Tensor& k_cache, const at::Tensor& v_cache,
                                                           const at::Tensor& block_table,
                                                           const at::Tensor& cache_seqlens) {
  const at::Tensor table = index_tensor(block_table, "block_table", k);
  const CacheGeometry g = check_cache(k_cache, v_cache, table, false, k, "k");
  check_new_tokens(k, v, k_cache, g);
  return {g, {table, per_sequence_index(cache_seqlens, "cache_seqlens", g.num_seqs, k), at::Tensor()}};
}

}  // namespace

void kv_cache_write(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                    const at::Tensor& block_table, const at::Tensor& cache_seqlens) {
  const auto [g, indices] = check_kv_write_args(k, v, k_cache, v_cache, block_table, cache_seqlens);
  if (data_checks_enabled(k)) check_cache_indices(indices, k.size(1), false, g);
  write_new_tokens(k, v, k_cache, v_cache, indices, g);
}

void kv_cache_write_meta(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                         const at::Tensor& block_table, const at::Tensor& cache_seqlens) {
  check_kv_write_args(k, v, k_cache, v_cache, block_table, cache_seqlens);
}

}  // namespace metal_flash_sdpa
