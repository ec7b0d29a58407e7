// Index tensors (cu_seqlens, cache_seqlens, block_table, cache_batch_idx, cache_leftpad): the one place that
// turns them into what the kernels and the host checks read, and the checks of their values.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include "tensor_checks.h"

namespace metal_flash_sdpa {

// An index tensor as the host checks and the shaders read it: int32 on q's device, contiguous. The shaders
// index the raw storage, so a view (t[::2], a sliced or transposed table, an expand()ed length) must become
// a dense copy before it is checked and bound; on the device that copy is a kernel, not a sync.
inline at::Tensor index_tensor(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, name, " must be torch.int32, got ", t.scalar_type());
  check_same_device(t, like, name);
  return t.contiguous();
}

// int32 [batch]; a 0-d tensor means the same value for every sequence.
inline at::Tensor per_sequence_index(const at::Tensor& t, const char* name, int64_t num_seqs, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.dim() == 0 || (t.dim() == 1 && t.size(0) == num_seqs), name, " must be [batch] = [", num_seqs,
                    "] (or 0-d), got shape ", t.sizes());
  return index_tensor(t.dim() == 0 ? t.expand({num_seqs}) : t, name, like);
}

// Value checks read index data on the host. METAL_FLASH_SDPA_CHECK_DATA=1 checks always, 0 never; unset, they
// run on CPU tensors only, where reading costs no device->host synchronisation. Unchecked values are trusted
// as flash-attn trusts them: the kernels clamp every index they derive from data, so bad values can give
// wrong numbers (and a KV write outside the table is dropped) but never an out-of-bounds access.
inline bool data_checks_enabled(const at::Tensor& like) {
  const char* value = std::getenv("METAL_FLASH_SDPA_CHECK_DATA");
  if (value == nullptr || *value == '\0') return like.is_cpu();
  TORCH_CHECK_VALUE(std::strcmp(value, "0") == 0 || std::strcmp(value, "1") == 0,
                    "METAL_FLASH_SDPA_CHECK_DATA must be 0, 1 or unset, got '", value, "'");
  return value[0] == '1';
}

// Every host read of index data goes through here, and is counted (simulator_counters()["host_index_reads"]),
// so a test can prove that with data checks off no op reads index data on the host.
inline std::atomic<int64_t>& host_index_reads() {
  static std::atomic<int64_t> reads{0};
  return reads;
}

inline at::Tensor host_ints(const at::Tensor& index) {   // index: from index_tensor()
  ++host_index_reads();
  return index.to(at::kCPU);
}

// A paged cache [num_blocks, block_size, Hkv, D] and the table of each sequence's blocks [num_seqs,
// blocks_per_seq]: block_table, or cache_batch_idx [B] as a one-block-per-sequence table of a contiguous cache.
struct CacheGeometry {
  int64_t num_blocks, block_size, num_kv_heads, head_dim, num_seqs, blocks_per_seq;
  bool table_is_batch_idx;
  int64_t head_dim_v = 0;   // the V cache's (check_cache sets it)
  int64_t capacity() const { return blocks_per_seq * block_size; }   // slots per sequence
};

// The index tensors of one cache call, each from index_tensor(); kv_start undefined when absent.
struct CacheIndices {
  at::Tensor table, seqlens, kv_start;
};

// Two new tokens bound for one cache slot (sequences sharing a block) would race, one write silently lost.
// cached / entries: host copies of cache_seqlens and the table, every slot already inside the cache.
inline void check_distinct_write_slots(const int32_t* cached, const int32_t* entries, int64_t new_tokens,
                                       const CacheGeometry& g) {
  std::vector<std::pair<int64_t, int64_t>> slots;   // (cache slot, sequence)
  for (int64_t seq = 0; seq < g.num_seqs && new_tokens > 0; ++seq) {
    for (int64_t pos = cached[seq]; pos < cached[seq] + new_tokens; ++pos)
      slots.push_back({entries[seq * g.blocks_per_seq + pos / g.block_size] * g.block_size + pos % g.block_size, seq});
  }
  std::sort(slots.begin(), slots.end());
  for (size_t i = 1; i < slots.size(); ++i)
    TORCH_CHECK_VALUE(slots[i].first != slots[i - 1].first, g.table_is_batch_idx ? "cache_batch_idx" : "block_table",
                      ": sequences ", slots[i - 1].second, " and ", slots[i].second, " both append to block ",
                      slots[i].first / g.block_size, ", slot ", slots[i].first % g.block_size,
                      "; new tokens need distinct cache slots");
}

// The table entries of sequence seq's positions [first, end) (host copy `entries`) name blocks (rows) of the cache.
inline void check_table_blocks(const int32_t* entries, int64_t seq, int64_t first, int64_t end, const CacheGeometry& g) {
  for (int64_t b = first < end ? first / g.block_size : 1, last = first < end ? (end - 1) / g.block_size : 0;
       b <= last; ++b) {   // no division when nothing is in use: a cache may have 0 slots per block
    const int32_t block = entries[seq * g.blocks_per_seq + b];
    if (g.table_is_batch_idx) {
      TORCH_CHECK_VALUE(block >= 0 && block < g.num_blocks, "cache_batch_idx[", seq, "] = ", block,
                        " is not a row of k_cache (0 <= row < ", g.num_blocks, ")");
    } else {
      TORCH_CHECK_VALUE(block >= 0 && block < g.num_blocks, "block_table[", seq, ", ", b, "] = ", block,
                        " is not a block of the cache (0 <= block < ", g.num_blocks, ")");
    }
  }
}

// Paged prefill: sequence seq reads keys at positions [0, key_counts[seq]) of its block_table row (counts_name: the
// argument the counts come from). One host read of the table.
inline void check_paged_keys(const std::vector<int64_t>& key_counts, const char* counts_name, const at::Tensor& table,
                             const CacheGeometry& g) {
  const at::Tensor host = host_ints(table);
  const int32_t* entries = host.data_ptr<int32_t>();
  for (int64_t seq = 0; seq < g.num_seqs; ++seq) {
    TORCH_CHECK_VALUE(key_counts[seq] <= g.capacity(), "block_table is too narrow: ", counts_name, " gives sequence ",
                      seq, " ", key_counts[seq], " keys, but a row of ", g.blocks_per_seq, " blocks x ", g.block_size,
                      " slots holds ", g.capacity(), "; pass a table with at least ",
                      g.block_size > 0 ? (key_counts[seq] + g.block_size - 1) / g.block_size : 0, " blocks per row");
    check_table_blocks(entries, seq, 0, key_counts[seq], g);
  }
}

// Data checks with one host read of each index tensor: for every sequence, the new tokens' slots
// [cache_seqlens, cache_seqlens + new_tokens) and, when `attends`, the keys [kv_start, cache_seqlens +
// new_tokens) lie inside the sequence's table row and in blocks of the cache. Returns the longest key range.
inline int64_t check_cache_indices(const CacheIndices& idx, int64_t new_tokens, bool attends, const CacheGeometry& g) {
  const at::Tensor seqlens = host_ints(idx.seqlens), table = host_ints(idx.table);
  const at::Tensor starts = attends && idx.kv_start.defined() ? host_ints(idx.kv_start) : at::Tensor();
  const int32_t* cached = seqlens.data_ptr<int32_t>();
  const int32_t* entries = table.data_ptr<int32_t>();
  int64_t longest = 0;
  for (int64_t seq = 0; seq < g.num_seqs; ++seq) {
    const int64_t end = int64_t(cached[seq]) + new_tokens;
    TORCH_CHECK_VALUE(cached[seq] >= 0 && end <= g.capacity(), "cache_seqlens[", seq, "] = ", cached[seq], " + ",
                      new_tokens, " new tokens does not fit the ", g.capacity(), " slots a sequence has in the cache (",
                      g.table_is_batch_idx ? "k_cache.shape[1]" : "max_blocks x block_size", ")");
    const int64_t start = starts.defined() ? starts.data_ptr<int32_t>()[seq] : 0;
    TORCH_CHECK_VALUE(start >= 0 && start <= end, "cache_leftpad[", seq, "] = ", start, " must be in [0, ", end, "]");
    check_table_blocks(entries, seq, attends ? std::min<int64_t>(start, cached[seq]) : cached[seq], end, g);
    if (attends) longest = std::max(longest, end - start);
  }
  check_distinct_write_slots(cached, entries, new_tokens, g);
  return longest;
}

}  // namespace metal_flash_sdpa
