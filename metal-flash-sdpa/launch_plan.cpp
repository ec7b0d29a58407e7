#include "launch_plan.h"

#include <algorithm>
#include <iterator>

namespace metal_flash_sdpa {

namespace {

const char* type_name(ElementType dtype) {   // as in the [[host_name]] of the instantiations
  switch (dtype) {
    case ElementType::Float32: return "float";
    case ElementType::Float16: return "half";
    case ElementType::BFloat16: return "bfloat";
  }
  return "?";
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void copy_strides(int64_t dst[3], const Strides3& s) {
  dst[0] = s.batch;
  dst[1] = s.token;
  dst[2] = s.head;
}

std::string kernel_name(const char* base, ElementType dtype, int64_t head_dim) {
  return std::string(base) + "_" + type_name(dtype) + "_" + std::to_string(head_dim);
}

AttentionShape attention_shape(const AttentionTensors& t) {
  AttentionShape shape{};
  copy_strides(shape.q_strides, t.q);
  copy_strides(shape.k_strides, t.k);
  copy_strides(shape.v_strides, t.v);
  copy_strides(shape.out_strides, t.out);
  copy_strides(shape.lse_strides, t.lse);
  shape.num_seqs = int32_t(t.num_seqs);
  shape.num_heads = int32_t(t.num_heads);
  shape.num_kv_heads = int32_t(t.num_kv_heads);
  shape.head_dim = int32_t(t.head_dim);
  return shape;
}

// causal is the window's right edge at 0 (flash-attn); the shaders apply both masks independently.
MaskParams mask_params(const AttentionOptions& o) {
  MaskParams mask{};
  mask.scale = o.scale;
  mask.softcap = o.softcap;
  mask.window_left = int32_t(o.window_left);
  mask.window_right = int32_t(o.window_right);
  mask.alibi_seq_stride = int32_t(o.alibi_seq_stride);
  return mask;
}

std::vector<FunctionConstant> mask_constants(const AttentionOptions& o) {
  return {{FC_DO_CAUSAL, o.causal},
          {FC_HAS_WINDOW, o.window_left >= 0 || o.window_right >= 0},
          {FC_HAS_SINKS, o.has_sinks},
          {FC_HAS_SOFTCAP, o.softcap > 0.0f},
          {FC_HAS_ALIBI, o.has_alibi}};
}

}  // namespace

// The head dims prefill.metal and decode.metal instantiate.
constexpr int64_t kHeadDims[] = {32, 64, 72, 80, 96, 128, 192, 256};

bool is_supported_head_dim(int64_t head_dim) {
  return std::find(std::begin(kHeadDims), std::end(kHeadDims), head_dim) != std::end(kHeadDims);
}

const std::string& supported_head_dims() {
  static const std::string text = [] {
    std::string joined;
    for (int64_t d : kHeadDims) joined += (joined.empty() ? "" : ", ") + std::to_string(d);
    return joined;
  }();
  return text;
}

KernelLaunch plan_prefill(const PrefillProblem& pb, PrefillParams* params) {
  const AttentionTensors& t = pb.tensors;
  *params = PrefillParams{};
  params->shape = attention_shape(t);
  params->mask = mask_params(pb.options);
  params->total_q = int32_t(pb.total_q);
  params->total_k = int32_t(pb.total_k);
  params->uniform_seqlen_q = int32_t(pb.uniform_seqlen_q);
  params->uniform_seqlen_k = int32_t(pb.uniform_seqlen_k);

  KernelLaunch launch;
  launch.kernel = kernel_name("attention_prefill", t.dtype, t.head_dim);
  launch.threadgroups[0] = uint32_t(std::max<int64_t>(ceil_div(pb.max_seqlen_q, PREFILL_BLOCK_Q), 1));
  launch.threadgroups[1] = uint32_t(t.num_heads);
  launch.threadgroups[2] = uint32_t(t.num_seqs);
  launch.threads_per_threadgroup = PREFILL_THREADS;
  launch.constants = mask_constants(pb.options);
  launch.constants.push_back({FC_ALIGN_Q, pb.seqlen_q_gcd % PREFILL_BLOCK_Q == 0});
  launch.constants.push_back({FC_ALIGN_K, pb.seqlen_k_gcd % PREFILL_BLOCK_K(t.head_dim) == 0});
  return launch;
}

DecodePlan plan_decode(const DecodeProblem& pb, DecodeParams* params) {
  const AttentionTensors& t = pb.tensors;
  const int64_t tile = PREFILL_BLOCK_K(t.head_dim);
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

KernelLaunch plan_kv_write(const KvWriteProblem& pb, KvWriteParams* params) {
  *params = KvWriteParams{};
  copy_strides(params->k_strides, pb.k);
  copy_strides(params->v_strides, pb.v);
  copy_strides(params->k_cache_strides, pb.k_cache);
  copy_strides(params->v_cache_strides, pb.v_cache);
  params->num_seqs = int32_t(pb.num_seqs);
  params->seqlen_new = int32_t(pb.seqlen_new);
  params->num_kv_heads = int32_t(pb.num_kv_heads);
  params->head_dim = int32_t(pb.head_dim);
  params->block_size = int32_t(pb.block_size);
  params->num_blocks = int32_t(pb.num_blocks);
  params->blocks_per_seq = int32_t(pb.blocks_per_seq);

  KernelLaunch launch;
  launch.kernel = std::string("kv_cache_write_") + type_name(pb.dtype);
  launch.threadgroups[0] = uint32_t(pb.seqlen_new);
  launch.threadgroups[1] = uint32_t(pb.num_kv_heads);
  launch.threadgroups[2] = uint32_t(pb.num_seqs);
  launch.threads_per_threadgroup = KV_WRITE_THREADS;
  return launch;
}

}  // namespace metal_flash_sdpa
