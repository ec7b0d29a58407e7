// KV-cache ops: the paged KV write and the Flash-Decoding attention over a paged cache (a contiguous cache
// [B, S, Hkv, D] is passed as S-slot blocks with a [B, 1] block table). Device-agnostic like attention.cpp.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "dispatch.h"
#include "launch_plan.h"
#include "op_checks.h"
#include "../torch-ext/torch_binding.h"

namespace metal_flash_sdpa {

namespace {

struct CacheGeometry {
  int64_t num_blocks, block_size, num_kv_heads, head_dim, num_seqs, blocks_per_seq;
};

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

void check_int32_per_sequence(const at::Tensor& t, const char* name, int64_t num_seqs, const at::Tensor& like) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, name, " must be torch.int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == num_seqs, name, " must be [batch] = [", num_seqs, "], got shape ",
                    t.sizes());
  check_same_device(t, like, name);
}

// Every block a sequence uses for positions [first, end) must exist in the cache.
void check_blocks_in_use(const at::Tensor& table, int64_t seq, int64_t first, int64_t end, const CacheGeometry& g) {
  if (end <= first) return;
  const int32_t* row = table.data_ptr<int32_t>() + seq * g.blocks_per_seq;
  for (int64_t b = first / g.block_size; b <= (end - 1) / g.block_size; ++b)
    TORCH_CHECK_VALUE(row[b] >= 0 && row[b] < g.num_blocks, "block_table[", seq, ", ", b, "] = ", row[b],
                      " is not a block of the cache (0 <= block < ", g.num_blocks, ")");
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

}  // namespace

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

namespace {

struct DecodeGeometry {
  CacheGeometry cache;
  int64_t seqlen_q, num_heads;
  AttentionOptions options;
};

DecodeGeometry check_decode_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const std::optional<at::Tensor>& k_new, const std::optional<at::Tensor>& v_new,
                                 const at::Tensor& block_table, const at::Tensor& seqlens_k,
                                 const std::optional<at::Tensor>& kv_start, int64_t num_splits, double softmax_scale,
                                 bool causal, int64_t window_left, int64_t window_right, double softcap,
                                 const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& s_aux) {
  element_type(q, "q");
  const CacheGeometry c = check_cache(k_cache, v_cache, block_table, q, "q");
  TORCH_CHECK_VALUE(q.dim() == 4, "q must be [batch, seqlen_q, heads, head_dim], got shape ", q.sizes());
  TORCH_CHECK_VALUE(q.size(0) == c.num_seqs, "q has batch size ", q.size(0), " but block_table has ", c.num_seqs,
                    " rows");
  TORCH_CHECK_VALUE(q.size(3) == c.head_dim, "q has head_dim ", q.size(3), " but the cache has ", c.head_dim);
  TORCH_CHECK_VALUE(q.size(1) >= 1, "q needs at least one new token per sequence, got seqlen_q = ", q.size(1));
  const int64_t H = q.size(2);
  check_heads(H, c.num_kv_heads, c.head_dim);
  check_int32_per_sequence(seqlens_k, "cache_seqlens", c.num_seqs, q);
  if (kv_start) check_int32_per_sequence(*kv_start, "cache_leftpad", c.num_seqs, q);
  TORCH_CHECK_VALUE(num_splits >= 0, "num_splits must be >= 0 (0: heuristic), got ", num_splits);
  const AttentionOptions options = check_attention_options(q, c.num_seqs, H, softmax_scale, causal, window_left,
                                                           window_right, softcap, alibi_slopes, s_aux);
  TORCH_CHECK_VALUE(k_new.has_value() == v_new.has_value(), "pass both k and v (new tokens to append) or neither");
  if (k_new) check_kv_write_args(*k_new, *v_new, k_cache, v_cache, block_table, seqlens_k);
  return {c, q.size(1), H, options};
}

std::tuple<at::Tensor, at::Tensor> decode_outputs(const at::Tensor& q) {
  return {at::empty(q.sizes(), q.options()),
          at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat))};
}

}  // namespace

void run_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                const at::Tensor& block_table, const at::Tensor& seqlens_k, const std::optional<at::Tensor>& kv_start,
                int64_t max_keys, int64_t num_splits,
                const AttentionOptions& options, const std::optional<at::Tensor>& alibi_slopes,
                const std::optional<at::Tensor>& s_aux, const at::Tensor& out, const at::Tensor& lse) {
  DecodeProblem pb{};
  pb.tensors = {element_type(q, "q"), q.size(0), q.size(2), k_cache.size(2), q.size(3),
                token_strides(q, false), token_strides(k_cache, false), token_strides(v_cache, false),
                token_strides(out, false), {lse.stride(0), lse.stride(1), lse.stride(2)}};
  pb.options = options;
  pb.seqlen_q = q.size(1);
  pb.block_size = k_cache.size(1);
  pb.num_blocks = k_cache.size(0);
  pb.blocks_per_seq = block_table.size(1);
  pb.max_seqlen_k = max_keys;
  pb.num_splits = num_splits;
  pb.has_kv_start = kv_start.has_value();

  DecodeParams params;
  const DecodePlan plan = plan_decode(pb, &params);
  const ScoreInputs extras = score_inputs(s_aux, alibi_slopes);
  const int64_t partials = plan.split ? q.size(0) * q.size(2) * q.size(1) * plan.num_partitions : 0;
  const auto partial = [&](int64_t size) {
    return plan.split ? at::empty({size}, q.options().dtype(at::kFloat)) : at::Tensor();
  };
  const at::Tensor partial_max = partial(partials), partial_sum = partial(partials);
  const at::Tensor partial_out = partial(partials * q.size(3));
  const at::Tensor no_tensor;
  std::vector<BufferBinding> shared = {
      bind_bytes(DECODE_BUFFER_PARAMS, params),
      bind_optional(DECODE_BUFFER_SINKS, extras.sinks),
      bind_tensor(DECODE_BUFFER_OUT, out),
      bind_tensor(DECODE_BUFFER_LSE, lse),
      bind_optional(DECODE_BUFFER_PARTIAL_MAX, partial_max),
      bind_optional(DECODE_BUFFER_PARTIAL_SUM, partial_sum),
      bind_optional(DECODE_BUFFER_PARTIAL_OUT, partial_out),
  };
  std::vector<BufferBinding> attention = shared;
  attention.insert(attention.end(), {
      bind_tensor(DECODE_BUFFER_Q, q),
      bind_tensor(DECODE_BUFFER_K_CACHE, k_cache),
      bind_tensor(DECODE_BUFFER_V_CACHE, v_cache),
      bind_tensor(DECODE_BUFFER_BLOCK_TABLE, block_table),
      bind_tensor(DECODE_BUFFER_SEQLENS_K, seqlens_k),
      bind_optional(DECODE_BUFFER_KV_START, kv_start ? *kv_start : no_tensor),
      bind_optional(DECODE_BUFFER_ALIBI, extras.slopes),
  });
  dispatch(plan.attention, attention);
  if (plan.split) dispatch(plan.reduce, shared);
}

std::tuple<at::Tensor, at::Tensor> flash_attn_decode(
    const at::Tensor& q_in, at::Tensor& k_cache, at::Tensor& v_cache, const std::optional<at::Tensor>& k_new,
    const std::optional<at::Tensor>& v_new, const at::Tensor& block_table, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& kv_start, int64_t num_splits, double softmax_scale, bool causal,
    int64_t window_left, int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& s_aux) {
  // Every check runs before the append, so a rejected call leaves the cache as it was.
  const DecodeGeometry g = check_decode_args(q_in, k_cache, v_cache, k_new, v_new, block_table, cache_seqlens, kv_start,
                                             num_splits, softmax_scale, causal, window_left, window_right, softcap,
                                             alibi_slopes, s_aux);
  const CacheGeometry& c = g.cache;
  const int64_t new_tokens = k_new ? k_new->size(1) : 0;
  const int64_t capacity = c.blocks_per_seq * c.block_size;
  int64_t max_keys = capacity;   // when the lengths are not read, the partitions cover the whole table
  if (data_checks_enabled()) {
    if (k_new) check_write_slots(block_table, cache_seqlens, new_tokens, c);
    const at::Tensor cached = host_ints(cache_seqlens), table = host_ints(block_table);
    const at::Tensor starts = kv_start ? host_ints(*kv_start) : at::Tensor();
    max_keys = 0;
    for (int64_t seq = 0; seq < c.num_seqs; ++seq) {
      const int64_t end = cached.data_ptr<int32_t>()[seq] + new_tokens;
      TORCH_CHECK_VALUE(end >= 0 && end <= capacity, "cache_seqlens[", seq, "] = ", end,
                        " is outside the cache: a sequence has ", capacity, " slots (max_blocks x block_size)");
      const int64_t start = kv_start ? starts.data_ptr<int32_t>()[seq] : 0;
      TORCH_CHECK_VALUE(start >= 0 && start <= end, "cache_leftpad[", seq, "] = ", start, " must be in [0, ", end, "]");
      check_blocks_in_use(table, seq, start, end, c);
      max_keys = std::max(max_keys, end - start);
    }
  }
  if (k_new) write_new_tokens(*k_new, *v_new, k_cache, v_cache, block_table, cache_seqlens, c);
  auto [out, lse] = decode_outputs(q_in);
  if (c.num_seqs == 0 || g.num_heads == 0) return {out, lse};
  const at::Tensor seqlens_k = new_tokens ? cache_seqlens + new_tokens : cache_seqlens;
  run_decode(unit_stride_head_dim(q_in), k_cache, v_cache, block_table, seqlens_k, kv_start, max_keys, num_splits,
             g.options, alibi_slopes, s_aux, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> flash_attn_decode_meta(
    const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache, const std::optional<at::Tensor>& k_new,
    const std::optional<at::Tensor>& v_new, const at::Tensor& block_table, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& kv_start, int64_t num_splits, double softmax_scale, bool causal,
    int64_t window_left, int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& s_aux) {
  check_decode_args(q, k_cache, v_cache, k_new, v_new, block_table, cache_seqlens, kv_start, num_splits, softmax_scale,
                    causal, window_left, window_right, softcap, alibi_slopes, s_aux);
  return decode_outputs(q);
}

}  // namespace metal_flash_sdpa
