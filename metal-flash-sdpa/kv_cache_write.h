// The paged cache as the KV write and the decode op see it: shape checks, quantized formats, and the write itself
// (kv_cache_write.cpp); the checks of the index values are in index_checks.h.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "dispatch.h"
#include "index_checks.h"
#include "tensor_checks.h"

namespace metal_flash_sdpa {

// The quantization arguments of the decode and KV write ops, as their schemas take them (all absent / 0: plain
// caches of the attention dtype).
struct KvQuantArgs {
  const std::optional<at::Tensor>& k_scales;
  const std::optional<at::Tensor>& k_biases;
  const std::optional<at::Tensor>& v_scales;
  const std::optional<at::Tensor>& v_biases;
  int64_t k_bits, v_bits, group_size;
  const std::optional<at::Tensor>& k_descale;
  const std::optional<at::Tensor>& v_descale;
};

// One cache's format (params.h: CacheFormat), checked: the cache's dtype picks the kind (uint32 words: affine,
// float8_e4m3fn or uint8: fp8, else plain).
struct CacheQuant {
  KvCacheKind kind = KV_PLAIN;
  int64_t bits = 0, group_size = 0;
  at::Tensor scales, biases;   // affine: [..., Hkv, D / group_size]; fp8: scales is the descale, fp32 [B, Hkv]
};

struct KvQuant {
  CacheQuant k, v;
  bool quantized() const { return k.kind != KV_PLAIN || v.kind != KV_PLAIN; }
};

// k_cache/v_cache [num_blocks, block_size, Hkv, D] (head dim contiguous; quantized: D * bits / 32 words or D fp8
// bytes per row) of the device of `like` (named like_name in errors) and, when plain, its dtype; read through
// `table` (from index_tensor(); [B, max_blocks], or cache_batch_idx viewed as [B, 1] when table_is_batch_idx).
// Fills *quant with the caches' formats, their scales / biases / descales checked against the geometry. With
// v_head_dim_may_differ (attention, not the append) plain caches may differ in the head dim (CacheGeometry::head_dim_v;
// the caller checks the pair).
CacheGeometry check_cache(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& table,
                          bool table_is_batch_idx, const at::Tensor& like, const char* like_name,
                          const KvQuantArgs& quant_args, KvQuant* quant, bool v_head_dim_may_differ = false);

// New tokens k/v [B, n, Hkv, D] of like's dtype for a cache of geometry g.
void check_new_tokens(const at::Tensor& k, const at::Tensor& v, const at::Tensor& like, const CacheGeometry& g);

// The write itself, after every check has passed; slots outside the table or the cache are dropped.
void write_new_tokens(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const CacheIndices& indices, const CacheGeometry& g, const KvQuant& quant);

// The shaders' view of the formats, their buffers at the given indices (scales, biases of K, then of V, then the
// params) and the FC_KV_QUANTIZED constant; `params` must outlive the dispatch.
KvQuantParams kv_quant_params(const KvQuant& quant);
std::vector<BufferBinding> kv_quant_bindings(const KvQuant& quant, const KvQuantParams& params, int first_index);
FunctionConstant kv_quant_constant(const KvQuant& quant);

}  // namespace metal_flash_sdpa
