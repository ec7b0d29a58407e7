// The paged cache as the KV write and the decode op see it: shape checks, the host checks of the slots new
// tokens go to, and the write itself (kv_cache_write.cpp).
#pragma once
#include <ATen/ATen.h>

#include "index_checks.h"
#include "tensor_checks.h"

namespace metal_flash_sdpa {

// k_cache/v_cache [num_blocks, block_size, Hkv, D] (head dim contiguous) and block_table int32 [B, max_blocks],
// of the dtype and device of `like` (named like_name in errors).
CacheGeometry check_cache(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_table,
                          const at::Tensor& like, const char* like_name);

// Shape checks of the KV write, shared by the op, its meta kernel and the decode op's append.
CacheGeometry check_kv_write_args(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_table,
                                  const at::Tensor& cache_seqlens);

// Data check (host): the slots of the new tokens lie inside the table and in blocks of the cache.
void check_write_slots(const at::Tensor& block_table, const at::Tensor& cache_seqlens, int64_t new_tokens,
                       const CacheGeometry& g);

// The write itself, after every check has passed.
void write_new_tokens(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& block_table, const at::Tensor& cache_seqlens, const CacheGeometry& g);

}  // namespace metal_flash_sdpa
