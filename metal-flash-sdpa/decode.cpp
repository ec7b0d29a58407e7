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
  int64_t num_splits;               // 0: heuristic (decode_partition_size)
  bool has_kv_start;
  int64_t new_keys;                 // appended by this call, on top of the seqlens buffer
  int64_t gpu_cores;                // of the device (dispatch.h), for the heuristic
};

struct DecodePlan {
  KernelLaunch attention;
  bool split;                       // true: run `reduce` after `attention`
  KernelLaunch reduce;
  int64_t num_partitions;
};

// Split-K scratch per partition: fp32 max, sum and DV outputs for every (sequence, head, new token).
int64_t scratch_bytes_per_partition(const AttentionTensors& t, int64_t seqlen_q) {
  return t.num_seqs * t.num_heads * seqlen_q * (t.value_head_dim() + 2) * int64_t(sizeof(float));
}

// Query rows per KV head (its heads x the new tokens), and how a threadgroup takes them.
struct DecodeRows {
  int64_t chunks;                   // threadgroups per (sequence, KV head, partition)
  int64_t per_threadgroup;
  int64_t threads;                  // a simdgroup per 8 rows, times the key slices or the head parts
};

DecodeRows decode_rows(const AttentionTensors& t, int64_t seqlen_q) {
  const int64_t rows = t.num_heads / t.num_kv_heads * seqlen_q;
  const int64_t per_threadgroup = std::min<int64_t>(rows, DECODE_MAX_ROWS);
  return {ceil_div(rows, DECODE_MAX_ROWS), per_threadgroup,
          32 * ceil_div(per_threadgroup, 8) * DECODE_KEY_SLICES(per_threadgroup, t.head_dim) *
              HEAD_PARTS(t.value_head_dim())};
}

// Keys one query row can see at most: the window's span, else all of them.
int64_t visible_keys(const AttentionOptions& o, int64_t seqlen_q, int64_t max_keys) {
  if (o.window_left < 0) return max_keys;
  const int64_t right = o.causal ? 0 : o.window_right < 0 ? max_keys : o.window_right;
  return std::min(max_keys, o.window_left + right + seqlen_q);
}

// num_splits = 0: the partition size (whole K tiles) with the least waves x (keys + fixed work) over the GPU's
// threadgroup slots, the fewest partitions among equals (less scratch, a shorter reduce). At B = 1 this spreads one
// sequence's keys over every core; with many sequences and heads it splits little or not at all, and it avoids a
// last wave that is almost empty (a fixed 256-key partition left 256 threadgroups for 240 slots at B=1, 8k keys).
int64_t decode_partition_size(const DecodeProblem& pb, int64_t visible, int64_t tile) {
  const AttentionTensors& t = pb.tensors;
  const DecodeRows rows = decode_rows(t, pb.seqlen_q);
  const int64_t slots = threadgroup_slots(pb.gpu_cores, DECODE_THREADGROUP_BYTES(element_bytes(t.dtype), t.head_dim,
                                                                                 t.value_head_dim()),
                                          rows.threads);
  const int64_t items = t.num_seqs * t.num_kv_heads * rows.chunks;
  const int64_t most = std::min(kDecodeMaxPartitions, ceil_div(visible, tile));
  int64_t best_size = ceil_div(visible, tile) * tile, best_cost = std::numeric_limits<int64_t>::max();
  for (int64_t splits = 1; splits <= most; ++splits) {
    const int64_t size = ceil_div(ceil_div(visible, splits), tile) * tile;   // whole tiles: maybe fewer partitions
    const int64_t cost = ceil_div(items * ceil_div(visible, size), slots) * (size + kDecodePartitionOverheadKeys);
    if (cost < best_cost) best_cost = cost, best_size = size;
  }
  return best_size;
}

DecodePlan plan_decode(const DecodeProblem& pb, DecodeParams* params) {
  const AttentionTensors& t = pb.tensors;
  const int64_t tile = KV_TILE_KEYS(t.head_dim);
  const int64_t max_keys = std::max<int64_t>(pb.max_seqlen_k, 1);
  // At most kDecodeMaxPartitions partitions and kDecodeScratchBytes of scratch (fewer, longer partitions past
  // that: the grid already holds many threadgroups when the scratch is large), whatever num_splits says.
  const int64_t max_partitions = std::max<int64_t>(
      1, std::min(kDecodeMaxPartitions, kDecodeScratchBytes / std::max<int64_t>(scratch_bytes_per_partition(t, pb.seqlen_q), 1)));
  // Partition size: the heuristic's, or max_keys / num_splits; always whole K tiles. num_splits is clamped first
  // so the ceil-division cannot overflow (2^63 - 1 splits).
  const int64_t splits = std::min(pb.num_splits, max_keys);
  const int64_t wanted = splits > 0 ? ceil_div(max_keys, splits)
                                    : decode_partition_size(pb, visible_keys(pb.options, pb.seqlen_q, max_keys), tile);
  const int64_t partition = ceil_div(std::max(wanted, ceil_div(max_keys, max_partitions)), tile) * tile;
  const int64_t partitions = ceil_div(max_keys, partition);

  *params = DecodeParams{};
  params->shape = attention_shape(t);
  params->mask = mask_params(pb.options);
  params->seqlen_q = int32_t(pb.seqlen_q);
  params->block_size = fast_divisor(std::max<int64_t>(pb.block_size, 1));
  params->num_blocks = int32_t(pb.num_blocks);
  params->blocks_per_seq = int32_t(pb.blocks_per_seq);
  params->partition_size = int32_t(partition);
  params->num_partitions = int32_t(partitions);
  params->has_kv_start = pb.has_kv_start;
  params->new_keys = int32_t(pb.new_keys);
  params->query_group = int32_t(t.num_heads / t.num_kv_heads);

  DecodePlan plan;
  plan.num_partitions = partitions;
  plan.split = partitions > 1;
  const DecodeRows rows = decode_rows(t, pb.seqlen_q);
  KernelLaunch& attention = plan.attention;
  attention.kernel = kernel_name("attention_decode", t.dtype, t.head_dim, t.value_head_dim());
  attention.threadgroups[0] = uint32_t(partitions);
  attention.threadgroups[1] = uint32_t(t.num_kv_heads * rows.chunks);
  attention.threadgroups[2] = uint32_t(t.num_seqs);
  attention.threads_per_threadgroup = uint32_t(rows.threads);
  attention.constants = mask_constants(pb.options);
  attention.constants.push_back({FC_SPLIT_K, plan.split});
  attention.constants.push_back(kv_vector_constant(t));
  attention.constants.push_back(v_in_k_tile_constant(t));
  if (plan.split) {
    KernelLaunch& reduce = plan.reduce;
    reduce.kernel = kernel_name("attention_decode_reduce", t.dtype, t.value_head_dim());
    reduce.threadgroups[0] = uint32_t(pb.seqlen_q);
    reduce.threadgroups[1] = uint32_t(t.num_heads);
    reduce.threadgroups[2] = uint32_t(t.num_seqs);
    reduce.threads_per_threadgroup = DECODE_REDUCE_THREADS;
    reduce.constants = attention.constants;
  }
  return plan;
}

// What the checks learn about a decode call, and its index tensors as the kernels read them.
struct DecodeArgs {
  CacheGeometry cache;
  CacheIndices indices;
  int64_t seqlen_q, num_heads, new_tokens;
  AttentionOptions options;
  KvQuant quant;
};

// The block table: block_table (paged cache), else cache_batch_idx or rows 0..B-1 of a contiguous cache [B, S,
// Hkv, D] as a one-block-per-sequence table [B, 1].
at::Tensor decode_table(const at::Tensor& q, const at::Tensor& k_cache, const std::optional<at::Tensor>& block_table,
                        const std::optional<at::Tensor>& cache_batch_idx, const std::optional<at::Tensor>& kv_start) {
  const int64_t batch = q.size(0);
  if (block_table) {
    TORCH_CHECK_NOT_IMPLEMENTED(!cache_batch_idx, "cache_batch_idx with a paged cache: index block_table instead");
    TORCH_CHECK_NOT_IMPLEMENTED(!kv_start, "cache_leftpad with a paged cache: start block_table at the first block "
                                "instead");
    return index_tensor(*block_table, "block_table", q);
  }
  if (cache_batch_idx) {
    TORCH_CHECK_VALUE(cache_batch_idx->dim() == 1 && cache_batch_idx->size(0) == batch,
                      "cache_batch_idx must be [batch] = [", batch, "], got shape ", cache_batch_idx->sizes());
    return index_tensor(*cache_batch_idx, "cache_batch_idx", q).view({batch, 1});
  }
  TORCH_CHECK_VALUE(k_cache.dim() != 4 || batch <= k_cache.size(0), "q has batch size ", batch, " but k_cache has ",
                    k_cache.size(0), " rows; pass cache_batch_idx to pick the cache row of each sequence");
  return contiguous_cache_table(batch, q);
}

DecodeArgs check_decode_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const std::optional<at::Tensor>& k_new, const std::optional<at::Tensor>& v_new,
                             const std::optional<at::Tensor>& block_table,
                             const std::optional<at::Tensor>& cache_batch_idx,
                             const std::optional<at::Tensor>& cache_seqlens, const std::optional<at::Tensor>& kv_start,
                             int64_t num_splits, std::optional<double> softmax_scale, bool causal, int64_t window_left,
                             int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes,
                             const std::optional<at::Tensor>& s_aux, const KvQuantArgs& quant_args) {
  element_type(q, "q");
  TORCH_CHECK_VALUE(q.dim() == 4, "q must be [batch, seqlen_q, heads, head_dim], got shape ", q.sizes());
  const at::Tensor table = decode_table(q, k_cache, block_table, cache_batch_idx, kv_start);
  KvQuant quant;
  const CacheGeometry c = check_cache(k_cache, v_cache, table, !block_table, q, "q", quant_args, &quant, true);
  TORCH_CHECK_VALUE(q.size(0) == c.num_seqs, "q has batch size ", q.size(0), " but block_table has ", c.num_seqs,
                    " rows");
  TORCH_CHECK_VALUE(q.size(3) == c.head_dim, "q has head_dim ", q.size(3), " but the cache has ", c.head_dim);
  TORCH_CHECK_VALUE(q.size(1) >= 1, "q needs at least one new token per sequence, got seqlen_q = ", q.size(1));
  const int64_t H = q.size(2);
  // A KV head's query rows (its heads x the new tokens) are counted in int32 by the shader and the grid.
  TORCH_CHECK_NOT_IMPLEMENTED(H * q.size(1) <= std::numeric_limits<int32_t>::max(),
                              "more than 2^31 - 1 query rows (heads x new tokens) per call");
  check_forward_heads(H, c.num_kv_heads, c.head_dim, c.head_dim_v, "v_cache");
  CacheIndices indices{table,
                       cache_seqlens ? per_sequence_index(*cache_seqlens, "cache_seqlens", c.num_seqs, q)
                                     : at::full({c.num_seqs}, c.capacity(), q.options().dtype(at::kInt)),
                       kv_start ? per_sequence_index(*kv_start, "cache_leftpad", c.num_seqs, q) : at::Tensor()};
  TORCH_CHECK_VALUE(num_splits >= 0, "num_splits must be >= 0 (0: heuristic), got ", num_splits);
  TORCH_CHECK_VALUE(k_new.has_value() == v_new.has_value(), "pass both k and v (new tokens to append) or neither");
  TORCH_CHECK_VALUE(!k_new || cache_seqlens, "pass cache_seqlens with k and v: the new tokens are written at "
                    "cache_seqlens[b] (the tokens already in the cache)");
  TORCH_CHECK_NOT_IMPLEMENTED(!k_new || c.head_dim_v == c.head_dim, "appending k and v (new tokens) to caches of "
                              "different head dims (k_cache ", c.head_dim, ", v_cache ", c.head_dim_v, ") is not "
                              "supported; write the new tokens into the cache first and count them in cache_seqlens");
  if (k_new) check_new_tokens(*k_new, *v_new, q, c);
  // A sequence has at most capacity keys; the new queries are the last seqlen_q of them.
  const AttentionOptions options = check_attention_options(q, c.num_seqs, H, c.head_dim, q.size(1), c.capacity(),
                                                           softmax_scale, causal, window_left, window_right, softcap,
                                                           alibi_slopes, s_aux);
  return {c, indices, q.size(1), H, k_new ? k_new->size(1) : 0, options, quant};
}

// out [B, Sq, H, DV] (V's head dim, as flash-attn 3) and the LSE.
std::tuple<at::Tensor, at::Tensor> decode_outputs(const at::Tensor& q, int64_t head_dim_v) {
  return {at::empty({q.size(0), q.size(1), q.size(2), head_dim_v}, q.options()),
          at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat))};
}

}  // namespace

std::vector<int64_t> decode_split(int64_t batch, int64_t num_heads, int64_t num_kv_heads, int64_t seqlen_q,
                                  int64_t head_dim, int64_t element_bytes, int64_t max_keys, int64_t window_left,
                                  int64_t num_splits, int64_t gpu_cores, int64_t head_dim_v) {
  head_dim_v = head_dim_v > 0 ? head_dim_v : head_dim;
  TORCH_CHECK_VALUE(batch > 0 && num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0 && seqlen_q > 0 &&
                        is_supported_forward_head_dims(head_dim, head_dim_v) && (element_bytes == 2 || element_bytes == 4) &&
                        max_keys > 0 && num_splits >= 0 && gpu_cores >= 0,
                    "decode_split: sizes must be positive, num_heads a multiple of num_kv_heads, head_dim supported, "
                    "element_bytes 2 or 4, num_splits and gpu_cores >= 0");
  DecodeProblem pb{};
  pb.tensors.dtype = element_bytes == 4 ? ElementType::Float32 : ElementType::Float16;
  pb.tensors.num_seqs = batch;
  pb.tensors.num_heads = num_heads;
  pb.tensors.num_kv_heads = num_kv_heads;
  pb.tensors.head_dim = head_dim;
  pb.tensors.head_dim_v = head_dim_v;
  pb.options.causal = true;
  pb.options.window_left = window_left;
  pb.options.window_right = window_left < 0 ? -1 : 0;
  pb.seqlen_q = seqlen_q;
  pb.max_seqlen_k = max_keys;
  pb.num_splits = num_splits;
  pb.gpu_cores = gpu_cores > 0 ? gpu_cores : gpu_core_count();
  DecodeParams params;
  const DecodePlan plan = plan_decode(pb, &params);
  return {plan.num_partitions, params.partition_size,
          plan.split ? scratch_bytes_per_partition(pb.tensors, seqlen_q) * plan.num_partitions : 0};
}

void run_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& table,
                const at::Tensor& seqlens_k, int64_t new_keys, const at::Tensor& kv_start, int64_t max_keys,
                int64_t num_splits, const AttentionOptions& options, const std::optional<at::Tensor>& alibi_slopes,
                const std::optional<at::Tensor>& s_aux, const at::Tensor& out, const at::Tensor& lse,
                const KvQuant& quant) {
  DecodeProblem pb{};
  pb.tensors = {element_type(q, "q"), q.size(0), q.size(2), k_cache.size(2), q.size(3),
                token_strides(q, false), token_strides(k_cache, false), token_strides(v_cache, false),
                token_strides(out, false), {lse.stride(0), lse.stride(1), lse.stride(2)},
                rows_aligned_16(k_cache) && rows_aligned_16(v_cache), out.size(3),
                !quant.quantized() && v_in_k_rows(k_cache, v_cache)};   // a quantized V has scales of its own
  pb.options = options;
  pb.seqlen_q = q.size(1);
  pb.block_size = k_cache.size(1);
  pb.num_blocks = k_cache.size(0);
  pb.blocks_per_seq = table.size(1);
  pb.max_seqlen_k = max_keys;
  pb.num_splits = num_splits;
  pb.has_kv_start = kv_start.defined();
  pb.new_keys = new_keys;
  pb.gpu_cores = gpu_core_count();

  DecodeParams params;
  DecodePlan plan = plan_decode(pb, &params);
  plan.attention.constants.push_back(kv_quant_constant(quant));
  const KvQuantParams quant_params = kv_quant_params(quant);
  const ScoreInputs extras = score_inputs(s_aux, alibi_slopes);
  const int64_t partials = plan.split ? q.size(0) * q.size(2) * q.size(1) * plan.num_partitions : 0;
  const auto partial = [&](int64_t size) {
    return plan.split ? at::empty({size}, q.options().dtype(at::kFloat)) : at::Tensor();
  };
  const at::Tensor partial_max = partial(partials), partial_sum = partial(partials);
  const at::Tensor partial_out = partial(partials * out.size(3));
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
      bind_tensor(DECODE_BUFFER_BLOCK_TABLE, table),
      bind_tensor(DECODE_BUFFER_SEQLENS_K, seqlens_k),
      bind_optional(DECODE_BUFFER_KV_START, kv_start),
      bind_optional(DECODE_BUFFER_ALIBI, extras.slopes),
  });
  for (BufferBinding& b : kv_quant_bindings(quant, quant_params, DECODE_BUFFER_K_SCALES)) attention.push_back(b);
  dispatch(plan.attention, attention);
  if (plan.split) dispatch(plan.reduce, shared);
}

std::tuple<at::Tensor, at::Tensor> flash_attn_decode(
    const at::Tensor& q_in, at::Tensor& k_cache, at::Tensor& v_cache, const std::optional<at::Tensor>& k_new,
    const std::optional<at::Tensor>& v_new, const std::optional<at::Tensor>& block_table,
    const std::optional<at::Tensor>& cache_batch_idx, const std::optional<at::Tensor>& cache_seqlens,
    const std::optional<at::Tensor>& kv_start, int64_t num_splits, std::optional<double> softmax_scale, bool causal,
    int64_t window_left, int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& s_aux, const std::optional<at::Tensor>& k_scales,
    const std::optional<at::Tensor>& k_biases, const std::optional<at::Tensor>& v_scales,
    const std::optional<at::Tensor>& v_biases, int64_t k_bits, int64_t v_bits, int64_t group_size,
    const std::optional<at::Tensor>& k_descale, const std::optional<at::Tensor>& v_descale) {
  const KvQuantArgs quant_args{k_scales, k_biases, v_scales, v_biases, k_bits, v_bits, group_size, k_descale, v_descale};
  // Every check runs before the append, so a rejected call leaves the cache as it was.
  const DecodeArgs a = check_decode_args(q_in, k_cache, v_cache, k_new, v_new, block_table, cache_batch_idx,
                                         cache_seqlens, kv_start, num_splits, softmax_scale, causal, window_left,
                                         window_right, softcap, alibi_slopes, s_aux, quant_args);
  // Unread lengths: the partitions cover the whole table (their count and the scratch are capped anyway).
  const int64_t max_keys = data_checks_enabled(q_in) ? check_cache_indices(a.indices, a.new_tokens, true, a.cache)
                                                     : a.cache.capacity();
  if (k_new) write_new_tokens(*k_new, *v_new, k_cache, v_cache, a.indices, a.cache, a.quant);
  auto [out, lse] = decode_outputs(q_in, a.cache.head_dim_v);
  if (a.cache.num_seqs == 0 || a.num_heads == 0) return {out, lse};
  run_decode(unit_stride_head_dim(q_in), k_cache, v_cache, a.indices.table, a.indices.seqlens, a.new_tokens,
             a.indices.kv_start, max_keys, num_splits, a.options, alibi_slopes, s_aux, out, lse, a.quant);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> flash_attn_decode_meta(
    const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache, const std::optional<at::Tensor>& k_new,
    const std::optional<at::Tensor>& v_new, const std::optional<at::Tensor>& block_table,
    const std::optional<at::Tensor>& cache_batch_idx, const std::optional<at::Tensor>& cache_seqlens,
    const std::optional<at::Tensor>& kv_start, int64_t num_splits, std::optional<double> softmax_scale, bool causal,
    int64_t window_left, int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& s_aux, const std::optional<at::Tensor>& k_scales,
    const std::optional<at::Tensor>& k_biases, const std::optional<at::Tensor>& v_scales,
    const std::optional<at::Tensor>& v_biases, int64_t k_bits, int64_t v_bits, int64_t group_size,
    const std::optional<at::Tensor>& k_descale, const std::optional<at::Tensor>& v_descale) {
  const KvQuantArgs quant_args{k_scales, k_biases, v_scales, v_biases, k_bits, v_bits, group_size, k_descale, v_descale};
  const DecodeArgs a = check_decode_args(q, k_cache, v_cache, k_new, v_new, block_table, cache_batch_idx, cache_seqlens,
                                         kv_start, num_splits, softmax_scale, causal, window_left, window_right, softcap,
                                         alibi_slopes, s_aux, quant_args);
  return decode_outputs(q, a.cache.head_dim_v);
}

}  // namespace metal_flash_sdpa
