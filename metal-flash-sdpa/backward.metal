// Flash attention backward (FlashAttention-2, Dao 2023, algorithm 2) for the prefill layouts: packed varlen
// [total, H, D] with cu_seqlens, or batched [B, S, H, D]. P is recomputed from q, k and the forward's LSE, so nothing
// of size n^2 is ever stored. Three launches:
//
// 1. attention_backward_delta, grid (query blocks, heads, sequences), 4 simdgroups x 8 query rows: per row
//    delta = dot(dO, O) - dLSE, and the row's dQ partials of every chunk set to zero.
// 2. attention_backward_fused, grid (chunks, KV heads, sequences), 4 simdgroups x 8 keys: chunk c takes the key blocks
//    c, c + chunks, ... of its sequence (interleaved, so a causal mask leaves the chunks equal work) and, for each,
//    the query heads of its KV head (GQA sums there, in registers) and the query tiles of its band: S^T = K Q^T, P^T,
//    dV += P^T dO, dP^T = V dO^T, dS^T, dK += scale dS^T Q, and the tile's dS K added to the chunk's fp32 dQ
//    partial (read-modify-write: rows only this threadgroup touches, in a fixed order). Five tile products per
//    (query tile, key block), S and dP computed once; their operands stay in T (P and dS rounded to T, as
//    flash-attn does) with fp32 accumulators, so no fragment is converted inside the tile loop.
// 3. attention_backward_dq_reduce, grid as the delta kernel's: dq = scale x the sum of the chunks' partials, in
//    chunk order.
// A gradient the caller does not want (function constants wants_dq / dk / dv) costs no tile product and no store;
// without dq there are no partials and no reduce launch.
// Every output element has exactly one writer and a fixed summation order: deterministic, no atomics. The work is
// O(n * window) like the forward: the fused kernel visits only the tiles of its band (WORK_COUNT proves it).
#include <metal_stdlib>

#include "common/attention_tile.h"
#include "common/kv_tile.h"
#include "common/mask_band.h"
#include "common/params.h"
#include "common/strided.h"
#include "common/work_counters.h"
using namespace metal;

constant bool wants_dq [[function_constant(FC_BACKWARD_DQ)]];
constant bool wants_dk [[function_constant(FC_BACKWARD_DK)]];
constant bool wants_dv [[function_constant(FC_BACKWARD_DV)]];

// P = exp2(score - LSE) for the 8 x 8N raw products q.k this lane holds (times rules.raw_scale, the softmax scale),
// in place, from the forward's base-2 LSE; with softcap also d(capped score)/d(scaled score) = 1 - tanh^2. KEY_ROWS: the fragment rows are keys and the columns
// queries (S^T of the dK/dV pass, LSE per column from col_lse2); else rows are queries (row_lse2). Rows and
// columns index their sequence; a query at row r sits at key position r + shift. `edge` false: the caller proved
// every pair of the tile visible, so no mask test.
template <int N, bool KEY_ROWS>
METAL_FUNC void probabilities(thread Fragments<N>& s, thread Fragments<N>& softcap_grad, int row, int row_end,
                              int col0, int col_end, int shift, float row_lse2, const threadgroup float* col_lse2,
                              bool edge, float slope_log2, ScoreRules rules, FragmentCoord fc) {
    UNROLL_FRAGMENTS
    for (int j = 0; j < N; ++j) {
        UNROLL_FRAGMENTS
        for (int e = 0; e < 2; ++e) {
            const int col = col0 + j * 8 + fc.col + e;
            const int distance = (KEY_ROWS ? col : row) + shift - (KEY_ROWS ? row : col);
            float score = s.frag[j].thread_elements()[e];
            if (rules.softcap) {
                const float capped = precise::tanh(score * rules.raw_scale / rules.softcap_value);
                score = rules.softcap_value * capped * LOG2E;
                softcap_grad.frag[j].thread_elements()[e] = 1.0f - capped * capped;
            } else {
                score *= rules.raw_scale * LOG2E;   // one multiply: the product is loop-invariant
            }
            if (rules.alibi) score -= slope_log2 * float(abs(distance));
            float prob = fast::exp2(score - (KEY_ROWS ? col_lse2[j * 8 + fc.col + e] : row_lse2));
            if (edge) {
                bool visible = row < row_end && col < col_end;
                if (rules.causal) visible = visible && distance >= 0;
                if (rules.window && rules.window_left >= 0) visible = visible && distance <= rules.window_left;
                if (rules.window && rules.window_right >= 0) visible = visible && -distance <= rules.window_right;
                prob = visible ? prob : 0.0f;   // a select: a masked pair's exp2 overflow never reaches P
            }
            s.frag[j].thread_elements()[e] = prob;
        }
    }
}

// dS = P (dP - delta) (times the softcap derivative when capped), rounded to E for the MMAs that take it as flash-attn
// rounds it; delta per row or per column as in probabilities().
template <int N, bool KEY_ROWS, typename E>
METAL_FUNC void score_grads(thread Fragments<N, E>& ds, thread const Fragments<N>& p, thread const Fragments<N>& dp,
                            thread const Fragments<N>& softcap_grad, float row_delta,
                            const threadgroup float* col_delta, bool softcap, FragmentCoord fc) {
    UNROLL_FRAGMENTS
    for (int j = 0; j < N; ++j) {
        UNROLL_FRAGMENTS
        for (int e = 0; e < 2; ++e) {
            const float delta = KEY_ROWS ? col_delta[j * 8 + fc.col + e] : row_delta;
            float grad = p.frag[j].thread_elements()[e] * (dp.frag[j].thread_elements()[e] - delta);
            if (softcap) grad *= softcap_grad.frag[j].thread_elements()[e];
            ds.frag[j].thread_elements()[e] = E(grad);
        }
    }
}

// f rounded to E, fragment by fragment (P for the dV product: flash-attn rounds it to the input type too).
template <int N, typename E>
METAL_FUNC void round_fragments(thread Fragments<N, E>& out, thread const Fragments<N>& f) {
    UNROLL_FRAGMENTS
    for (int j = 0; j < N; ++j) {
        UNROLL_FRAGMENTS
        for (int e = 0; e < 2; ++e) out.frag[j].thread_elements()[e] = E(f.frag[j].thread_elements()[e]);
    }
}

// The lane's elements of an 8 x D fragment row, times `scale`, to a row of D elements.
template <typename T, int D>
METAL_FUNC void store_fragments(device T* row_ptr, thread const Fragments<D / 8>& f, float scale, FragmentCoord fc) {
    UNROLL_FRAGMENTS
    for (int d = 0; d < D / 8; ++d) {
        UNROLL_FRAGMENTS
        for (int e = 0; e < 2; ++e) row_ptr[d * 8 + fc.col + e] = T(f.frag[d].thread_elements()[e] * scale);
    }
}

#define BACKWARD_BUFFERS(T)                                                            \
    const device T* q [[buffer(BACKWARD_BUFFER_Q)]],                                   \
    const device T* k [[buffer(BACKWARD_BUFFER_K)]],                                   \
    const device T* v [[buffer(BACKWARD_BUFFER_V)]],                                   \
    const device T* out [[buffer(BACKWARD_BUFFER_OUT)]],                               \
    const device T* dout [[buffer(BACKWARD_BUFFER_DOUT)]],                             \
    const device float* lse [[buffer(BACKWARD_BUFFER_LSE)]],                           \
    const device float* dlse [[buffer(BACKWARD_BUFFER_DLSE)]],                         \
    device float* delta [[buffer(BACKWARD_BUFFER_DELTA)]],                             \
    device T* dq [[buffer(BACKWARD_BUFFER_DQ)]],                                       \
    device T* dk [[buffer(BACKWARD_BUFFER_DK)]],                                       \
    device T* dv [[buffer(BACKWARD_BUFFER_DV)]],                                       \
    device float* dq_partial [[buffer(BACKWARD_BUFFER_DQ_PARTIAL)]],                   \
    const device int* cu_seqlens_q [[buffer(BACKWARD_BUFFER_CU_SEQLENS_Q)]],           \
    const device int* cu_seqlens_k [[buffer(BACKWARD_BUFFER_CU_SEQLENS_K)]],           \
    constant BackwardParams& p [[buffer(BACKWARD_BUFFER_PARAMS)]],                     \
    const device float* alibi_slopes [[buffer(BACKWARD_BUFFER_ALIBI)]],                \
    uint3 tgid [[threadgroup_position_in_grid]],                                       \
    uint3 grid [[threadgroups_per_grid]],                                              \
    uint tid [[thread_index_in_threadgroup]],                                          \
    ushort sg [[simdgroup_index_in_threadgroup]],                                      \
    ushort lane [[thread_index_in_simdgroup]]

// The dQ partials are [chunks, H, tokens, D] (tokens: B x S, or total): a head's rows are D elements apart, a
// compile-time stride, so the fused kernel addresses them with constant offsets from one pointer per tile.
METAL_FUNC int64_t partial_tokens(constant BackwardParams& p) {
    return p.uniform_seqlen_q >= 0 ? int64_t(p.shape.num_seqs) * p.total_q : int64_t(p.total_q);
}
// Element offset of (chunk 0, head, token `row` of the sequence); the chunk stride is partial_chunk_stride(p).
METAL_FUNC int64_t partial_offset(constant BackwardParams& p, int seq, SequenceSpan span, int row, int head) {
    const int64_t token = (p.uniform_seqlen_q >= 0 ? int64_t(seq) * p.total_q : 0) + span.q_start + row;
    return (head * partial_tokens(p) + token) * p.shape.head_dim;
}
METAL_FUNC int64_t partial_chunk_stride(constant BackwardParams& p) {
    return partial_tokens(p) * p.shape.num_heads * p.shape.head_dim;
}

template <typename T, int D>
[[kernel, max_total_threads_per_threadgroup(BACKWARD_THREADS)]] void attention_backward_delta(BACKWARD_BUFFERS(T)) {
    const int seq = int(tgid.z), head = int(tgid.y);
    const SequenceSpan span = sequence_span(seq, p, cu_seqlens_q, cu_seqlens_k);
    const device T* out_seq = out + element_offset(p.shape.out_strides, seq, span.q_start, head);
    const device T* dout_seq = dout + element_offset(p.dout_strides, seq, span.q_start, head);
    const int64_t row_lse = lse_offset(p.shape.lse_strides, seq, head, span.q_start);
    const int64_t lse_token = p.shape.lse_strides[LSE_TOKEN];
    const int64_t chunk_stride = partial_chunk_stride(p);
    const FragmentCoord fc = fragment_coord(lane);

    for (int64_t block = tgid.x; block * BACKWARD_BLOCK_Q < span.seqlen_q; block += grid.x) {
        const int row = int(block * BACKWARD_BLOCK_Q) + int(sg) * 8 + fc.row;
        if (row >= span.seqlen_q) continue;   // no barrier in this kernel
        // delta = dot(dO, O) - dLSE: the row's four lanes each hold D/4 of its elements.
        const device T* out_row = out_seq + row * p.shape.out_strides[STRIDE_TOKEN];
        const device T* dout_row = dout_seq + row * p.dout_strides[STRIDE_TOKEN];
        device float* partial_row = dq_partial + partial_offset(p, seq, span, row, head);
        float dot = 0.0f;
        UNROLL_FRAGMENTS
        for (int d = 0; d < D / 8; ++d) {
            UNROLL_FRAGMENTS
            for (int e = 0; e < 2; ++e) dot += float(dout_row[d * 8 + fc.col + e]) * float(out_row[d * 8 + fc.col + e]);
            device float* partial = partial_row + d * 8 + fc.col;
            for (int c = 0; c < (wants_dq ? p.num_chunks : 0); ++c, partial += chunk_stride)
                *reinterpret_cast<device float2*>(partial) = float2(0.0f);
        }
        const float row_delta = row_sum(dot) - (p.has_dlse ? dlse[row_lse + row * lse_token] : 0.0f);
        if (fc.col == 0) delta[row_lse + row * lse_token] = row_delta;   // one lane per row
    }

    // Varlen: tokens that unchecked cu_seqlens leave in no sequence (before the first entry or past the last) get
    // exact zero gradients, written here by the first and the last sequence's threadgroups, so dq, dk and dv need no
    // zero-fill pass; the fused and reduce launches write every sequence's rows afterwards (also rows that
    // overlapping cu_seqlens put in a sequence as well). dk / dv rows: by the threadgroups of heads < KV heads.
    if (p.uniform_seqlen_q >= 0) return;
    const bool kv_rows = head < p.shape.num_kv_heads;
    if (seq == 0) {
        const int queries_before = wants_dq ? clamp(cu_seqlens_q[0], 0, p.total_q) : 0;
        zero_token_rows<T, D, BACKWARD_BLOCK_Q>(dq, p.dq_strides, head, 0, queries_before, tgid.x, grid.x, tid);
        const int keys_before = kv_rows ? clamp(cu_seqlens_k[0], 0, p.total_k) : 0;
        zero_token_rows<T, D, BACKWARD_BLOCK_Q>(dk, p.dk_strides, head, 0, wants_dk ? keys_before : 0, tgid.x, grid.x, tid);
        zero_token_rows<T, D, BACKWARD_BLOCK_Q>(dv, p.dv_strides, head, 0, wants_dv ? keys_before : 0, tgid.x, grid.x, tid);
    }
    if (seq == p.shape.num_seqs - 1) {
        const int last = p.shape.num_seqs;
        const int queries_after = wants_dq ? clamp(cu_seqlens_q[last], 0, p.total_q) : p.total_q;
        zero_token_rows<T, D, BACKWARD_BLOCK_Q>(dq, p.dq_strides, head, queries_after, p.total_q, tgid.x, grid.x, tid);
        const int keys_after = kv_rows ? clamp(cu_seqlens_k[last], 0, p.total_k) : p.total_k;
        zero_token_rows<T, D, BACKWARD_BLOCK_Q>(dk, p.dk_strides, head, wants_dk ? keys_after : p.total_k, p.total_k,
                                                tgid.x, grid.x, tid);
        zero_token_rows<T, D, BACKWARD_BLOCK_Q>(dv, p.dv_strides, head, wants_dv ? keys_after : p.total_k, p.total_k,
                                                tgid.x, grid.x, tid);
    }
}

template <typename T, int D>
[[kernel, max_total_threads_per_threadgroup(BACKWARD_THREADS)]] void attention_backward_fused(BACKWARD_BUFFERS(T)) {
    constexpr int BQ = BACKWARD_TILE_QUERIES(sizeof(T), D);
    constexpr int BK = BACKWARD_BLOCK_K;
    constexpr int LD = D + 8;
    static_assert(BK == 4 * 8, "four simdgroups of 8 keys");
    threadgroup uint4 q_storage[KV_TILE_VECTORS(T, BQ, LD)];
    threadgroup uint4 dout_storage[KV_TILE_VECTORS(T, BQ, LD)];
    threadgroup T ds_tile[BK * BQ];   // dS^T of the tile in T: row r holds key r's BQ query columns
    threadgroup float lse2_tile[BQ], delta_tile[BQ];
    threadgroup T* q_tile = reinterpret_cast<threadgroup T*>(q_storage);
    threadgroup T* dout_tile = reinterpret_cast<threadgroup T*>(dout_storage);

    const int seq = int(tgid.z), kv_head = int(tgid.y);
    const int group = p.shape.num_heads / p.shape.num_kv_heads;
    const SequenceSpan span = sequence_span(seq, p, cu_seqlens_q, cu_seqlens_k);
    const int shift = span.seqlen_k - span.seqlen_q;
    const device T* k_seq = k + element_offset(p.shape.k_strides, seq, span.k_start, kv_head);
    const device T* v_seq = v + element_offset(p.shape.v_strides, seq, span.k_start, kv_head);
    device T* dk_seq = dk + element_offset(p.dk_strides, seq, span.k_start, kv_head);
    device T* dv_seq = dv + element_offset(p.dv_strides, seq, span.k_start, kv_head);
    const int64_t k_token = p.shape.k_strides[STRIDE_TOKEN], lse_token = p.shape.lse_strides[LSE_TOKEN];
    const int64_t q_token = p.shape.q_strides[STRIDE_TOKEN], dout_token = p.dout_strides[STRIDE_TOKEN];
    // Steps of the per-tile pointers from one query tile to the next (computed once: the tile loop only adds).
    const int64_t q_step = BQ * q_token, dout_step = BQ * dout_token, lse_step = BQ * lse_token;

    const FragmentCoord fc = fragment_coord(lane);
    // This lane's element of an 8 x 8 fragment of the dQ partials, whose rows are D elements apart.
    device float* partial_lane = dq_partial + int64_t(tgid.x) * partial_chunk_stride(p) + (fc.row * D + fc.col);
    const ScoreRules rules = score_rules(do_causal, has_window, has_softcap, has_alibi, p.mask, p.mask.scale);

    for (int64_t block = tgid.x; block * BK < span.seqlen_k; block += grid.x) {
        const int block_key0 = int(block * BK);
        const int last_key = min(block_key0 + BK, span.seqlen_k) - 1;
        const QueryBand band = query_band(block_key0, last_key, span.seqlen_q, shift, p.mask);
        const int qb_begin = band.begin / BQ;
        const int qb_end = band.end > band.begin ? (band.end + BQ - 1) / BQ : qb_begin;
        const bool keys_valid = block_key0 + BK <= span.seqlen_k;

        // The simdgroup's 8 keys in T, unscaled (S^T = K Q^T is scaled in fp32 by probabilities()).
        const int key = block_key0 + int(sg) * 8 + fc.row;
        const bool key_valid = key < span.seqlen_k;
        Fragments<D / 8, T> k_frag, v_frag;
        Fragments<D / 8> dk_frag, dv_frag;
        load_q<T, D>(k_frag, k_seq + key * k_token, key_valid, 1.0f, fc);
        load_q<T, D>(v_frag, v_seq + key * p.shape.v_strides[STRIDE_TOKEN], key_valid, 1.0f, fc);
        clear<D>(dk_frag);
        clear<D>(dv_frag);
        // This lane's elements of the block's K for dQ += dS K: row j * 8 + fc.row of 8-key group j, columns fc.col and
        // fc.col + 1 of each 8-column block; keys past the sequence read its last key (their dS is exactly zero).
        const device T* k_lane[BK / 8];
        UNROLL_FRAGMENTS
        for (int j = 0; j < BK / 8; ++j) k_lane[j] = k_seq + min(block_key0 + j * 8 + fc.row, last_key) * k_token + fc.col;

        for (int head = kv_head * group; head < (kv_head + 1) * group; ++head) {
            const int row_begin = qb_begin * BQ;
            const device T* q_rows_src = q + element_offset(p.shape.q_strides, seq, span.q_start + row_begin, head);
            const device T* dout_rows_src = dout + element_offset(p.dout_strides, seq, span.q_start + row_begin, head);
            device float* partial_rows = partial_lane + partial_offset(p, seq, span, row_begin, head);
            const int64_t lse_at = lse_offset(p.shape.lse_strides, seq, head, span.q_start + row_begin) + int(tid) * lse_token;
            const device float* lse_rows = lse + lse_at;
            const device float* delta_rows = delta + lse_at;
            const float slope = has_alibi ? alibi_slopes[seq * p.mask.alibi_seq_stride + head] * LOG2E : 0.0f;
            for (int qb = qb_begin; qb < qb_end; ++qb, q_rows_src += q_step, dout_rows_src += dout_step,
                     partial_rows += BQ * D, lse_rows += lse_step, delta_rows += lse_step) {
                const int row0 = qb * BQ;
                const int rows = min(BQ, span.seqlen_q - row0);
                threadgroup_barrier(mem_flags::mem_threadgroup);
                copy_kv_tile<T, D, BQ, LD>(q_tile, q_rows_src, TokenRows{rows, q_token}, tid, BACKWARD_THREADS);
                copy_kv_tile<T, D, BQ, LD>(dout_tile, dout_rows_src, TokenRows{rows, dout_token}, tid, BACKWARD_THREADS);
                if (tid < uint(BQ)) {
                    const bool valid = int(tid) < rows;
                    lse2_tile[tid] = valid ? *lse_rows * LOG2E : 0.0f;
                    delta_tile[tid] = valid ? *delta_rows : 0.0f;
                }
                if (tid == 0) WORK_COUNT("backward_kv_tiles", 1);
                threadgroup_barrier(mem_flags::mem_threadgroup);

                // Five tile products on T operands with fp32 accumulators; P and dS rounded to T (as flash-attn).
                Fragments<BQ / 8> s, dp, softcap_grad;
                Fragments<BQ / 8, T> operand;
                qk_tile<T, D, BQ, LD>(s, k_frag, q_tile);   // S^T = K Q^T
                const bool edge = !keys_valid || rows < BQ ||
                                  !band_interior(row0 + shift, row0 + BQ - 1 + shift, block_key0, last_key, p.mask);
                probabilities<BQ / 8, true>(s, softcap_grad, key, span.seqlen_k, row0, span.seqlen_q, shift, 0.0f,
                                            lse2_tile, edge, slope, rules, fc);
                if (wants_dv) {
                    round_fragments(operand, s);
                    pv_tile<T, D, BQ, LD>(dv_frag, operand, dout_tile);   // dV += P^T dO
                }
                if (!wants_dq && !wants_dk) continue;   // uniform (function constants): no barrier is skipped by some
                qk_tile<T, D, BQ, LD>(dp, v_frag, dout_tile);             // dP^T = V dO^T
                score_grads<BQ / 8, true>(operand, s, dp, softcap_grad, 0.0f, delta_tile, rules.softcap, fc);
                if (wants_dk) pv_tile<T, D, BQ, LD>(dk_frag, operand, q_tile);   // dK += dS^T Q
                if (!wants_dq) continue;
                UNROLL_FRAGMENTS
                for (int j = 0; j < BQ / 8; ++j) simdgroup_store(operand.frag[j], ds_tile + int(sg) * 8 * BQ + j * 8, BQ);
                threadgroup_barrier(mem_flags::mem_threadgroup);

                // dQ += dS K over the block's keys: the tile's (8-row block r, 8-column block d) fragments dealt out to
                // the simdgroups in turn (fragment r * D/8 + d to simdgroup (r * D/8 + d) % 4, the same one every
                // tile), each read from the chunk's partial, accumulated and written back. Every address is a
                // constant offset from partial_rows or k_lane[j] and the simdgroup's first column block d0.
                UNROLL_FRAGMENTS
                for (int r = 0; r < BQ / 8; ++r) {
                    if (rows <= r * 8) break;
                    const bool row_valid = fc.row < rows - r * 8;
                    simdgroup_matrix<T, 8, 8> ds[BK / 8];   // dS rows r, keys j: the transpose of dS^T's block
                    UNROLL_FRAGMENTS
                    for (int j = 0; j < BK / 8; ++j) simdgroup_load(ds[j], ds_tile + j * 8 * BQ + r * 8, BQ, ulong2(0, 0), true);
                    const uint d0 = (uint(sg) + 4u - uint(r * (D / 8)) % 4u) % 4u;
                    device float* acc_row = partial_rows + r * 8 * D + d0 * 8;
                    UNROLL_FRAGMENTS
                    for (int i = 0; i < (D / 8 + 3) / 4; ++i) {
                        if ((D / 8) % 4 != 0 && d0 + 4 * i >= uint(D / 8)) break;
                        device float2* at = reinterpret_cast<device float2*>(acc_row + 32 * i);
                        simdgroup_float8x8 acc;
                        acc.thread_elements() = row_valid ? *at : float2(0.0f);
                        UNROLL_FRAGMENTS
                        for (int j = 0; j < BK / 8; ++j) {
                            simdgroup_matrix<T, 8, 8> kt;
                            UNROLL_FRAGMENTS
                            for (int e = 0; e < 2; ++e) kt.thread_elements()[e] = k_lane[j][d0 * 8 + 32 * i + e];
                            simdgroup_multiply_accumulate(acc, ds[j], kt, acc);
                        }
                        if (row_valid) *at = acc.thread_elements();
                    }
                }
            }
        }
        if (!key_valid) continue;   // only ever true in the last block, so no barrier follows
        if (wants_dk) store_fragments<T, D>(dk_seq + key * p.dk_strides[STRIDE_TOKEN], dk_frag, p.mask.scale, fc);
        if (wants_dv) store_fragments<T, D>(dv_seq + key * p.dv_strides[STRIDE_TOKEN], dv_frag, 1.0f, fc);
    }
}

template <typename T, int D>
[[kernel, max_total_threads_per_threadgroup(BACKWARD_THREADS)]] void attention_backward_dq_reduce(BACKWARD_BUFFERS(T)) {
    const int seq = int(tgid.z), head = int(tgid.y);
    const SequenceSpan span = sequence_span(seq, p, cu_seqlens_q, cu_seqlens_k);
    device T* dq_seq = dq + element_offset(p.dq_strides, seq, span.q_start, head);
    const int64_t chunk_stride = partial_chunk_stride(p);
    const FragmentCoord fc = fragment_coord(lane);

    for (int64_t block = tgid.x; block * BACKWARD_BLOCK_Q < span.seqlen_q; block += grid.x) {
        const int row = int(block * BACKWARD_BLOCK_Q) + int(sg) * 8 + fc.row;
        if (row >= span.seqlen_q) continue;   // no barrier in this kernel
        const device float* partial_row = dq_partial + partial_offset(p, seq, span, row, head);
        device T* dq_row = dq_seq + row * p.dq_strides[STRIDE_TOKEN];
        UNROLL_FRAGMENTS
        for (int d = 0; d < D / 8; ++d) {
            float2 sum = 0.0f;
            const device float* partial = partial_row + d * 8 + fc.col;
            for (int c = 0; c < p.num_chunks; ++c, partial += chunk_stride)   // chunk order: deterministic
                sum += *reinterpret_cast<const device float2*>(partial);
            UNROLL_FRAGMENTS
            for (int e = 0; e < 2; ++e) dq_row[d * 8 + fc.col + e] = T(sum[e] * p.mask.scale);
        }
    }
}

#define INSTANTIATE_BACKWARD(type, d)                                                               \
    template [[host_name("attention_backward_delta_" #type "_" #d)]] [[kernel]]                    \
    decltype(attention_backward_delta<type, d>) attention_backward_delta<type, d>;                 \
    template [[host_name("attention_backward_fused_" #type "_" #d)]] [[kernel]]                    \
    decltype(attention_backward_fused<type, d>) attention_backward_fused<type, d>;                 \
    template [[host_name("attention_backward_dq_reduce_" #type "_" #d)]] [[kernel]]                \
    decltype(attention_backward_dq_reduce<type, d>) attention_backward_dq_reduce<type, d>;
FOR_EACH_HEAD_DIM(INSTANTIATE_BACKWARD, float)
FOR_EACH_HEAD_DIM(INSTANTIATE_BACKWARD, half)
FOR_EACH_HEAD_DIM(INSTANTIATE_BACKWARD, bfloat)
