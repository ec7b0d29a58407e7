// The prefill op (prefill.metal), device-agnostic: validate the arguments (every message names the argument,
// the value and what is accepted), allocate the outputs, plan the launch and hand it to dispatch(). The meta
// kernel runs the same shape checks, so torch.compile reports bad input at trace time.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <algorithm>
#include <limits>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

#include "../torch-ext/torch_binding.h"
#include "attention_options.h"
#include "decode.h"
#include "dispatch.h"
#include "index_checks.h"
#include "launch.h"
#include "tensor_checks.h"

namespace metal_flash_sdpa {

namespace {

// One prefill call. Packed varlen: sequences laid out by cu_seqlens in [total, H, D] tensors (batch strides
// 0). Batched: uniform_seqlen_q/k >= 0 and tensors are [B, S, H, D] views. Paged (varlen): k/v are caches
// [num_blocks, block_size, Hkv, D] (strides {block, slot, head}) read through a block table.
struct PrefillProblem {
  AttentionTensors tensors;
  AttentionOptions options;
  int64_t total_q, total_k;                    // tokens per batch entry (packed: all tokens)
  int64_t uniform_seqlen_q, uniform_seqlen_k;  // -1 for varlen
  int64_t max_seqlen_q;                        // sizes the grid; longer sequences are still covered
  int64_t seqlen_q_gcd, seqlen_k_gcd;          // gcd of the sequence lengths (0: all empty): alignment
  bool paged, has_seqused_k;
  int64_t block_size, num_blocks, blocks_per_seq;   // paged
};

KernelLaunch plan_prefill(const PrefillProblem& pb, PrefillParams* params) {
  const AttentionTensors& t = pb.tensors;
  *params = PrefillParams{};
  params->shape = attention_shape(t);
  params->mask = mask_params(pb.options);
  params->total_q = int32_t(pb.total_q);
  params->total_k = int32_t(pb.total_k);
  params->uniform_seqlen_q = int32_t(pb.uniform_seqlen_q);
  params->uniform_seqlen_k = int32_t(pb.uniform_seqlen_k);
  params->block_size = fast_divisor(std::max<int64_t>(pb.block_size, 1));
  params->num_blocks = int32_t(pb.num_blocks);
  params->blocks_per_seq = int32_t(pb.blocks_per_seq);
  params->has_seqused_k = pb.has_seqused_k;

  KernelLaunch launch;
  launch.kernel = kernel_name("attention_prefill", t.dtype, t.head_dim, t.value_head_dim());
  launch.threadgroups[0] = uint32_t(std::max<int64_t>(ceil_div(pb.max_seqlen_q, PREFILL_BLOCK_Q), 1));
  launch.threadgroups[1] = uint32_t(t.num_heads);
  launch.threadgroups[2] = uint32_t(t.num_seqs);
  launch.threads_per_threadgroup = PREFILL_THREADS * HEAD_PARTS(t.value_head_dim());
  launch.constants = mask_constants(pb.options);
  launch.constants.push_back({FC_ALIGN_Q, pb.seqlen_q_gcd % PREFILL_BLOCK_Q == 0});
  launch.constants.push_back({FC_ALIGN_K, pb.seqlen_k_gcd % KV_TILE_KEYS(t.head_dim) == 0});
  launch.constants.push_back(kv_vector_constant(t));
  launch.constants.push_back(v_in_k_tile_constant(t));
  launch.constants.push_back({FC_PAGED_KV, pb.paged});
  return launch;
}

// What the shape checks learn about the call.
struct Geometry {
  bool varlen, paged;
  int64_t num_seqs, num_heads, num_kv_heads, head_dim, head_dim_v;   // head_dim: q's and k's; head_dim_v: v's and out's
  int64_t total_q, total_k;   // tokens per batch entry (varlen: all tokens; paged keys: a sequence's capacity)
  // Varlen: from index_tensor(), as the kernel reads them; cu_seqlens_k, block_table, seqused_k undefined if absent.
  at::Tensor cu_seqlens_q, cu_seqlens_k, block_table, seqused_k;
  CacheGeometry cache;        // paged
  AttentionOptions options;
};

// k/v [num_blocks, block_size, Hkv, D] as paged caches read through block_table (plain caches of q's dtype: the
// dtypes are checked before).
CacheGeometry check_paged_kv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
                             int64_t num_seqs) {
  const std::optional<at::Tensor> none;
  KvQuant plain;
  const CacheGeometry cache = check_cache(k, v, table, false, q, "q", {none, none, none, none, 0, 0, 0, none, none},
                                          &plain, true);
  TORCH_CHECK_VALUE(cache.num_seqs == num_seqs, "block_table has ", cache.num_seqs, " rows but cu_seqlens_q holds ",
                    num_seqs, " sequences; pass one row per sequence");
  return cache;
}

Geometry check_prefill_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& cu_seqlens_q,
                            const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                            int64_t max_seqlen_k, std::optional<double> softmax_scale, bool causal, int64_t window_left,
                            int64_t window_right, double softcap,
                            const std::optional<at::Tensor>& alibi_slopes,
                            const std::optional<at::Tensor>& s_aux, const std::optional<at::Tensor>& block_table,
                            const std::optional<at::Tensor>& seqused_k) {
  element_type(q, "q");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "q, k and v must have the same dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                   v.scalar_type());
  check_same_device(k, q, "k");
  check_same_device(v, q, "v");
  TORCH_CHECK_VALUE(cu_seqlens_q || (!block_table && !seqused_k), "block_table and seqused_k need the varlen layout: "
                    "pass cu_seqlens_q (q [total_tokens, heads, head_dim])");
  TORCH_CHECK_VALUE(cu_seqlens_q.has_value() == cu_seqlens_k.has_value() || (cu_seqlens_q && block_table && seqused_k),
                    "pass both cu_seqlens_q and cu_seqlens_k (varlen) or neither (batched); cu_seqlens_k may be None "
                    "only with block_table and seqused_k");
  Geometry g{};
  g.varlen = cu_seqlens_q.has_value();
  g.paged = block_table.has_value();
  const int64_t rank = g.varlen ? 3 : 4;
  const char* layout = g.varlen ? "[total_tokens, heads, head_dim]" : "[batch, seqlen, heads, head_dim]";
  TORCH_CHECK_VALUE(q.dim() == rank, "q must be ", layout, ", got shape ", q.sizes());
  if (g.paged) {
    TORCH_CHECK_VALUE(k.dim() == 4 && v.dim() == 4, "with block_table, k and v must be paged caches [num_blocks, "
                      "block_size, kv_heads, head_dim], got shapes ", k.sizes(), " and ", v.sizes());
  } else {
    TORCH_CHECK_VALUE(k.dim() == rank, "k must be ", layout, ", got shape ", k.sizes());
    TORCH_CHECK_VALUE(v.dim() == rank && v.sizes().slice(0, rank - 1) == k.sizes().slice(0, rank - 1),
                      "v must have the shape of k ", k.sizes(), " (its head dim may differ), got ", v.sizes());
  }
  g.head_dim = q.size(-1);
  g.head_dim_v = v.size(-1);
  g.num_heads = q.size(-2);
  g.num_kv_heads = k.size(-2);
  TORCH_CHECK_VALUE(k.size(-1) == g.head_dim, "k has head_dim ", k.size(-1), " but q has ", g.head_dim);
  if (g.varlen) {
    for (const auto& [cu, name] : {std::pair{&cu_seqlens_q, "cu_seqlens_q"}, std::pair{&cu_seqlens_k, "cu_seqlens_k"}})
      TORCH_CHECK_VALUE(!*cu || ((*cu)->dim() == 1 && (*cu)->size(0) >= 1), name, " must be 1-D [batch + 1], got "
                        "shape ", (*cu)->sizes());
    g.cu_seqlens_q = index_tensor(*cu_seqlens_q, "cu_seqlens_q", q);
    g.num_seqs = cu_seqlens_q->size(0) - 1;
    if (cu_seqlens_k) {
      g.cu_seqlens_k = index_tensor(*cu_seqlens_k, "cu_seqlens_k", q);
      TORCH_CHECK_VALUE(cu_seqlens_q->size(0) == cu_seqlens_k->size(0), "cu_seqlens_q has ", cu_seqlens_q->size(0),
                        " entries but cu_seqlens_k has ", cu_seqlens_k->size(0), "; both must be [batch + 1]");
    }
    if (seqused_k) g.seqused_k = per_sequence_index(*seqused_k, "seqused_k", g.num_seqs, q);
    g.total_q = q.size(0);
    g.total_k = k.size(0);
    if (g.paged) {
      g.block_table = index_tensor(*block_table, "block_table", q);
      g.cache = check_paged_kv(q, k, v, g.block_table, g.num_seqs);
      g.total_k = g.cache.capacity();
    }
  } else {
    TORCH_CHECK_VALUE(k.size(0) == q.size(0), "k has batch size ", k.size(0), " but q has ", q.size(0));
    g.num_seqs = q.size(0);
    g.total_q = q.size(1);
    g.total_k = k.size(1);
  }
  check_forward_heads(g.num_heads, g.num_kv_heads, g.head_dim, g.head_dim_v, "v");
  // Rows of a query block (up to PREFILL_BLOCK_Q past the last token) stay within the shaders' int32.
  constexpr int64_t int_max = std::numeric_limits<int32_t>::max(), max_tokens = int_max - PREFILL_BLOCK_Q;
  TORCH_CHECK_NOT_IMPLEMENTED(g.total_q <= max_tokens && g.total_k <= max_tokens && g.num_seqs <= int_max &&
                              g.num_heads <= int_max, "more than 2^31 - 33 tokens, or 2^31 - 1 sequences or heads");
  TORCH_CHECK_VALUE(max_seqlen_q >= -1 && max_seqlen_k >= -1, "max_seqlen_q / max_seqlen_k must be >= 0 (or -1: unknown), got ",
                    max_seqlen_q, " / ", max_seqlen_k);
  // The totals bound every sequence's length whatever cu_seqlens hold (the kernel clamps them to the totals).
  g.options = check_attention_options(q, g.num_seqs, g.num_heads, g.head_dim, g.total_q, g.total_k, softmax_scale,
                                      causal, window_left, window_right, softcap, alibi_slopes, s_aux);
  return g;
}

struct Seqlens {
  int64_t longest;
  int64_t gcd;   // of all lengths (0 when all are empty): lets the plan drop bounds checks
};

// Index data are data: with data checks on, cu_seqlens, seqused_k and block_table are read once on the host (small
// copies) so bad values get an error, not a wrong answer. The kernel clamps them as well, so nothing can index
// outside the tensors either way. Unknown lengths (checks off): the grid strides, no alignment assumed.
constexpr Seqlens kUnknownSeqlens{-1, 1};

// The sequence lengths in cu_seqlens (read on the host), checked: from 0, non-decreasing, up to `total` tokens
// (total < 0: paged keys, whose prefix sums count no tensor's tokens).
std::vector<int64_t> cu_seqlens_lengths(const at::Tensor& cu_seqlens, int64_t total, const char* name) {
  const at::Tensor host = host_ints(cu_seqlens);
  const int32_t* cu = host.data_ptr<int32_t>();
  const int64_t entries = host.size(0);
  TORCH_CHECK_VALUE(cu[0] == 0, name, "[0] must be 0, got ", cu[0]);
  std::vector<int64_t> lengths;
  for (int64_t i = 1; i < entries; ++i) {
    TORCH_CHECK_VALUE(cu[i] >= cu[i - 1], name, " must be non-decreasing, but ", name, "[", i, "] = ", cu[i],
                      " < ", name, "[", i - 1, "] = ", cu[i - 1]);
    lengths.push_back(int64_t(cu[i]) - cu[i - 1]);
  }
  TORCH_CHECK_VALUE(total < 0 || cu[entries - 1] == total, name, "[-1] = ", cu[entries - 1],
                    " must equal the number of tokens (", total, ")");
  return lengths;
}

Seqlens summarize(const std::vector<int64_t>& lengths, int64_t max_seqlen, const char* name, const char* max_name) {
  Seqlens s{0, 0};
  for (int64_t length : lengths) {
    s.longest = std::max(s.longest, length);
    s.gcd = std::gcd(s.gcd, length);
  }
  TORCH_CHECK_VALUE(max_seqlen < 0 || s.longest <= max_seqlen, max_name, " = ", max_seqlen,
                    " is smaller than the longest sequence in ", name, " (", s.longest, ")");
  return s;
}

// The keys of every sequence, checked: cu_seqlens_k's spans (up to the key tokens), or seqused_k's counts (>= 0;
// unpaged: within the spans); paged: within each block_table row, in blocks of the cache.
Seqlens check_key_lengths(const Geometry& g, int64_t max_seqlen_k) {
  const bool from_seqused = g.seqused_k.defined();
  std::vector<int64_t> lengths;
  if (!from_seqused || !g.paged) lengths = cu_seqlens_lengths(g.cu_seqlens_k, g.paged ? -1 : g.total_k, "cu_seqlens_k");
  if (from_seqused) {
    const at::Tensor host = host_ints(g.seqused_k);
    const int32_t* used = host.data_ptr<int32_t>();
    for (int64_t seq = 0; seq < g.num_seqs; ++seq) {
      TORCH_CHECK_VALUE(used[seq] >= 0, "seqused_k[", seq, "] = ", used[seq], " must be >= 0");
      TORCH_CHECK_VALUE(g.paged || used[seq] <= lengths[seq], "seqused_k[", seq, "] = ", used[seq], " is more than the ",
                        lengths[seq], " keys cu_seqlens_k gives sequence ", seq);
    }
    lengths.assign(used, used + g.num_seqs);
  }
  const char* name = from_seqused ? "seqused_k" : "cu_seqlens_k";
  if (g.paged) check_paged_keys(lengths, name, g.block_table, g.cache);
  return summarize(lengths, max_seqlen_k, name, "max_seqlen_k");
}

std::tuple<at::Tensor, at::Tensor> empty_outputs(const at::Tensor& q, const Geometry& g) {
  std::vector<int64_t> out_shape = q.sizes().vec();
  out_shape.back() = g.head_dim_v;   // out has V's head dim (flash-attn 3)
  at::Tensor out = at::empty(out_shape, q.options());
  at::Tensor lse = g.varlen ? at::empty({g.num_heads, g.total_q}, q.options().dtype(at::kFloat))
                            : at::empty({g.num_seqs, g.num_heads, g.total_q}, q.options().dtype(at::kFloat));
  return {out, lse};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> flash_attn_varlen(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, std::optional<double> softmax_scale, bool causal, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& s_aux, const std::optional<at::Tensor>& block_table,
    const std::optional<at::Tensor>& seqused_k) {
  const Geometry g = check_prefill_args(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                        softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, s_aux,
                                        block_table, seqused_k);
  Seqlens lengths_q{g.total_q, g.total_q}, lengths_k{g.total_k, g.total_k};
  if (g.varlen) {
    const bool checked = data_checks_enabled(q_in);
    lengths_q = checked ? summarize(cu_seqlens_lengths(g.cu_seqlens_q, g.total_q, "cu_seqlens_q"), max_seqlen_q,
                                    "cu_seqlens_q", "max_seqlen_q")
                        : kUnknownSeqlens;
    lengths_k = checked ? check_key_lengths(g, max_seqlen_k) : kUnknownSeqlens;
  }
  auto [out, lse] = empty_outputs(q_in, g);
  if (g.num_seqs == 0) {
    // No sequence, so no threadgroup: any tokens (unchecked cu_seqlens_q = [x]) are in no sequence and get what a
    // row without keys gets. With sequences the kernel writes such rows itself (prefill.metal).
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
  }
  if (g.num_seqs == 0 || g.num_heads == 0 || g.total_q == 0) return {out, lse};

  const at::Tensor q = unit_stride_head_dim(q_in), k = unit_stride_head_dim(k_in), v = unit_stride_head_dim(v_in);
  if (!g.varlen && g.total_q <= kDecodeMaxNewTokens && g.total_k > 0) {
    // Decode steps (generate() calls this with Sq = 1 < Sk): [B, Sk, Hkv, D] k/v are a cache of one Sk-slot
    // block per sequence, so the decode kernel's GQA packing and split-K apply. Indices are built here, on
    // the device, and valid by construction: no host round trip.
    const at::Tensor seqlens_k = at::full({g.num_seqs}, g.total_k, q.options().dtype(at::kInt));
    run_decode(q, k, v, contiguous_cache_table(g.num_seqs, q), seqlens_k, 0, at::Tensor(), g.total_k, 0, g.options,
               alibi_slopes, s_aux, out, lse);
    return {out, lse};
  }
  PrefillProblem pb{};
  pb.tensors = {element_type(q, "q"), g.num_seqs, g.num_heads, g.num_kv_heads, g.head_dim,
                token_strides(q, g.varlen), token_strides(k, g.varlen && !g.paged),
                token_strides(v, g.varlen && !g.paged),
                token_strides(out, g.varlen),
                g.varlen ? Strides3{0, lse.stride(0), 1} : Strides3{lse.stride(0), lse.stride(1), 1},
                rows_aligned_16(k) && rows_aligned_16(v), g.head_dim_v, v_in_k_rows(k, v)};
  pb.options = g.options;
  pb.total_q = g.total_q;
  pb.total_k = g.total_k;
  pb.uniform_seqlen_q = g.varlen ? -1 : g.total_q;
  pb.uniform_seqlen_k = g.varlen ? -1 : g.total_k;
  // Unknown lengths (data checks off): the caller's bound, else every token; never more than the tokens (an
  // overstated bound would cost threadgroups, 2^40 would truncate the grid); the kernel grid-strides anyway.
  pb.max_seqlen_q = lengths_q.longest >= 0 ? lengths_q.longest
                                           : max_seqlen_q >= 0 ? std::min(max_seqlen_q, g.total_q) : g.total_q;
  pb.seqlen_q_gcd = lengths_q.gcd;
  pb.seqlen_k_gcd = lengths_k.gcd;
  pb.paged = g.paged;
  pb.has_seqused_k = g.seqused_k.defined();
  pb.block_size = g.cache.block_size;
  pb.num_blocks = g.cache.num_blocks;
  pb.blocks_per_seq = g.cache.blocks_per_seq;

  PrefillParams params;
  const KernelLaunch launch = plan_prefill(pb, &params);
  const ScoreInputs extras = score_inputs(s_aux, alibi_slopes);
  dispatch(launch, {
      bind_tensor(PREFILL_BUFFER_Q, q),
      bind_tensor(PREFILL_BUFFER_K, k),
      bind_tensor(PREFILL_BUFFER_V, v),
      bind_tensor(PREFILL_BUFFER_OUT, out),
      bind_optional(PREFILL_BUFFER_CU_SEQLENS_Q, g.cu_seqlens_q),
      bind_optional(PREFILL_BUFFER_CU_SEQLENS_K, g.cu_seqlens_k),
      bind_bytes(PREFILL_BUFFER_PARAMS, params),
      bind_optional(PREFILL_BUFFER_SINKS, extras.sinks),
      bind_optional(PREFILL_BUFFER_ALIBI, extras.slopes),
      bind_tensor(PREFILL_BUFFER_LSE, lse),
      bind_optional(PREFILL_BUFFER_BLOCK_TABLE, g.block_table),
      bind_optional(PREFILL_BUFFER_SEQUSED_K, g.seqused_k),
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> flash_attn_varlen_meta(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, std::optional<double> softmax_scale, bool causal, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& s_aux, const std::optional<at::Tensor>& block_table,
    const std::optional<at::Tensor>& seqused_k) {
  const Geometry g = check_prefill_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                        softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, s_aux,
                                        block_table, seqused_k);
  return empty_outputs(q, g);
}

}  // namespace metal_flash_sdpa
