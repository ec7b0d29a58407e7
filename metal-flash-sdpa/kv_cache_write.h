// The paged cache as the KV write and the decode op see it: shape checks, and the write itself
// (kv_cache_write.cpp); the checks of the index values are in index_checks.h.
#pragma once
#include <ATen/ATen.h>

#include "index_checks.h"
#include "tensor_checks.h"

namespace metal_flash_sdpa {

// k_cache/v_cache [num_blocks, block_size, Hkv, D] (head dim contiguous) of the dtype and device of `like`
// (named like_name in errors), read through `table` (from index_tensor(); [B, max_blocks], or cache_batch_idx
// viewed as [B, 1] when table_is_batch_idx).
CacheGeometry check_cache(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& table,
                          bool table_is_batch_idx, const at::Tensor& like, const char* like_name);

// New tokens k/v [B, n, Hkv, D] for a cache of geometry g.
void check_new_tokens(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const CacheGeometry& g);

// The write itself, after every check has passed; slots outside the table or the cache are dropped.
void write_new_tokens(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const CacheIndices& indices, const CacheGeometry& g);

}  // namespace metal_flash_sdpa
