// The paged KV write op (kv_cache_write.metal) and the cache checks it shares with the decode op, which
// appends new tokens through it. Device-agnostic like prefill.cpp.
#include "kv_cache_write.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <limits>

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

CacheGeometry check_cache(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_table,
                          const at::Tensor& like, const char* like_name) {
  element_type(k_cache, "k_cache");
  TORCH_CHECK_TYPE(k_cache.scalar_type() == like.scalar_type() && v_cache.scalar_type() == like.scalar_type(),
                   "k_cache, v_cache and ", like_name, " must have the same dtype, got ", k_cache.scalar_type(), ", ",
                   v_cache.scalar_type(), ", ", like.scalar_type());
  check_same_device(k_cache, like, "k_cache");
  check_same_device(v_cache, like, "v_cache");
  check_same_device(block_table, like, "block_table");
  TORCH_CHECK_VALUE(k_cache.dim() == 4, "k_cache must be [num_blocks, block_size, kv_heads, head_dim] (paged) or "
                    "[batch, seqlen, kv_heads, head_dim] (contiguous), got shape ", k_cache.sizes());
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "v_cache must have the shape of k_cache ", k_cache.sizes(),
                    ", got ", v_cache.sizes());
  TORCH_CHECK_VALUE(k_cache.stride(-1) == 1 && v_cache.stride(-1) == 1,
                    "k_cache and v_cache need a contiguous head dim (stride 1): the cache is read and written in place");
  TORCH_CHECK_TYPE(block_table.scalar_type() == at::kInt, "block_table must be torch.int32, got ",
                   block_table.scalar_type());
  TORCH_CHECK_VALUE(block_table.dim() == 2, "block_table must be [batch, max_blocks_per_sequence], got shape ",
                    block_table.sizes());
  CacheGeometry g{k_cache.size(0), k_cache.size(1), k_cache.size(2), k_cache.size(3), block_table.size(0),
                  block_table.size(1)};
  constexpr int64_t int_max = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_NOT_IMPLEMENTED(g.blocks_per_seq * g.block_size <= int_max && g.num_blocks <= int_max,
                              "caches with more than 2^31 - 1 slots per sequence");
  return g;
}

// Shape checks of the KV write, shared by the op and its meta kernel.
CacheGeometry check_kv_write_args(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_table,
                                  const at::Tensor& cache_seqlens) {
  const CacheGeometry g = check_cache(k_cache, v_cache, block_table, k, "k");
  TORCH_CHECK_VALUE(k.dim() == 4 && k.size(0) == g.num_seqs && k.size(2) == g.num_kv_heads && k.size(3) == g.head_dim,
                    "k must be [batch, new_tokens, kv_heads, head_dim] = [", g.num_seqs, ", n, ", g.num_kv_heads, ", ",
                    g.head_dim, "], got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK_TYPE(v.scalar_type() == k.scalar_type(), "k and v must have the same dtype");
  check_same_device(v, k, "v");
  check_int32_per_sequence(cache_seqlens, "cache_seqlens", g.num_seqs, k);
  return g;
}

// The slots of the new tokens must lie inside the table and in blocks of the cache.
void check_write_slots(const at::Tensor& block_table, const at::Tensor& cache_seqlens, int64_t new_tokens,
                       const CacheGeometry& g) {
  const at::Tensor starts = host_ints(cache_seqlens), table = host_ints(block_table);
  const int64_t capacity = g.blocks_per_seq * g.block_size;
  for (int64_t seq = 0; seq < g.num_seqs; ++seq) {
    const int64_t start = starts.data_ptr<int32_t>()[seq];
    TORCH_CHECK_VALUE(start >= 0 && start + new_tokens <= capacity, "cache_seqlens[", seq, "] = ", start, " + ",
                      new_tokens, " new tokens does not fit the ", capacity,
                      " slots block_table gives a sequence (max_blocks x block_size)");
    check_blocks_in_use(table, seq, start, start + new_tokens, g);
  }
}

// The write itself, after every check has passed.
void write_new_tokens(const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& k_cache,
                      const at::Tensor& v_cache, const at::Tensor& block_table, const at::Tensor& cache_seqlens,
                      const CacheGeometry& g) {
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
                    bind_tensor(KV_WRITE_BUFFER_BLOCK_TABLE, block_table),
                    bind_tensor(KV_WRITE_BUFFER_CACHE_SEQLENS, cache_seqlens),
                    bind_bytes(KV_WRITE_BUFFER_PARAMS, params)});
}

void kv_cache_write(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                    const at::Tensor& block_table, const at::Tensor& cache_seqlens) {
  const CacheGeometry g = check_kv_write_args(k, v, k_cache, v_cache, block_table, cache_seqlens);
  if (data_checks_enabled()) check_write_slots(block_table, cache_seqlens, k.size(1), g);
  write_new_tokens(k, v, k_cache, v_cache, block_table, cache_seqlens, g);
}

void kv_cache_write_meta(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                         const at::Tensor& block_table, const at::Tensor& cache_seqlens) {
  check_kv_write_args(k, v, k_cache, v_cache, block_table, cache_seqlens);
}

}  // namespace metal_flash_sdpa
