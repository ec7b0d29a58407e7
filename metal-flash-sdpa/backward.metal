// Flash attention backward (FlashAttention-2, Dao 2023, algorithm 2 split in two passes) for the prefill layouts:
// packed varlen [total, H, D] with cu_seqlens, or batched [B, S, H, D]. P is recomputed from q, k and the forward's
// LSE, so nothing of size n^2 is ever stored.
//
// 1. attention_backward_dq, grid (query blocks, heads, sequences), 4 simdgroups x 8 query rows: per row
//    delta = dot(dO, O) - dLSE (written out for pass 2), then over the key band of its block
//    dP = dO V^T, dS = P (dP - delta), dQ += scale dS K.
// 2. attention_backward_dkv, grid (key blocks, KV heads, sequences), 4 simdgroups x 8 keys: over the query heads of
//    its KV head (GQA sums there, in registers) and the query band of its keys, S^T = K Q^T, P^T,
//    dV += P^T dO, dP^T = V dO^T, dS^T, dK += scale dS^T Q.
// Every output element has exactly one writer and a fixed summation order: deterministic, no atomics. The work is
// O(n * window) like the forward: each pass visits only the tiles of its band (WORK_COUNT proves it).
#include <metal_stdlib>

#include "common/attention_tile.h"
#include "common/kv_tile.h"
#include "common/mask_band.h"
#include "common/params.h"
#include "common/strided.h"
#include "common/work_counters.h"
using namespace metal;

// P = exp2(score - LSE) for the 8 x 8N scores this lane holds, in place, from the forward's base-2 LSE; with
// softcap also d(capped score)/d(raw score) = 1 - tanh^2. KEY_ROWS: the fragment rows are keys and the columns
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
                const float capped = precise::tanh(score / rules.softcap_value);
                score = rules.softcap_value * capped;
                softcap_grad.frag[j].thread_elements()[e] = 1.0f - capped * capped;
            }
            score *= LOG2E;
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

// dS = P (dP - delta), in place of P (times the softcap derivative when capped); delta per row or per column
// as in probabilities().
template <int N, bool KEY_ROWS>
METAL_FUNC void score_grads(thread Fragments<N>& p, thread const Fragments<N>& dp,
                            thread const Fragments<N>& softcap_grad, float row_delta,
                            const threadgroup float* col_delta, bool softcap, FragmentCoord fc) {
    UNROLL_FRAGMENTS
    for (int j = 0; j < N; ++j) {
        UNROLL_FRAGMENTS
        for (int e = 0; e < 2; ++e) {
            const float delta = KEY_ROWS ? col_delta[j * 8 + fc.col + e] : row_delta;
            float ds = p.frag[j].thread_elements()[e] * (dp.frag[j].thread_elements()[e] - delta);
            if (softcap) ds *= softcap_grad.frag[j].thread_elements()[e];
            p.frag[j].thread_elements()[e] = ds;
        }
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
    const device int* cu_seqlens_q [[buffer(BACKWARD_BUFFER_CU_SEQLENS_Q)]],           \
    const device int* cu_seqlens_k [[buffer(BACKWARD_BUFFER_CU_SEQLENS_K)]],           \
    constant BackwardParams& p [[buffer(BACKWARD_BUFFER_PARAMS)]],                     \
    const device float* alibi_slopes [[buffer(BACKWARD_BUFFER_ALIBI)]],                \
    uint3 tgid [[threadgroup_position_in_grid]],                                       \
    uint3 grid [[threadgroups_per_grid]],                                              \
    uint tid [[thread_index_in_threadgroup]],                                          \
    ushort sg [[simdgroup_index_in_threadgroup]],                                      \
    ushort lane [[thread_index_in_simdgroup]]

template <typename T, int D>
[[kernel, max_total_threads_per_threadgroup(BACKWARD_THREADS)]] void attention_backward_dq(BACKWARD_BUFFERS(T)) {
    constexpr int BK = KV_TILE_KEYS(D);
    constexpr int LD = D + 8;   // padded row: staggers threadgroup memory banks
    threadgroup uint4 tile_storage[KV_TILE_VECTORS(T, BK, LD)];
    threadgroup T* tile = reinterpret_cast<threadgroup T*>(tile_storage);

    const int seq = int(tgid.z), head = int(tgid.y);
    const SequenceSpan span = sequence_span(seq, p, cu_seqlens_q, cu_seqlens_k);
    const int kv_head = head / (p.shape.num_heads / p.shape.num_kv_heads);
    const int shift = span.seqlen_k - span.seqlen_q;   // bottom-right alignment
    const device T* q_seq = q + element_offset(p.shape.q_strides, seq, span.q_start, head);
    const device T* out_seq = out + element_offset(p.shape.out_strides, seq, span.q_start, head);
    const device T* dout_seq = dout + element_offset(p.dout_strides, seq, span.q_start, head);
    device T* dq_seq = dq + element_offset(p.dq_strides, seq, span.q_start, head);
    const int64_t row_lse = lse_offset(p.shape.lse_strides, seq, head, span.q_start);
    const int64_t lse_token = p.shape.lse_strides[LSE_TOKEN];
    const device T* k_head = k + element_offset(p.shape.k_strides, seq, span.k_start, kv_head);
    const device T* v_head = v + element_offset(p.shape.v_strides, seq, span.k_start, kv_head);
    const float slope = has_alibi ? alibi_slopes[seq * p.mask.alibi_seq_stride + head] * LOG2E : 0.0f;

    const FragmentCoord fc = fragment_coord(lane);
    const ScoreRules rules = score_rules(do_causal, has_window, has_softcap, has_alibi, p.mask);

    for (int64_t block = tgid.x; block * BACKWARD_BLOCK_Q < span.seqlen_q; block += grid.x) {
        const int block_row0 = int(block * BACKWARD_BLOCK_Q);
        const int last_row = min(block_row0 + BACKWARD_BLOCK_Q, span.seqlen_q) - 1;
        const KeyBand band = key_band(block_row0 + shift, last_row + shift, span.seqlen_k, p.mask);
        const int kb_begin = band.begin / BK;
        const int kb_end = band.end > band.begin ? (band.end + BK - 1) / BK : kb_begin;

        const int row = block_row0 + int(sg) * 8 + fc.row;
        const bool row_valid = row < span.seqlen_q;
        Fragments<D / 8> q_frag, dout_frag, dq_frag;
        load_q<T, D>(q_frag, q_seq + row * p.shape.q_strides[STRIDE_TOKEN], row_valid, p.mask.scale, fc);
        load_q<T, D>(dout_frag, dout_seq + row * p.dout_strides[STRIDE_TOKEN], row_valid, 1.0f, fc);
        clear<D>(dq_frag);
        // delta = dot(dO, O) - dLSE: the row's four lanes each hold D/4 of its elements.
        float dot = 0.0f;
        const device T* out_row = out_seq + row * p.shape.out_strides[STRIDE_TOKEN];
        UNROLL_FRAGMENTS
        for (int d = 0; d < D / 8; ++d) {
            UNROLL_FRAGMENTS
            for (int e = 0; e < 2; ++e)
                dot += row_valid ? dout_frag.frag[d].thread_elements()[e] * float(out_row[d * 8 + fc.col + e]) : 0.0f;
        }
        float row_delta = row_sum(dot);
        float row_lse2 = 0.0f;
        if (row_valid) {
            row_delta -= p.has_dlse ? dlse[row_lse + row * lse_token] : 0.0f;
            row_lse2 = lse[row_lse + row * lse_token] * LOG2E;
            if (fc.col == 0) delta[row_lse + row * lse_token] = row_delta;   // one lane per row
        }
        const bool rows_valid = block_row0 + BACKWARD_BLOCK_Q <= span.seqlen_q;

        for (int kb = kb_begin; kb < kb_end; ++kb) {
            const int key0 = kb * BK;
            const TokenRows v_rows{min(BK, span.seqlen_k - key0), p.shape.v_strides[STRIDE_TOKEN]};
            const TokenRows k_rows{v_rows.rows, p.shape.k_strides[STRIDE_TOKEN]};
            // One tile buffer (the forward's size): V first for dP, then K for S and dQ.
            threadgroup_barrier(mem_flags::mem_threadgroup);
            copy_kv_tile<T, D, BK, LD>(tile, v_head + int64_t(key0) * v_rows.token_stride, v_rows, tid, BACKWARD_THREADS);
            threadgroup_barrier(mem_flags::mem_threadgroup);
            Fragments<BK / 8> dp, s, softcap_grad;
            qk_tile<T, D, BK, LD>(dp, dout_frag, tile);
            threadgroup_barrier(mem_flags::mem_threadgroup);
            copy_kv_tile<T, D, BK, LD>(tile, k_head + int64_t(key0) * k_rows.token_stride, k_rows, tid, BACKWARD_THREADS);
            if (tid == 0) WORK_COUNT("backward_dq_tiles", 1);
            threadgroup_barrier(mem_flags::mem_threadgroup);
            qk_tile<T, D, BK, LD>(s, q_frag, tile);
            const bool edge = !rows_valid || key0 + BK > span.seqlen_k ||
                              !band_interior(block_row0 + shift, last_row + shift, key0, key0 + BK - 1, p.mask);
            probabilities<BK / 8, false>(s, softcap_grad, row, span.seqlen_q, key0, span.seqlen_k, shift, row_lse2,
                                         nullptr, edge, slope, rules, fc);
            score_grads<BK / 8, false>(s, dp, softcap_grad, row_delta, nullptr, rules.softcap, fc);
            pv_tile<T, D, BK, LD>(dq_frag, s, tile);
        }
        if (row_valid) store_fragments<T, D>(dq_seq + row * p.dq_strides[STRIDE_TOKEN], dq_frag, p.mask.scale, fc);
    }
}

template <typename T, int D>
[[kernel, max_total_threads_per_threadgroup(BACKWARD_THREADS)]] void attention_backward_dkv(BACKWARD_BUFFERS(T)) {
    constexpr int BQ = BACKWARD_TILE_QUERIES(sizeof(T), D);
    constexpr int LD = D + 8;
    threadgroup uint4 q_storage[KV_TILE_VECTORS(T, BQ, LD)];
    threadgroup uint4 dout_storage[KV_TILE_VECTORS(T, BQ, LD)];
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
    const int64_t lse_token = p.shape.lse_strides[LSE_TOKEN];

    const FragmentCoord fc = fragment_coord(lane);
    const ScoreRules rules = score_rules(do_causal, has_window, has_softcap, has_alibi, p.mask);

    for (int64_t block = tgid.x; block * BACKWARD_BLOCK_K < span.seqlen_k; block += grid.x) {
        const int block_key0 = int(block * BACKWARD_BLOCK_K);
        const int last_key = min(block_key0 + BACKWARD_BLOCK_K, span.seqlen_k) - 1;
        const QueryBand band = query_band(block_key0, last_key, span.seqlen_q, shift, p.mask);
        const int qb_begin = band.begin / BQ;
        const int qb_end = band.end > band.begin ? (band.end + BQ - 1) / BQ : qb_begin;
        const bool keys_valid = block_key0 + BACKWARD_BLOCK_K <= span.seqlen_k;

        const int key = block_key0 + int(sg) * 8 + fc.row;
        const bool key_valid = key < span.seqlen_k;
        Fragments<D / 8> k_frag, v_frag, dk_frag, dv_frag;
        load_q<T, D>(k_frag, k_seq + key * p.shape.k_strides[STRIDE_TOKEN], key_valid, p.mask.scale, fc);
        load_q<T, D>(v_frag, v_seq + key * p.shape.v_strides[STRIDE_TOKEN], key_valid, 1.0f, fc);
        clear<D>(dk_frag);
        clear<D>(dv_frag);

        for (int head = kv_head * group; head < (kv_head + 1) * group; ++head) {
            const device T* q_head = q + element_offset(p.shape.q_strides, seq, span.q_start, head);
            const device T* dout_head = dout + element_offset(p.dout_strides, seq, span.q_start, head);
            const int64_t head_lse = lse_offset(p.shape.lse_strides, seq, head, span.q_start);
            const float slope = has_alibi ? alibi_slopes[seq * p.mask.alibi_seq_stride + head] * LOG2E : 0.0f;
            for (int qb = qb_begin; qb < qb_end; ++qb) {
                const int row0 = qb * BQ;
                const TokenRows q_rows{min(BQ, span.seqlen_q - row0), p.shape.q_strides[STRIDE_TOKEN]};
                const TokenRows dout_rows{q_rows.rows, p.dout_strides[STRIDE_TOKEN]};
                threadgroup_barrier(mem_flags::mem_threadgroup);
                copy_kv_tile<T, D, BQ, LD>(q_tile, q_head + int64_t(row0) * q_rows.token_stride, q_rows, tid, BACKWARD_THREADS);
                copy_kv_tile<T, D, BQ, LD>(dout_tile, dout_head + int64_t(row0) * dout_rows.token_stride, dout_rows, tid,
                                           BACKWARD_THREADS);
                if (tid < uint(BQ)) {
                    const bool valid = int(tid) < q_rows.rows;
                    const int64_t at = head_lse + (row0 + int(tid)) * lse_token;
                    lse2_tile[tid] = valid ? lse[at] * LOG2E : 0.0f;
                    delta_tile[tid] = valid ? delta[at] : 0.0f;
                }
                if (tid == 0) WORK_COUNT("backward_kv_tiles", 1);
                threadgroup_barrier(mem_flags::mem_threadgroup);

                Fragments<BQ / 8> s, dp, softcap_grad;
                qk_tile<T, D, BQ, LD>(s, k_frag, q_tile);   // S^T
                const bool edge = !keys_valid || q_rows.rows < BQ ||
                                  !band_interior(row0 + shift, row0 + BQ - 1 + shift, block_key0, last_key, p.mask);
                probabilities<BQ / 8, true>(s, softcap_grad, key, span.seqlen_k, row0, span.seqlen_q, shift, 0.0f,
                                            lse2_tile, edge, slope, rules, fc);
                pv_tile<T, D, BQ, LD>(dv_frag, s, dout_tile);   // dV += P^T dO
                qk_tile<T, D, BQ, LD>(dp, v_frag, dout_tile);   // dP^T = V dO^T
                score_grads<BQ / 8, true>(s, dp, softcap_grad, 0.0f, delta_tile, rules.softcap, fc);
                pv_tile<T, D, BQ, LD>(dk_frag, s, q_tile);      // dK += dS^T Q
            }
        }
        if (!key_valid) continue;   // only ever true in the last block, so no barrier follows
        store_fragments<T, D>(dk_seq + key * p.dk_strides[STRIDE_TOKEN], dk_frag, p.mask.scale, fc);
        store_fragments<T, D>(dv_seq + key * p.dv_strides[STRIDE_TOKEN], dv_frag, 1.0f, fc);
    }
}

#define INSTANTIATE_BACKWARD(type, d)                                                               \
    template [[host_name("attention_backward_dq_" #type "_" #d)]] [[kernel]]                       \
    decltype(attention_backward_dq<type, d>) attention_backward_dq<type, d>;                       \
    template [[host_name("attention_backward_dkv_" #type "_" #d)]] [[kernel]]                      \
    decltype(attention_backward_dkv<type, d>) attention_backward_dkv<type, d>;
FOR_EACH_HEAD_DIM(INSTANTIATE_BACKWARD, float)
FOR_EACH_HEAD_DIM(INSTANTIATE_BACKWARD, half)
FOR_EACH_HEAD_DIM(INSTANTIATE_BACKWARD, bfloat)
