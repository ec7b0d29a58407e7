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

}  // namespace

bool is_supported_head_dim(int64_t head_dim) {
  for (int64_t d : {32, 64, 72, 80, 96, 128, 192, 256})
    if (d == head_dim) return true;
  return false;
}

const char* supported_head_dims() { return "32, 64, 72, 80, 96, 128, 192, 256"; }

KernelLaunch plan_prefill(const PrefillProblem& pb, PrefillParams* params) {
  const auto copy = [](int64_t dst[3], const Strides3& s) { dst[0] = s.batch; dst[1] = s.token; dst[2] = s.head; };
  *params = PrefillParams{};
  copy(params->q_strides, pb.q);
  copy(params->k_strides, pb.k);
  copy(params->v_strides, pb.v);
  copy(params->out_strides, pb.out);
  copy(params->lse_strides, pb.lse);
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
  launch.kernel = std::string("attention_prefill_") + type_name(pb.dtype) + "_" + std::to_string(pb.head_dim);
  launch.threadgroups[0] = std::max<uint32_t>(ceil_div(pb.max_seqlen_q, PREFILL_BLOCK_Q), 1);
  launch.threadgroups[1] = uint32_t(pb.num_heads);
  launch.threadgroups[2] = uint32_t(pb.num_seqs);
  launch.threads_per_threadgroup = PREFILL_THREADS;
  const bool has_window = pb.window_left >= 0 || pb.window_right >= 0;
  launch.constants = {{FC_ALIGN_Q, pb.seqlen_q_gcd % PREFILL_BLOCK_Q == 0},
                      {FC_ALIGN_K, pb.seqlen_k_gcd % PREFILL_BLOCK_K(pb.head_dim) == 0},
                      {FC_DO_CAUSAL, pb.causal},
                      {FC_HAS_WINDOW, has_window},
                      {FC_HAS_SINKS, pb.has_sinks},
                      {FC_HAS_SOFTCAP, pb.softcap > 0.0f},
                      {FC_HAS_ALIBI, pb.has_alibi}};
  return launch;
}

}  // namespace metal_flash_sdpa
