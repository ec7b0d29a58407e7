// Launch parameters shared by the shaders, the Metal launchers (.mm) and the simulator backend: the one
// definition of what the host passes with setBytes. Fixed-width fields only; the layout is pinned by
// static_asserts so host and shader can never disagree.
#pragma once
#ifdef __METAL_VERSION__
#include <metal_stdlib>
#else
#include <stdint.h>
#endif

// Function-constant indices (upstream metal-flash-sdpa uses 301 for causal and 302 for the window).
#define FC_DO_CAUSAL 301
#define FC_HAS_WINDOW 302
#define FC_HAS_SINKS 303
#define FC_HAS_SOFTCAP 304
#define FC_HAS_ALIBI 305

// Buffer indices of the prefill kernel.
#define PREFILL_BUFFER_Q 0
#define PREFILL_BUFFER_K 1
#define PREFILL_BUFFER_V 2
#define PREFILL_BUFFER_OUT 3
#define PREFILL_BUFFER_CU_SEQLENS_Q 4
#define PREFILL_BUFFER_CU_SEQLENS_K 5
#define PREFILL_BUFFER_PARAMS 6
#define PREFILL_BUFFER_SINKS 7
#define PREFILL_BUFFER_ALIBI 8
#define PREFILL_BUFFER_LSE 9

// Prefill tiling: a threadgroup owns PREFILL_BLOCK_Q query rows of one (sequence, head); each of its
// four simdgroups owns 8 of them.
#define PREFILL_BLOCK_Q 32
#define PREFILL_THREADS 128

struct PrefillParams {
  int32_t num_seqs;
  int32_t num_heads;
  int32_t num_kv_heads;
  int32_t head_dim;
  int32_t total_q;          // rows of q / out: cu_seqlens are clamped to these, never trusted
  int32_t total_k;
  int32_t q_row_stride;     // elements between consecutive tokens of q / out ([total, H, D]: H * D)
  int32_t kv_row_stride;    // elements between consecutive tokens of k / v
  float scale;              // softmax scale applied to q.k
  float softcap;            // s -> softcap * tanh(s / softcap) when FC_HAS_SOFTCAP
  int32_t window_left;      // keep key at distance d = q_pos - k_pos iff d <= window_left (-1: unbounded)
  int32_t window_right;     // ... and -d <= window_right (-1: unbounded)
  int32_t alibi_seq_stride; // 0: slopes [H]; H: slopes [B, H]
  int32_t pad_;
};
static_assert(sizeof(PrefillParams) == 56, "PrefillParams layout is shared by host and shader");
