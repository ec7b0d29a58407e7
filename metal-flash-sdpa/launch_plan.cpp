#include "launch_plan.h"

#include <algorithm>

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

uint32_t ceil_div(int64_t a, int64_t b) { return uint32_t((a + b - 1) / b); }

void copy_strides(int64_t dst[3], const Strides3& s) {
  dst[0] = s.batch;
  dst[1] = s.token;
  dst[2] = s.head;
}

std::string kernel_name(const char* base, ElementType dtype, int64_t head_dim) {
  return std::string(base) + "_" + type_name(dtype) + "_" + std::to_string(head_dim);
}

std::vector<FunctionConstant> mask_constants(bool causal, int64_t window_left, int64_t window_right, bool sinks,
                                             float softcap, bool alibi) {
  return {{FC_DO_CAUSAL, causal},
          {FC_HAS_WINDOW, window_left >= 0 || window_right >= 0},
          {FC_HAS_SINKS, sinks},
          {FC_HAS_SOFTCAP, softcap > 0.0f},
          {FC_HAS_ALIBI, alibi}};
}

}  // namespace

bool is_supported_head_dim(int64_t head_dim) {
  for (int64_t d : {32, 64, 72, 80, 96, 128, 192, 256})
    if (d == head_dim) return true;
  return false;
}

const char* supported_head_dims() { return "32, 64, 72, 80, 96, 128, 192, 256"; }

KernelLaunch plan_prefill(const PrefillProblem& pb, PrefillParams* params) {
  *params = PrefillParams{};
  copy_strides(params->q_strides, pb.q);
  copy_strides(params->k_strides, pb.k);
  copy_strides(params->v_strides, pb.v);
  copy_strides(params->out_strides, pb.out);
  copy_strides(params->lse_strides, pb.lse);
  params->num_seqs = int32_t(pb.num_seqs);
  params->num_heads = int32_t(pb.num_heads);
  params->num_kv_heads = int32_t(pb.num_kv_heads);
  params->head_dim = int32_t(pb.head_dim);
  params->total_q = int32_t(pb.total_q);
  params->total_k = int32_t(pb.total_k);
  params->uniform_seqlen_q = int32_t(pb.uniform_seqlen_q);
  params->uniform_seqlen_k = int32_t(pb.uniform_seqlen_k);
  params->scale = pb.scale;
  params->softcap = pb.softcap;
  // causal is the window's right edge at 0 (flash-attn); the shader applies both masks independently.
  params->window_left = int32_t(pb.window_left);
  params->window_right = int32_t(pb.window_right);
  params->alibi_seq_stride = int32_t(pb.alibi_seq_stride);

  KernelLaunch launch;
  launch.kernel = kernel_name("attention_prefill", pb.dtype, pb.head_dim);
  launch.threadgroups[0] = std::max<uint32_t>(ceil_div(pb.max_seqlen_q, PREFILL_BLOCK_Q), 1);
  launch.threadgroups[1] = uint32_t(pb.num_heads);
  launch.threadgroups[2] = uint32_t(pb.num_seqs);
  launch.threads_per_threadgroup = PREFILL_THREADS;
  launch.constants = mask_constants(pb.causal, pb.window_left, pb.window_right, pb.has_sinks, pb.softcap, pb.has_alibi);
  launch.constants.push_back({FC_ALIGN_Q, pb.seqlen_q_gcd % PREFILL_BLOCK_Q == 0});
  launch.constants.push_back({FC_ALIGN_K, pb.seqlen_k_gcd % PREFILL_BLOCK_K(pb.head_dim) == 0});
  return launch;
}

DecodePlan plan_decode(const DecodeProblem& pb, DecodeParams* params) {
  const int64_t tile = PREFILL_BLOCK_K(pb.head_dim);
  const int64_t max_keys = std::max<int64_t>(pb.max_seqlen_k, 1);
  // Partition size: DECODE_PARTITION_SIZE keys, or max_keys / num_splits; always whole K tiles.
  int64_t partition = pb.num_splits > 0 ? (max_keys + pb.num_splits - 1) / pb.num_splits : DECODE_PARTITION_SIZE;
  partition = (partition + tile - 1) / tile * tile;
  const int64_t partitions = (max_keys + partition - 1) / partition;

  *params = DecodeParams{};
  copy_strides(params->q_strides, pb.q);
  copy_strides(params->k_strides, pb.k_cache);
  copy_strides(params->v_strides, pb.v_cache);
  copy_strides(params->out_strides, pb.out);
  copy_strides(params->lse_strides, pb.lse);
  params->num_seqs = int32_t(pb.num_seqs);
  params->num_heads = int32_t(pb.num_heads);
  params->num_kv_heads = int32_t(pb.num_kv_heads);
  params->head_dim = int32_t(pb.head_dim);
  params->seqlen_q = int32_t(pb.seqlen_q);
  params->block_size = int32_t(pb.block_size);
  params->num_blocks = int32_t(pb.num_blocks);
  params->blocks_per_seq = int32_t(pb.blocks_per_seq);
  params->partition_size = int32_t(partition);
  params->num_partitions = int32_t(partitions);
  params->has_kv_start = pb.has_kv_start;
  params->alibi_seq_stride = int32_t(pb.alibi_seq_stride);
  params->scale = pb.scale;
  params->softcap = pb.softcap;
  params->window_left = int32_t(pb.window_left);
  params->window_right = int32_t(pb.window_right);

  DecodePlan plan;
  plan.num_partitions = partitions;
  plan.split = partitions > 1;
  const int64_t rows = pb.num_heads / pb.num_kv_heads * pb.seqlen_q;   // query rows per KV head
  const int64_t row_chunks = (rows + DECODE_MAX_ROWS - 1) / DECODE_MAX_ROWS;
  const int64_t rows_per_threadgroup = std::min<int64_t>(rows, DECODE_MAX_ROWS);
  KernelLaunch& attention = plan.attention;
  attention.kernel = kernel_name("attention_decode", pb.dtype, pb.head_dim);
  attention.threadgroups[0] = uint32_t(partitions);
  attention.threadgroups[1] = uint32_t(pb.num_kv_heads * row_chunks);
  attention.threadgroups[2] = uint32_t(pb.num_seqs);
  attention.threads_per_threadgroup = uint32_t(32 * ((rows_per_threadgroup + 7) / 8));   // a simdgroup per 8 rows
  attention.constants = mask_constants(pb.causal, pb.window_left, pb.window_right, pb.has_sinks, pb.softcap, pb.has_alibi);
  attention.constants.push_back({FC_SPLIT_K, plan.split});
  if (plan.split) {
    KernelLaunch& reduce = plan.reduce;
    reduce.kernel = kernel_name("attention_decode_reduce", pb.dtype, pb.head_dim);
    reduce.threadgroups[0] = uint32_t(pb.seqlen_q);
    reduce.threadgroups[1] = uint32_t(pb.num_heads);
    reduce.threadgroups[2] = uint32_t(pb.num_seqs);
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
