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
#define FC_ALIGN_K 201   // every key count is a multiple of KV_TILE_KEYS: no key bounds checks
#define FC_KV_VECTOR 202 // K/V rows start on 16-byte boundaries and a tile spans < 2^31 elements: 16-byte copies
#define FC_DO_CAUSAL 301
#define FC_HAS_WINDOW 302
#define FC_HAS_SINKS 303
#define FC_HAS_SOFTCAP 304
#define FC_HAS_ALIBI 305
#define FC_PAGED_KV 308  // prefill: k/v are paged caches read in place through PREFILL_BUFFER_BLOCK_TABLE
#define FC_V_IN_K_TILE 309  // v's rows are the first DV elements of k's (MLA's latent cache): the K tile holds V too

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
#define PREFILL_BUFFER_BLOCK_TABLE 10  // int32 [B, blocks_per_seq] (FC_PAGED_KV)
#define PREFILL_BUFFER_SEQUSED_K 11    // int32 [B]: keys per sequence (has_seqused_k)

// The head dims every kernel is instantiated for: X(arg, d) for each d. The one list behind the shader
// instantiations, the host checks, the Python module's SUPPORTED_HEAD_DIMS and (tested) the README.
#define FOR_EACH_HEAD_DIM(X, arg) X(arg, 32) X(arg, 64) X(arg, 72) X(arg, 80) X(arg, 96) X(arg, 128) X(arg, 192) X(arg, 256)
// Head dims only the forward kernels (prefill, decode) have, the backward not: wide heads D (K and V) and
// (DK, DV) pairs with a narrower V (DeepSeek-V2-Lite 192/128; MLA 576/512, V a view of the latent K cache). The
// lists behind the forward instantiations, the host's checks and the Python module's FORWARD_HEAD_DIMS.
#define FOR_EACH_FORWARD_ONLY_HEAD_DIM(X, arg) X(arg, 512)
#define FOR_EACH_HEAD_DIM_PAIR(X, arg) X(arg, 192, 128) X(arg, 576, 512)

// Prefill tiling: a threadgroup owns PREFILL_BLOCK_Q query rows of one (sequence, head); each of its
// four simdgroups owns 8 of them.
#define PREFILL_BLOCK_Q 32
#define PREFILL_THREADS 128
// Keys per K/V tile in threadgroup memory (prefill and decode): a tile of that many keys x D (padded rows; D the
// K head dim, the wider) must fit the 32 KiB of threadgroup memory (fp32 at D 576: 8 keys, 18.3 KiB).
#define KV_TILE_KEYS(head_dim) ((head_dim) <= 128 ? 32 : (head_dim) <= 256 ? 16 : 8)
// Wide heads: the simdgroups that share 8 query rows, each holding head_dim / HEAD_PARTS of Q and of O (V's head dim
// decides). One simdgroup holding a whole 512-wide row would need 128 fp32 registers per lane for O alone (a thread
// has 128); split in 4, a simdgroup holds what it holds at D = 128 (the cost model's register estimate then lets as
// many threadgroups reside), and a K/V tile still serves 32 query rows (tile copies per FLOP as at D = 128). The
// price: each simdgroup's S is partial over its head-dim part, so the parts add theirs through threadgroup memory
// (HEAD_PARTS_SCORE_FLOATS) and each runs the softmax of the whole S (identical, summed in the same order).
#define HEAD_PARTS(head_dim_v) ((head_dim_v) > 256 ? 4 : 1)
// Floats of that exchange (after the K/V tile in threadgroup memory): one BK-key S fragment row per simdgroup (none
// when nothing is split).
#define HEAD_PARTS_SCORE_FLOATS(row_groups, head_dim_k, head_dim_v) \
  (HEAD_PARTS(head_dim_v) > 1 ? (row_groups) * HEAD_PARTS(head_dim_v) * KV_TILE_KEYS(head_dim_k) * 8 : 0)

// Strides are in elements, int64 like MLX's AttnParams: a [B, S, H, D] view of a larger tensor can span
// more than 2^31 elements. The head dimension is always contiguous (stride 1).
enum TokenStride { STRIDE_BATCH = 0, STRIDE_TOKEN = 1, STRIDE_HEAD = 2 };   // decode caches: block, slot, head
enum LseStride { LSE_BATCH = 0, LSE_HEAD = 1, LSE_TOKEN = 2 };

// The tensors every attention kernel reads and writes (first member of each kernel's params).
struct AttentionShape {
  int64_t q_strides[3];     // [batch, token, head]; batch stride 0 for the packed varlen layout
  int64_t k_strides[3];     // decode: the cache's [block, slot, head]
  int64_t v_strides[3];
  int64_t out_strides[3];
  int64_t lse_strides[3];   // [batch, head, token] of the fp32 LSE
  int32_t num_seqs;
  int32_t num_heads;
  int32_t num_kv_heads;
  int32_t head_dim;
};

// The score transform and masks (which of them apply is set by function constants).
struct MaskParams {
  float scale;              // softmax scale applied to q.k
  float softcap;            // s -> softcap * tanh(s / softcap) when FC_HAS_SOFTCAP
  int32_t window_left;      // keep key at distance d = q_pos - k_pos iff d <= window_left (-1: unbounded)
  int32_t window_right;     // ... and -d <= window_right (-1: unbounded)
  int32_t alibi_seq_stride; // 0: slopes [H]; H: slopes [B, H]
  int32_t pad_;
};

// n / divisor for 0 <= n < 2^31 by a multiply-high, an add and a shift instead of a divide (Granlund and Montgomery,
// 1994): (mulhi(n, multiplier) + n) >> shift, exact since n < 2^31 keeps the add within 32 bits. Built by the host
// (fast_divisor(), launch.cpp), used by the shaders (fast_divide(), strided.h).
struct FastDivisor {
  uint32_t multiplier;
  uint32_t shift;
  int32_t divisor;
  int32_t pad_;
};

struct PrefillParams {
  AttentionShape shape;     // paged (FC_PAGED_KV): k/v strides are the caches' [block, slot, head]
  MaskParams mask;
  int32_t total_q;          // tokens per batch entry of q (packed: all of them); cu_seqlens are
  int32_t total_k;          // clamped to these, never trusted (paged: total_k unused)
  int32_t uniform_seqlen_q; // >= 0: every sequence has this many queries / keys and cu_seqlens are not
  int32_t uniform_seqlen_k; // read (batched [B, S, H, D] inputs); -1: lengths come from cu_seqlens
  // Paged K/V (FC_PAGED_KV, varlen only): sequence b's keys are positions [0, n_b) of block_table row b, n_b its
  // cu_seqlens_k step (or seqused_k[b]) clamped to the row's capacity, blocks_per_seq x block_size.
  FastDivisor block_size;   // slots per cache block
  int32_t num_blocks;       // block_table entries outside [0, num_blocks) hide their keys
  int32_t blocks_per_seq;   // block_table row length
  int32_t has_seqused_k;    // 1: PREFILL_BUFFER_SEQUSED_K holds n_b (unpaged: keys [0, n_b) of each cu_seqlens_k span)
  int32_t pad_;
};
static_assert(sizeof(AttentionShape) == 136, "AttentionShape layout is shared by host and shader");
static_assert(sizeof(MaskParams) == 24, "MaskParams layout is shared by host and shader");
static_assert(sizeof(PrefillParams) == 208, "PrefillParams layout is shared by host and shader");

// ------------------------------------------------------------------------------------------------ decode
// Flash-Decoding over a paged KV cache [num_blocks, block_size, Hkv, D] read through block_table (a
// contiguous cache [B, S, Hkv, D] is the same with one block of S slots per sequence). One threadgroup
// per (partition of keys, KV head, sequence) computes all query rows of that KV head (its query heads x
// the new tokens), so every K/V byte is read once per step.
#define FC_SPLIT_K 306   // decode: write per-partition partials for the reduce kernel

#define DECODE_BUFFER_Q 0
#define DECODE_BUFFER_K_CACHE 1
#define DECODE_BUFFER_V_CACHE 2
#define DECODE_BUFFER_BLOCK_TABLE 3
#define DECODE_BUFFER_SEQLENS_K 4      // int32 [B]: keys in the cache before this call's append
#define DECODE_BUFFER_KV_START 5       // int32 [B]: first valid key (cache_leftpad)
#define DECODE_BUFFER_PARAMS 6
#define DECODE_BUFFER_SINKS 7
#define DECODE_BUFFER_ALIBI 8
#define DECODE_BUFFER_OUT 9
#define DECODE_BUFFER_LSE 10
#define DECODE_BUFFER_PARTIAL_MAX 11   // fp32 [B, H, Sq, partitions]: running max (base 2)
#define DECODE_BUFFER_PARTIAL_SUM 12   // fp32 [B, H, Sq, partitions]: sum of exp2(score - max)
#define DECODE_BUFFER_PARTIAL_OUT 13   // fp32 [B, H, Sq, partitions, D]: unnormalised output

#define DECODE_MAX_ROWS 32             // query rows per threadgroup (4 simdgroups of 8)
// Simdgroups that split each K/V tile's keys (8 per simdgroup) when a KV head has at most 8 query rows, so a
// threadgroup keeps 2-4 simdgroups busy instead of one with half its MMA rows idle; else 1.
#define DECODE_KEY_SLICES(rows, head_dim) ((rows) <= 8 ? KV_TILE_KEYS(head_dim) / 8 : 1)
// Affine-quantized caches stop at head dim 256 (wide heads split over HEAD_PARTS are plain caches).
#define KV_QUANT_MAX_HEAD_DIM 256
// An affine K/V tile in threadgroup memory keeps each row's (scale, bias) per quantization group (>= 32 elements) in
// the row's 8 padding elements (4 pairs); head dims past 128 have up to D / 32 - 4 more pairs a row, after the tile.
#define KV_TILE_EXTRA_GROUPS(head_dim) \
    ((head_dim) / 32 > 4 && (head_dim) <= KV_QUANT_MAX_HEAD_DIM ? (head_dim) / 32 - 4 : 0)
// Threadgroup memory of attention_decode: one K/V tile (rows padded to DK + 8 elements, plus the extra affine pairs),
// the tile's key offsets (int64) in both caches and in their scales / biases (declared whatever the cache format), the
// valid-key mask, and the head parts' score exchange; the host sizes the split-K grid by how many fit on a core.
#define DECODE_THREADGROUP_BYTES(element_bytes, head_dim_k, head_dim_v) \
    (KV_TILE_KEYS(head_dim_k) * ((head_dim_k) + 8 + 2 * KV_TILE_EXTRA_GROUPS(head_dim_k)) * (element_bytes) + \
     4 * KV_TILE_KEYS(head_dim_k) * 8 + 4 + 4 * HEAD_PARTS_SCORE_FLOATS(DECODE_MAX_ROWS / 8, head_dim_k, head_dim_v))
#define DECODE_REDUCE_THREADS 32

struct DecodeParams {
  AttentionShape shape;     // k/v strides are the caches' [block, slot, head]
  MaskParams mask;
  FastDivisor block_size;   // slots per cache block: a position's block and slot every tile, without a divide
  int32_t seqlen_q;         // new query tokens per sequence (>= 1), bottom-right aligned
  int32_t num_blocks;       // block_table entries outside [0, num_blocks) hide their keys
  int32_t blocks_per_seq;   // block_table row length
  int32_t partition_size;   // keys per partition, a multiple of the K tile
  int32_t num_partitions;
  int32_t has_kv_start;     // 1: DECODE_BUFFER_KV_START holds each sequence's first key
  int32_t new_keys;         // tokens appended by this call: sequence b has DECODE_BUFFER_SEQLENS_K[b] + new_keys keys
  int32_t query_group;      // query heads per KV head, num_heads / num_kv_heads (divided once, by the host)
};
static_assert(sizeof(DecodeParams) == 208, "DecodeParams layout is shared by host and shader");

// Appends new K/V tokens to a paged cache at cache_seqlens[b] + i through block_table.
#define KV_WRITE_BUFFER_K 0
#define KV_WRITE_BUFFER_V 1
#define KV_WRITE_BUFFER_K_CACHE 2
#define KV_WRITE_BUFFER_V_CACHE 3
#define KV_WRITE_BUFFER_BLOCK_TABLE 4
#define KV_WRITE_BUFFER_CACHE_SEQLENS 5
#define KV_WRITE_BUFFER_PARAMS 6
#define KV_WRITE_THREADS 32

struct KvWriteParams {
  int64_t k_strides[3];       // new tokens [batch, token, head]
  int64_t v_strides[3];
  int64_t k_cache_strides[3]; // [block, slot, head]
  int64_t v_cache_strides[3];
  int32_t num_seqs;
  int32_t seqlen_new;
  int32_t num_kv_heads;
  int32_t head_dim;
  int32_t block_size;
  int32_t num_blocks;
  int32_t blocks_per_seq;
  int32_t write_v;            // 0: k only (quantize_kv), 1: k and v
};
static_assert(sizeof(KvWriteParams) == 128, "KvWriteParams layout is shared by host and shader");

// ---------------------------------------------------------------------------------------------- backward
// Flash-attention backward (backward.metal), three launches: the delta kernel (grid as the prefill's: query blocks x
// heads x sequences) computes delta_i = dot(dO_i, O_i) - dLSE_i per row and zeroes the row's dQ partials; the fused
// kernel (one threadgroup per chunk of key blocks, KV head and sequence) computes dK/dV of its keys in registers and
// adds each tile's dQ contribution to its chunk's fp32 partial; the reduce kernel sums the chunks' partials into dq.
// Every element has one writer per launch and a fixed summation order, so no atomics: the result is deterministic.
#define BACKWARD_BUFFER_Q 0
#define BACKWARD_BUFFER_K 1
#define BACKWARD_BUFFER_V 2
#define BACKWARD_BUFFER_OUT 3
#define BACKWARD_BUFFER_DOUT 4
#define BACKWARD_BUFFER_LSE 5        // fp32, the forward's natural-log LSE
#define BACKWARD_BUFFER_DLSE 6       // fp32, the LSE's gradient (when has_dlse)
#define BACKWARD_BUFFER_DELTA 7      // fp32, written by the delta kernel, read by the fused kernel (LSE layout)
#define BACKWARD_BUFFER_DQ 8
#define BACKWARD_BUFFER_DK 9
#define BACKWARD_BUFFER_DV 10
#define BACKWARD_BUFFER_CU_SEQLENS_Q 11
#define BACKWARD_BUFFER_CU_SEQLENS_K 12
#define BACKWARD_BUFFER_PARAMS 13
#define BACKWARD_BUFFER_ALIBI 14     // sinks need no buffer: the host turns delta and the LSE into d s_aux
#define BACKWARD_BUFFER_DQ_PARTIAL 15  // fp32 [chunks, heads, tokens, D]: each chunk's sum of dS K (tokens: B x S, or total)

// Backward: which of dq, dk, dv the caller wants (the op's output_mask); an unwanted gradient costs no tile product,
// no store and (dq) no partials or reduce launch.
#define FC_BACKWARD_DQ 320
#define FC_BACKWARD_DK 321
#define FC_BACKWARD_DV 322
#define BACKWARD_THREADS 128     // 4 simdgroups of 8 rows (query rows in the delta and reduce kernels, keys in the fused one)
#define BACKWARD_BLOCK_Q 32      // query rows per delta / reduce threadgroup
#define BACKWARD_BLOCK_K 32      // keys per block of the fused kernel
#define BACKWARD_MAX_CHUNKS 8    // key-block chunks per (sequence, KV head): bounds the partials to 8 fp32 copies of dq
// Resident simdgroups per core from which a core hides its latency (metal-benchmarks ILP graphs: ALU saturates near
// 16-24 resident simdgroups per core): fewer hide it in proportion. The backward's chunk count (backward.cpp) and
// benchmarks/cost_model.py (which reads this line) model issue time with it.
#define SATURATION_SIMDGROUPS 16
// A core's threadgroup memory (metal-benchmarks 'On-Chip Memory': ~60 KB, M1/M2) and resident threads (an estimate:
// register-limited residency at ~100 registers a thread). The decode split and the backward's chunk count size their
// grids by the residency they give (decode.h: threadgroup_slots); benchmarks/cost_model.py reads these lines.
#define CORE_THREADGROUP_MEMORY 61440
#define CORE_MAX_THREADS 1024
// Query rows per tile of the fused kernel: its Q and dO tiles (padded rows of D + 8 elements), the tile's dS^T
// (BACKWARD_BLOCK_K x rows, in the input type) and two fp32 rows (LSE, delta) in at most a quarter of a core's
// threadgroup memory (15 KiB), so four threadgroups (SATURATION_SIMDGROUPS simdgroups) fit a core (8 rows whatever
// that takes).
#define BACKWARD_THREADGROUP_BYTES(rows, element_bytes, head_dim) \
  (2 * (rows) * ((head_dim) + 8) * (element_bytes) + (element_bytes) * BACKWARD_BLOCK_K * (rows) + 8 * (rows))
#define BACKWARD_TILE_FITS(rows, element_bytes, head_dim) (BACKWARD_THREADGROUP_BYTES(rows, element_bytes, head_dim) <= CORE_THREADGROUP_MEMORY / 4)
#define BACKWARD_TILE_QUERIES(element_bytes, head_dim) \
  (BACKWARD_TILE_FITS(32, element_bytes, head_dim) ? 32 : BACKWARD_TILE_FITS(16, element_bytes, head_dim) ? 16 : 8)

struct BackwardParams {
  AttentionShape shape;       // q, k, v, out; lse_strides also index dlse and delta
  MaskParams mask;
  int64_t dout_strides[3];    // [batch, token, head]
  int64_t dq_strides[3];
  int64_t dk_strides[3];
  int64_t dv_strides[3];
  int32_t total_q;            // as PrefillParams: cu_seqlens are clamped to these
  int32_t total_k;
  int32_t uniform_seqlen_q;   // >= 0: batched, every sequence has this many queries / keys; -1: varlen
  int32_t uniform_seqlen_k;
  int32_t has_dlse;           // 1: BACKWARD_BUFFER_DLSE holds dLoss/dLSE
  int32_t num_chunks;         // threadgroups of the fused kernel per (sequence, KV head): dQ partials per token
};
static_assert(sizeof(BackwardParams) == 280, "BackwardParams layout is shared by host and shader");

// ------------------------------------------------------------------------------------------- quantized KV caches
// A K or V cache may hold its rows quantized (read by the decode kernel, written by the KV write, when
// FC_KV_QUANTIZED is set; KvQuantParams says how):
// - affine groups, laid out exactly as mlx.core.quantize (mode "affine") lays out a [..., D] tensor: D * bits / 32
//   uint32 words per row, element e of a row in bits [(e % (32 / bits)) * bits, +bits) of word e / (32 / bits);
//   per group of group_size elements a scale and a bias of the attention dtype, x = q * scale + bias;
// - fp8 e4m3 (one byte per element) times one fp32 descale per (sequence, KV head), as flash-attn 3.
#define FC_KV_QUANTIZED 307
enum KvCacheKind { KV_PLAIN = 0, KV_AFFINE = 1, KV_FP8_E4M3 = 2 };

struct CacheFormat {
  int64_t scale_strides[3];    // affine: [block, slot, head] of the scales and biases (elements; groups contiguous)
  int32_t kind;                // KvCacheKind
  int32_t bits;                // affine: 4 or 8
  int32_t group_size;          // affine: 32, 64 or 128 elements per scale and bias
  int32_t descale_seq_stride;  // fp8: the descale [B, Hkv] (fp32, contiguous) has this many entries per sequence
};
struct KvQuantParams {
  CacheFormat k, v;
};
static_assert(sizeof(CacheFormat) == 40, "CacheFormat layout is shared by host and shader");
static_assert(sizeof(KvQuantParams) == 80, "KvQuantParams layout is shared by host and shader");

// Affine: the scales and biases; fp8: the descale in the scales slot (the biases slot is unused).
#define DECODE_BUFFER_K_SCALES 14
#define DECODE_BUFFER_K_BIASES 15
#define DECODE_BUFFER_V_SCALES 16
#define DECODE_BUFFER_V_BIASES 17
#define DECODE_BUFFER_KV_QUANT 18      // KvQuantParams
#define KV_WRITE_BUFFER_K_SCALES 7
#define KV_WRITE_BUFFER_K_BIASES 8
#define KV_WRITE_BUFFER_V_SCALES 9
#define KV_WRITE_BUFFER_V_BIASES 10
#define KV_WRITE_BUFFER_KV_QUANT 11
