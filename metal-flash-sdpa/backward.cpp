// The backward op of flash_attn_varlen (backward.metal): dq, dk, dv and d s_aux from the forward's inputs, its
// output and LSE, and the gradients of both outputs. Validates what it is given (every message names the argument),
// plans the three launches (delta and zeroed dQ partials, the fused dK/dV + dQ-partial pass, the dQ reduce) and
// hands them to dispatch(). The meta kernel runs the same checks.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <limits>
#include <optional>
#include <tuple>

#include "../torch-ext/torch_binding.h"
#include "attention_options.h"
#include "decode.h"
#include "dispatch.h"
#include "index_checks.h"
#include "launch.h"
#include "tensor_checks.h"

namespace metal_flash_sdpa {

namespace {

struct BackwardGeometry {
  bool varlen;
  int64_t num_seqs, num_heads, num_kv_heads, head_dim;
  int64_t total_q, total_k;   // tokens per batch entry (varlen: all tokens)
  at::Tensor cu_seqlens_q, cu_seqlens_k;
  AttentionOptions options;
};

BackwardGeometry check_backward_args(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                     const std::optional<at::Tensor>& dlse,
                                     const std::optional<at::Tensor>& cu_seqlens_q,
                                     const std::optional<at::Tensor>& cu_seqlens_k, std::optional<double> softmax_scale,
                                     bool causal, int64_t window_left, int64_t window_right, double softcap,
                                     const std::optional<at::Tensor>& alibi_slopes,
                                     const std::optional<at::Tensor>& s_aux, int64_t num_splits) {
  element_type(q, "q");
  TORCH_CHECK_VALUE(num_splits >= 0, "num_splits must be >= 0 (0: heuristic), got ", num_splits);
  for (const auto& [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}, std::pair{&out, "out"}, std::pair{&dout, "dout"}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(), ", got ",
                     t->scalar_type());
    check_same_device(*t, q, name);
  }
  TORCH_CHECK_VALUE(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(),
                    "pass both cu_seqlens_q and cu_seqlens_k (varlen) or neither (batched)");
  BackwardGeometry g{};
  g.varlen = cu_seqlens_q.has_value();
  const int64_t rank = g.varlen ? 3 : 4;
  const char* layout = g.varlen ? "[total_tokens, heads, head_dim]" : "[batch, seqlen, heads, head_dim]";
  TORCH_CHECK_VALUE(q.dim() == rank, "q must be ", layout, ", got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == rank && k.size(-1) == q.size(-1), "k must be ", layout, " with q's head_dim, got shape ",
                    k.sizes(), " for q of shape ", q.sizes());
  TORCH_CHECK_VALUE(g.varlen || k.size(0) == q.size(0), "k has batch size ", k.size(0), " but q has ", q.size(0));
  if (v.dim() == rank) check_backward_head_dims(q.size(-1), v.size(-1));
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK_VALUE(out.sizes() == q.sizes(), "out must have the shape of q ", q.sizes(), ", got ", out.sizes());
  TORCH_CHECK_VALUE(dout.sizes() == q.sizes(), "dout must have the shape of q ", q.sizes(), ", got ", dout.sizes());
  g.head_dim = q.size(-1);
  g.num_heads = q.size(-2);
  g.num_kv_heads = k.size(-2);
  check_heads(g.num_heads, g.num_kv_heads, g.head_dim);
  if (g.varlen) {
    g.cu_seqlens_q = index_tensor(*cu_seqlens_q, "cu_seqlens_q", q);
    g.cu_seqlens_k = index_tensor(*cu_seqlens_k, "cu_seqlens_k", q);
    TORCH_CHECK_VALUE(cu_seqlens_q->dim() == 1 && cu_seqlens_q->size(0) >= 1 && cu_seqlens_k->sizes() == cu_seqlens_q->sizes(),
                      "cu_seqlens_q and cu_seqlens_k must be 1-D [batch + 1], got shapes ", cu_seqlens_q->sizes(),
                      " and ", cu_seqlens_k->sizes());
    g.num_seqs = cu_seqlens_q->size(0) - 1;
    g.total_q = q.size(0);
    g.total_k = k.size(0);
  } else {
    g.num_seqs = q.size(0);
    g.total_q = q.size(1);
    g.total_k = k.size(1);
  }
  constexpr int64_t int_max = std::numeric_limits<int32_t>::max(), max_tokens = int_max - BACKWARD_BLOCK_K;
  TORCH_CHECK_NOT_IMPLEMENTED(g.total_q <= max_tokens && g.total_k <= max_tokens && g.num_seqs <= int_max &&
                              g.num_heads <= int_max, "more than 2^31 - 33 tokens, or 2^31 - 1 sequences or heads");
  const auto lse_shape = g.varlen ? std::vector<int64_t>{g.num_heads, g.total_q}
                                  : std::vector<int64_t>{g.num_seqs, g.num_heads, g.total_q};
  for (const auto& [t, name] : {std::pair{&lse, "softmax_lse"}, std::pair{dlse ? &*dlse : &lse, "dsoftmax_lse"}}) {
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef(lse_shape) && t->scalar_type() == at::kFloat, name,
                      " must be float32 of shape ", at::IntArrayRef(lse_shape), " (the forward's LSE), got ",
                      t->scalar_type(), " of shape ", t->sizes());
    check_same_device(*t, q, name);
  }
  g.options = check_attention_options(q, g.num_seqs, g.num_heads, g.head_dim, g.total_q, g.total_k, softmax_scale,
                                      causal, window_left, window_right, softcap, alibi_slopes, s_aux);
  return g;
}

struct BackwardProblem {
  AttentionTensors tensors;   // q, k, v, out; lse strides (dlse and delta share them)
  Strides3 dout, dq, dk, dv;
  AttentionOptions options;
  int64_t total_q, total_k, uniform_seqlen_q, uniform_seqlen_k;
  int64_t grid_seqlen_q, grid_seqlen_k;   // size the grids; longer sequences are still covered (grid-stride)
  bool has_dlse;
  bool q_rows_aligned;                    // q and dout rows on 16-byte boundaries (the fused kernel's tile copies)
  int64_t num_splits;                     // chunks asked for (0: heuristic)
  std::array<bool, 3> wanted;             // dq, dk, dv (the op's output_mask)
};

struct BackwardPlan {
  KernelLaunch delta, fused, reduce;   // in this order: each reads what the one before wrote
  int64_t chunks;                      // threadgroups of the fused kernel per (sequence, KV head)
  bool run_fused, run_reduce;          // dk, dv or dq wanted; dq wanted
};

// Chunks of key blocks per (sequence, KV head) for `items` (sequence, KV head) pairs of `key_blocks` blocks each:
// num_splits if given, else the count with the least predicted issue time, counted as benchmarks/cost_model.py
// does: the longest chunk's key blocks x the threadgroups a core runs at once (they share its issue slots:
// ceil(threadgroups / cores), at most the resident count) x the waves of the GPU's threadgroup slots, over the
// latency hiding of that many simdgroups (full from SATURATION_SIMDGROUPS per core); the fewest among equals
// (smaller partials, a shorter reduce). At most BACKWARD_MAX_CHUNKS and one per key block.
int64_t chunk_count(int64_t items, int64_t key_blocks, int64_t head_dim, int64_t element_size, int64_t num_splits,
                    int64_t gpu_cores) {
  const int64_t most = std::max<int64_t>(std::min<int64_t>(BACKWARD_MAX_CHUNKS, key_blocks), 1);
  if (num_splits > 0) return std::min(num_splits, most);
  const int64_t tile_queries = BACKWARD_TILE_QUERIES(element_size, head_dim);
  const int64_t cores = std::max<int64_t>(gpu_cores, 1);
  const int64_t slots = threadgroup_slots(cores, BACKWARD_THREADGROUP_BYTES(tile_queries, element_size, head_dim),
                                          BACKWARD_THREADS);
  constexpr int64_t simdgroups = BACKWARD_THREADS / 32;
  int64_t best = 1;
  double best_cost = std::numeric_limits<double>::infinity();
  for (int64_t chunks = 1; chunks <= most; ++chunks) {
    const int64_t threadgroups = std::max<int64_t>(items, 1) * chunks;
    const int64_t per_core = std::min(slots / cores, ceil_div(threadgroups, cores));
    const double hiding = std::min(1.0, double(per_core * simdgroups) / SATURATION_SIMDGROUPS);
    const double cost = double(ceil_div(key_blocks, chunks) * per_core * ceil_div(threadgroups, slots)) / hiding;
    if (cost < best_cost) best_cost = cost, best = chunks;
  }
  return best;
}

// One launch: `columns` threadgroups per (heads, sequence); every kernel gets the mask constants and the vector-copy
// constant of the fused kernel's Q/dO tiles.
KernelLaunch backward_launch(const char* base, const BackwardProblem& pb, int64_t columns, int64_t heads) {
  const AttentionTensors& t = pb.tensors;
  KernelLaunch launch;
  launch.kernel = kernel_name(base, t.dtype, t.head_dim);
  launch.threadgroups[0] = uint32_t(std::max<int64_t>(columns, 1));
  launch.threadgroups[1] = uint32_t(heads);
  launch.threadgroups[2] = uint32_t(t.num_seqs);
  launch.threads_per_threadgroup = BACKWARD_THREADS;
  launch.constants = mask_constants(pb.options);
  launch.constants.insert(launch.constants.end(), {{FC_BACKWARD_DQ, pb.wanted[0]}, {FC_BACKWARD_DK, pb.wanted[1]},
                                                   {FC_BACKWARD_DV, pb.wanted[2]}});
  launch.constants.push_back(vector_copy_constant(pb.q_rows_aligned, BACKWARD_TILE_QUERIES(element_bytes(t.dtype), t.head_dim),
                                                  std::max(t.q.token, pb.dout.token), t.head_dim));
  return launch;
}

BackwardPlan plan_backward(const BackwardProblem& pb, BackwardParams* params) {
  const AttentionTensors& t = pb.tensors;
  const int64_t chunks = chunk_count(t.num_seqs * t.num_kv_heads, ceil_div(pb.grid_seqlen_k, BACKWARD_BLOCK_K),
                                     t.head_dim, element_bytes(t.dtype), pb.num_splits, gpu_core_count());
  *params = BackwardParams{};
  params->shape = attention_shape(t);
  params->mask = mask_params(pb.options);
  copy_strides(params->dout_strides, pb.dout);
  copy_strides(params->dq_strides, pb.dq);
  copy_strides(params->dk_strides, pb.dk);
  copy_strides(params->dv_strides, pb.dv);
  params->total_q = int32_t(pb.total_q);
  params->total_k = int32_t(pb.total_k);
  params->uniform_seqlen_q = int32_t(pb.uniform_seqlen_q);
  params->uniform_seqlen_k = int32_t(pb.uniform_seqlen_k);
  params->has_dlse = pb.has_dlse;
  params->num_chunks = int32_t(chunks);

  const int64_t query_blocks = ceil_div(pb.grid_seqlen_q, BACKWARD_BLOCK_Q);
  return {backward_launch("attention_backward_delta", pb, query_blocks, t.num_heads),
          backward_launch("attention_backward_fused", pb, chunks, t.num_kv_heads),
          backward_launch("attention_backward_dq_reduce", pb, query_blocks, t.num_heads), chunks,
          pb.wanted[0] || pb.wanted[1] || pb.wanted[2], pb.wanted[0]};
}

// The gradients' tensors, uninitialised: the kernels write every row (the delta kernel zeroes those of tokens in no
// sequence, possible only with cu_seqlens the forward did not check). One not in output_mask (dq, dk, dv) is empty,
// as d s_aux is without sinks; else d s_aux is [H].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> empty_grads(const at::Tensor& q, const at::Tensor& k,
                                                                       const BackwardGeometry& g,
                                                                       const std::optional<at::Tensor>& s_aux,
                                                                       std::array<bool, 3> output_mask) {
  const auto make = [](const at::Tensor& like, bool wanted) {
    return wanted ? at::empty_like(like, at::MemoryFormat::Contiguous) : at::empty({0}, like.options());
  };
  return {make(q, output_mask[0]), make(k, output_mask[1]), make(k, output_mask[2]),
          s_aux ? at::empty({g.num_heads}, s_aux->options()) : at::empty({0}, q.options().dtype(at::kFloat))};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> flash_attn_varlen_backward(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const std::optional<at::Tensor>& dlse_in,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, std::optional<double> softmax_scale, bool causal, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& s_aux,
    int64_t num_splits, std::array<bool, 3> output_mask) {
  const BackwardGeometry g = check_backward_args(dout_in, q_in, k_in, v_in, out_in, lse_in, dlse_in, cu_seqlens_q,
                                                 cu_seqlens_k, softmax_scale, causal, window_left, window_right,
                                                 softcap, alibi_slopes, s_aux, num_splits);
  auto [dq, dk, dv, ds_aux] = empty_grads(q_in, k_in, g, s_aux, output_mask);
  if (g.num_seqs == 0 || g.num_heads == 0) {   // no launch: every token is in no sequence
    dq.zero_(), dk.zero_(), dv.zero_();
    if (s_aux) ds_aux.zero_();
    return {dq, dk, dv, ds_aux};
  }
  const at::Tensor q = unit_stride_head_dim(q_in), k = unit_stride_head_dim(k_in), v = unit_stride_head_dim(v_in);
  const at::Tensor out = unit_stride_head_dim(out_in), dout = unit_stride_head_dim(dout_in);
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor dlse = dlse_in ? dlse_in->contiguous() : at::Tensor();
  // Rows of tokens in no sequence get no delta: their LSE is -inf (the forward's), which d s_aux below masks.
  const at::Tensor delta = at::empty_like(lse);

  BackwardProblem pb{};
  pb.tensors = {element_type(q, "q"), g.num_seqs, g.num_heads, g.num_kv_heads, g.head_dim,
                token_strides(q, g.varlen), token_strides(k, g.varlen), token_strides(v, g.varlen),
                token_strides(out, g.varlen),
                g.varlen ? Strides3{0, lse.stride(0), 1} : Strides3{lse.stride(0), lse.stride(1), 1},
                rows_aligned_16(k) && rows_aligned_16(v)};
  pb.dout = token_strides(dout, g.varlen);
  // An unwanted gradient is an empty tensor the kernels never touch.
  pb.dq = output_mask[0] ? token_strides(dq, g.varlen) : Strides3{};
  pb.dk = output_mask[1] ? token_strides(dk, g.varlen) : Strides3{};
  pb.dv = output_mask[2] ? token_strides(dv, g.varlen) : Strides3{};
  pb.options = g.options;
  pb.total_q = g.total_q;
  pb.total_k = g.total_k;
  pb.uniform_seqlen_q = g.varlen ? -1 : g.total_q;
  pb.uniform_seqlen_k = g.varlen ? -1 : g.total_k;
  // The forward checked max_seqlen against cu_seqlens (data checks on); an understated bound costs time, not rows.
  pb.grid_seqlen_q = max_seqlen_q >= 0 ? std::min(max_seqlen_q, g.total_q) : g.total_q;
  pb.grid_seqlen_k = max_seqlen_k >= 0 ? std::min(max_seqlen_k, g.total_k) : g.total_k;
  pb.has_dlse = dlse.defined();
  pb.q_rows_aligned = rows_aligned_16(q) && rows_aligned_16(dout);
  pb.num_splits = num_splits;
  pb.wanted = output_mask;

  BackwardParams params;
  const BackwardPlan plan = plan_backward(pb, &params);
  // Each chunk's fp32 sum of dS K per (token, head): O(n) (at most BACKWARD_MAX_CHUNKS copies of dq); the delta
  // kernel zeroes the rows of every sequence, the reduce reads only those.
  const at::Tensor dq_partial = at::empty({plan.run_reduce ? plan.chunks : 0, g.num_heads, g.varlen ? g.total_q : g.num_seqs * g.total_q, g.head_dim},
                                          q.options().dtype(at::kFloat));
  const ScoreInputs extras = score_inputs(s_aux, alibi_slopes);
  const std::vector<BufferBinding> buffers = {
      bind_tensor(BACKWARD_BUFFER_Q, q),
      bind_tensor(BACKWARD_BUFFER_K, k),
      bind_tensor(BACKWARD_BUFFER_V, v),
      bind_tensor(BACKWARD_BUFFER_OUT, out),
      bind_tensor(BACKWARD_BUFFER_DOUT, dout),
      bind_tensor(BACKWARD_BUFFER_LSE, lse),
      bind_optional(BACKWARD_BUFFER_DLSE, dlse),
      bind_tensor(BACKWARD_BUFFER_DELTA, delta),
      bind_tensor(BACKWARD_BUFFER_DQ, dq),
      bind_tensor(BACKWARD_BUFFER_DK, dk),
      bind_tensor(BACKWARD_BUFFER_DV, dv),
      bind_optional(BACKWARD_BUFFER_CU_SEQLENS_Q, g.cu_seqlens_q),
      bind_optional(BACKWARD_BUFFER_CU_SEQLENS_K, g.cu_seqlens_k),
      bind_bytes(BACKWARD_BUFFER_PARAMS, params),
      bind_optional(BACKWARD_BUFFER_ALIBI, extras.slopes),
      bind_tensor(BACKWARD_BUFFER_DQ_PARTIAL, dq_partial),
  };
  dispatch(plan.delta, buffers);
  if (plan.run_fused) dispatch(plan.fused, buffers);
  if (plan.run_reduce) dispatch(plan.reduce, buffers);
  if (s_aux) {
    // The sink is one more logit with no value: P_sink = exp(s_aux - LSE) and dLoss/ds_aux = P_sink (dLSE - dO.O)
    // = -P_sink delta, summed over the rows of its head (rows of no sequence have LSE -inf and delta 0).
    const at::Tensor sinks = g.varlen ? extras.sinks.view({g.num_heads, 1}) : extras.sinks.view({1, g.num_heads, 1});
    const at::Tensor per_row = at::where(at::isfinite(lse), at::exp(sinks - lse) * delta, at::zeros({}, lse.options()));
    ds_aux.copy_(g.varlen ? -per_row.sum(1) : -per_row.sum(at::IntArrayRef{0, 2}));
  }
  return {dq, dk, dv, ds_aux};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> flash_attn_varlen_backward_meta(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& dlse, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    std::optional<double> softmax_scale, bool causal, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& s_aux, int64_t num_splits,
    std::array<bool, 3> output_mask) {
  const BackwardGeometry g = check_backward_args(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k,
                                                 softmax_scale, causal, window_left, window_right, softcap,
                                                 alibi_slopes, s_aux, num_splits);
  return empty_grads(q, k, g, s_aux, output_mask);
}

int64_t backward_chunks(int64_t batch, int64_t num_kv_heads, int64_t head_dim, int64_t element_bytes,
                        int64_t max_seqlen_k, int64_t num_splits, int64_t gpu_cores) {
  check_heads(num_kv_heads, num_kv_heads, head_dim);
  TORCH_CHECK_VALUE(batch >= 0 && max_seqlen_k >= 0 && (element_bytes == 2 || element_bytes == 4) && num_splits >= 0 &&
                    gpu_cores >= 0, "backward_chunks: sizes must be >= 0, element_bytes 2 or 4, num_splits and "
                    "gpu_cores >= 0");
  return chunk_count(batch * num_kv_heads, ceil_div(max_seqlen_k, BACKWARD_BLOCK_K), head_dim, element_bytes, num_splits,
                     gpu_cores > 0 ? gpu_cores : gpu_core_count());
}

}  // namespace metal_flash_sdpa
