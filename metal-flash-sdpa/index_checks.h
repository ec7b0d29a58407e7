// Index tensors (cu_seqlens, cache_seqlens, block_table, cache_leftpad): the checks of their values, which
// read them on the host.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

#include "tensor_checks.h"

namespace metal_flash_sdpa {

// Host copy of a small index tensor (the data checks read cu_seqlens, cache_seqlens, block_table once).
inline at::Tensor host_ints(const at::Tensor& t) { return t.to(at::kCPU).contiguous(); }

// Checks that read index data (cu_seqlens, cache_seqlens, block_table) on the host. On by default; setting
// METAL_FLASH_SDPA_SKIP_DATA_CHECKS=1 skips the device-to-host copies they cost on MPS. The kernels guard
// every index they derive from data anyway, so skipping can give wrong answers for bad data, never
// out-of-bounds accesses (the tests use it to prove exactly that).
inline bool data_checks_enabled() {
  const char* skip = std::getenv("METAL_FLASH_SDPA_SKIP_DATA_CHECKS");
  return !(skip && std::strcmp(skip, "1") == 0);
}

inline void check_int32_per_sequence(const at::Tensor& t, const char* name, int64_t num_seqs, const at::Tensor& like) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, name, " must be torch.int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == num_seqs, name, " must be [batch] = [", num_seqs, "], got shape ",
                    t.sizes());
  check_same_device(t, like, name);
}

// A paged cache [num_blocks, block_size, Hkv, D] and its block_table [num_seqs, blocks_per_seq].
struct CacheGeometry {
  int64_t num_blocks, block_size, num_kv_heads, head_dim, num_seqs, blocks_per_seq;
};

// Every block a sequence uses for positions [first, end) must exist in the cache.
inline void check_blocks_in_use(const at::Tensor& table, int64_t seq, int64_t first, int64_t end, const CacheGeometry& g) {
  if (end <= first) return;
  const int32_t* row = table.data_ptr<int32_t>() + seq * g.blocks_per_seq;
  for (int64_t b = first / g.block_size; b <= (end - 1) / g.block_size; ++b)
    TORCH_CHECK_VALUE(row[b] >= 0 && row[b] < g.num_blocks, "block_table[", seq, ", ", b, "] = ", row[b],
                      " is not a block of the cache (0 <= block < ", g.num_blocks, ")");
}

}  // namespace metal_flash_sdpa
