// Launch plans: tensor shapes and options -> kernel name, grid, function constants and the param struct.
// Plain C++ (no torch, no Metal) shared by the Metal launcher (.mm) and the simulator backend, so the
// exact grid and constants a Mac uses are built and tested on Linux.
#pragma once
#include <stdint.h>

#include <string>
#include <vector>

#include "attention_params.h"

namespace metal_flash_sdpa {

enum class ElementType { Float32, Float16, BFloat16 };

struct FunctionConstant {   // one MTLFunctionConstantValues entry (all ours are bools)
  int32_t index;
  bool value;
};

struct KernelLaunch {
  std::string kernel;                       // host name of the [[kernel]] instantiation
  uint32_t threadgroups[3];                 // dispatchThreadgroups
  uint32_t threads_per_threadgroup;
  std::vector<FunctionConstant> constants;  // the pipeline is specialised (and cached) per constant set
};

// Head dims with an instantiated kernel; the error message lists them.
bool is_supported_head_dim(int64_t head_dim);
const std::string& supported_head_dims();

// flash_attn_func calls with at most this many queries per sequence (decode steps) run the decode kernel.
constexpr int64_t kDecodeMaxNewTokens = 4;

struct Strides3 {
  int64_t batch, token, head;   // elements; the head dim itself is contiguous
};

// The tensors of an attention call (AttentionShape on the shader side).
struct AttentionTensors {
  ElementType dtype;
  int64_t num_seqs, num_heads, num_kv_heads, head_dim;
  Strides3 q, k, v, out;   // decode: k/v are the caches, {block, slot, head}
  Strides3 lse;            // note: {batch, head, token} order for the LSE
};

// Masks and score options (MaskParams + function constants on the shader side).
struct AttentionOptions {
  float scale;
  bool causal;
  int64_t window_left, window_right;   // -1: unbounded
  float softcap;                       // 0: off
  bool has_sinks;
  bool has_alibi;
  int64_t alibi_seq_stride;            // 0: slopes [H]; H: slopes [B, H]
};

// One prefill call. Packed varlen: sequences laid out by cu_seqlens in [total, H, D] tensors (batch strides
// 0). Batched: uniform_seqlen_q/k >= 0 and tensors are [B, S, H, D] views.
struct PrefillProblem {
  AttentionTensors tensors;
  AttentionOptions options;
  int64_t total_q, total_k;                    // tokens per batch entry (packed: all tokens)
  int64_t uniform_seqlen_q, uniform_seqlen_k;  // -1 for varlen
  int64_t max_seqlen_q;                        // sizes the grid; longer sequences are still covered
  int64_t seqlen_q_gcd, seqlen_k_gcd;          // gcd of the sequence lengths (0: all empty): alignment
};

KernelLaunch plan_prefill(const PrefillProblem& problem, PrefillParams* params);

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

DecodePlan plan_decode(const DecodeProblem& problem, DecodeParams* params);

struct KvWriteProblem {
  ElementType dtype;
  int64_t num_seqs, seqlen_new, num_kv_heads, head_dim;
  int64_t block_size, num_blocks, blocks_per_seq;
  Strides3 k, v, k_cache, v_cache;
};

KernelLaunch plan_kv_write(const KvWriteProblem& problem, KvWriteParams* params);

}  // namespace metal_flash_sdpa
