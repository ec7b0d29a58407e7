// The decode op (decode.metal): Flash-Decoding over a paged cache (a contiguous cache [B, S, Hkv, D] is passed
// as S-slot blocks with a [B, 1] block table), with an optional append of new tokens first (kv_cache_write).
// Device-agnostic like prefill.cpp.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "../torch-ext/torch_binding.h"
#include "attention_options.h"
#include "decode.h"
#include "dispatch.h"
#include "index_checks.h"
#include "kv_cache_write.h"
#include "launch.h"
#include "tensor_checks.h"

namespace metal_flash_sdpa {

namespace {

// One decode step over a paged cache (a contiguous cache is one block of S slots per sequence).
struct DecodeProblem {
  AttentionTensors tensors;
  AttentionOptions options;
  int64_t seqlen_q;                 // new query tokens per sequence
  int64_t block_size, num_blocks, blocks_per_seq;
  int64_t max_seqlen_k;             // longest key range, sizes the partitions (capacity when unknown)
  int64_t num_splits;               // 0: heuristic (DECODE_PARTITION_SIZE keys per partition)
  bool has_kv_start;
};

struct DecodePlan {
  KernelLaunch attention;
  bool split;                       // true: run `reduce` after `attention`
  KernelLaunch reduce;
  int64_t num_partitions;
};

DecodePlan plan_decode(const DecodeProblem& pb, DecodeParams* params) {
  const AttentionTensors& t = pb.tensors;
  const int64_t tile = KV_TILE_KEYS(t.head_dim);
  const int64_t max_keys = std::max<int64_t>(pb.max_seqlen_k, 1);
  // Partition size: DECODE_PARTITION_SIZE keys, or max_keys / num_splits; always whole K tiles.
  const int64_t partition =
      ceil_div(pb.num_splits > 0 ? ceil_div(max_keys, pb.num_splits) : DECODE_PARTITION_SIZE, tile) * tile;
  const int64_t partitions = ceil_div(max_keys, partition);

  *params = DecodeParams{};
  params->shape = attention_shape(t);
  params->mask = mask_params(pb.options);
  params->seqlen_q = int32_t(pb.seqlen_q);
  params->block_size = int32_t(pb.block_size);
  params->num_blocks = int32_t(pb.num_blocks);
  params->blocks_per_seq = int32_t(pb.blocks_per_seq);
  params->partition_size = int32_t(partition);
  params->num_partitions = int32_t(partitions);
  params->has_kv_start = pb.has_kv_start;

  DecodePlan plan;
  plan.num_partitions = partitions;
  plan.split = partitions > 1;
  const int64_t rows = t.num_heads / t.num_kv_heads * pb.seqlen_q;   // query rows per KV head
  const int64_t row_chunks = ceil_div(rows, DECODE_MAX_ROWS);
  const int64_t rows_per_threadgroup = std::min<int64_t>(rows, DECODE_MAX_ROWS);
  KernelLaunch& attention = plan.attention;
  attention.kernel = kernel_name("attention_decode", t.dtype, t.head_dim);
  attention.threadgroups[0] = uint32_t(partitions);
  attention.threadgroups[1] = uint32_t(t.num_kv_heads * row_chunks);
  attention.threadgroups[2] = uint32_t(t.num_seqs);
  attention.threads_per_threadgroup = uint32_t(32 * ceil_div(rows_per_threadgroup, 8));   // a simdgroup per 8 rows
  attention.constants = mask_constants(pb.options);
  attention.constants.push_back({FC_SPLIT_K, plan.split});
  if (plan.split) {
    KernelLaunch& reduce = plan.reduce;
    reduce.kernel = kernel_name("attention_decode_reduce", t.dtype, t.head_dim);
    reduce.threadgroups[0] = uint32_t(pb.seqlen_q);
    reduce.threadgroups[1] = uint32_t(t.num_heads);
    reduce.threadgroups[2] = uint32_t(t.num_seqs);
    reduce.threads_per_threadgroup = DECODE_REDUCE_THREADS;
    reduce.constants = attention.constants;
  }
  return plan;
}

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
