// Launch parameters shared by the shaders, the Metal launchers (.mm) and the simulator backend: the one
// definition of what the host passes with setBytes. Fixed-width fields only; the layout is pinned by
// static_asserts so host and shader can never disagree.
#pragma once
#ifdef __METAL_VERSION__
#include <metal_stdlib>
#else
#include <stdint.h>
#endif

// Function-constant indices (as upstream metal-flash-sdpa: 200/201 alignment, 301 causal, 302 window).
#define FC_ALIGN_Q 200   // every sequence's query count is a multiple of PREFILL_BLOCK_Q: no row bounds checks
#define FC_ALIGN_K 201   // every key count is a multiple of PREFILL_BLOCK_K: no key bounds checks
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
// Keys per K/V tile: a BK x D tile (padded rows) must fit the 32 KiB of threadgroup memory.
#define PREFILL_BLOCK_K(head_dim) ((head_dim) <= 128 ? 32 : 16)

// Strides are in elements, int64 like MLX's AttnParams: a [B, S, H, D] view of a larger tensor can span
// more than 2^31 elements. The head dimension is always contiguous (stride 1).
enum PrefillStride { STRIDE_BATCH = 0, STRIDE_TOKEN = 1, STRIDE_HEAD = 2 };

struct PrefillParams {
  int64_t q_strides[3];     // [batch, token, head]; batch stride 0 for the packed varlen layout
  int64_t k_strides[3];
  int64_t v_strides[3];
  int64_t out_strides[3];
  int64_t lse_strides[3];   // [batch, head, token] of the fp32 LSE
  int32_t num_seqs;
  int32_t num_heads;
  int32_t num_kv_heads;
  int32_t head_dim;
  int32_t total_q;          // tokens per batch entry of q (packed varlen: all of them); cu_seqlens are
  int32_t total_k;          // clamped to these, never trusted
  int32_t uniform_seqlen_q; // >= 0: every sequence has this many queries / keys and cu_seqlens are not
  int32_t uniform_seqlen_k; // read (batched [B, S, H, D] inputs); -1: lengths come from cu_seqlens
  float scale;              // softmax scale applied to q.k
  float softcap;            // s -> softcap * tanh(s / softcap) when FC_HAS_SOFTCAP
  int32_t window_left;      // keep key at distance d = q_pos - k_pos iff d <= window_left (-1: unbounded)
  int32_t window_right;     // ... and -d <= window_right (-1: unbounded)
  int32_t alibi_seq_stride; // 0: slopes [H]; H: slopes [B, H]
  int32_t pad_[3];
};
static_assert(sizeof(PrefillParams) == 184, "PrefillParams layout is shared by host and shader");
