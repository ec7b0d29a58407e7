// The flash-attention inner step shared by the prefill and decode kernels: 8-row query fragments against a
// BK-key tile in threadgroup memory, S = Q K^T and O += P V on 8x8 fp32 simdgroup MMAs, masks, and the
// base-2 online softmax. Switches (causal, window, softcap, ALiBi) arrive as arguments that callers pass
// from function constants, so each specialisation folds them away.
//
// Fragment layout (Apple GPUs): lane l owns row (q & 4) + (l / 2) % 4 of every 8x8 fragment (q = l / 4) and
// columns frag_col, frag_col + 1, so a query row's running max / sum live in one lane and the four lanes
// that share a row differ in lane bits 0 and 3 (row reductions: simd_shuffle_xor by 1 and 8).
#pragma once
#include <metal_stdlib>

#include "params.h"
using namespace metal;

// A masked score. Finite on purpose: Metal compiles with fast math, which may assume no infinities.
constant constexpr float MASKED = -1.0e30f;
constant constexpr float LOG2E = 1.4426950408889634f;
constant constexpr float LN2 = 0.6931471805599453f;

// Every loop over fragments is unrolled: Apple GPUs cannot index registers, so a rolled loop over
// Fragments<N>::frag[] would put the fragments in stack memory (MLX: STEEL_PRAGMA_UNROLL).
#define UNROLL_FRAGMENTS _Pragma("clang loop unroll(full)")

struct FragmentCoord {
    int row;   // row of the 8x8 fragment this lane holds
    int col;   // first of its two columns
};

METAL_FUNC FragmentCoord fragment_coord(ushort lane) {
    const int quad = lane / 4;
    return {(quad & 4) + (lane / 2) % 4, (quad & 2) * 2 + (lane % 2) * 2};
}

METAL_FUNC float row_max(float x) {
    x = max(x, simd_shuffle_xor(x, 1));
    return max(x, simd_shuffle_xor(x, 8));
}
METAL_FUNC float row_sum(float x) {
    x += simd_shuffle_xor(x, 1);
    return x + simd_shuffle_xor(x, 8);
}

// N 8x8 fragments side by side: 8 rows x 8N columns; fp32 unless E says otherwise (a Q operand may stay in
// its 16-bit input type: half the registers, and the MMA still accumulates in fp32).
template <int N, typename E = float>
struct Fragments {
    simdgroup_matrix<E, 8, 8> frag[N];
};

// Running softmax state of the row this lane holds.
struct OnlineSoftmax {
    float max_log2 = MASKED;   // running max of the base-2 scores
    float denominator = 0.0f;  // running sum of exp2(score - max_log2)
};

// The mask and score transform every kernel applies to one (query, key) pair.
struct ScoreRules {
    bool causal, window, softcap, alibi;   // function constants of the calling kernel
    int window_left, window_right;         // -1: unbounded
    float softcap_value;
    float raw_scale;                       // applied to q.k: the softmax scale, or 1 when Q was loaded pre-scaled
};

// The rules in thread registers, from the constant-space params and the calling kernel's function constants.
METAL_FUNC ScoreRules score_rules(bool causal, bool window, bool softcap, bool alibi, constant MaskParams& mask,
                                  float raw_scale = 1.0f) {
    return {causal, window, softcap, alibi, mask.window_left, mask.window_right, mask.softcap, raw_scale};
}

// Q fragments for the lane's row, times `scale`, in the fragments' element type; invalid rows are zero.
template <typename T, int D, typename E>
METAL_FUNC void load_q(thread Fragments<D / 8, E>& q, const device T* q_row, bool row_valid, float scale, FragmentCoord fc) {
    UNROLL_FRAGMENTS
    for (int d = 0; d < D / 8; ++d) {
        UNROLL_FRAGMENTS
        for (int e = 0; e < 2; ++e)
            q.frag[d].thread_elements()[e] = row_valid ? E(float(q_row[d * 8 + fc.col + e]) * scale) : E(0);
    }
}

template <int D>
METAL_FUNC void clear(thread Fragments<D / 8>& o) {
    UNROLL_FRAGMENTS
    for (int d = 0; d < D / 8; ++d) o.frag[d] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
}

// S = Q K^T for 8 rows and the BK keys of `tile` (row-major, leading dimension LD); K fragments are converted
// to Q's element type (nothing to convert when Q stays in T).
template <typename T, int D, int BK, int LD, typename E>
METAL_FUNC void qk_tile(thread Fragments<BK / 8>& s, thread const Fragments<D / 8, E>& q, const threadgroup T* tile) {
    UNROLL_FRAGMENTS
    for (int j = 0; j < BK / 8; ++j) {
        s.frag[j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
        UNROLL_FRAGMENTS
        for (int d = 0; d < D / 8; ++d) {
            simdgroup_matrix<T, 8, 8> kt;
            simdgroup_load(kt, tile, LD, ulong2(j * 8, d * 8), true);
            simdgroup_matrix<E, 8, 8> kt_e;
            UNROLL_FRAGMENTS
            for (int e = 0; e < 2; ++e) kt_e.thread_elements()[e] = E(kt.thread_elements()[e]);
            simdgroup_multiply_accumulate(s.frag[j], q.frag[d], kt_e, s.frag[j]);
        }
    }
}

// One raw score q.k of key `key` for the row at q_pos -> the base-2 score the softmax takes (scale, softcap, ALiBi),
// or MASKED when the pair is hidden (checked only at an `edge`: see softmax_tile). Key key0 + r exists if it is below
// key_end and bit r of tile_valid is set.
METAL_FUNC float masked_score(float score, int key, int key0, int key_end, uint tile_valid, int q_pos, bool row_valid,
                              bool edge, float slope_log2, ScoreRules rules) {
    const int distance = q_pos - key;
    if (rules.softcap) score = rules.softcap_value * precise::tanh(score * rules.raw_scale / rules.softcap_value) * LOG2E;
    else score *= rules.raw_scale * LOG2E;   // one multiply: the product is loop-invariant
    if (rules.alibi) score -= slope_log2 * float(abs(distance));
    if (edge) {
        bool visible = row_valid && key < key_end && ((tile_valid >> (key - key0)) & 1u) != 0;
        if (rules.causal) visible = visible && distance >= 0;
        if (rules.window && rules.window_left >= 0) visible = visible && distance <= rules.window_left;
        if (rules.window && rules.window_right >= 0) visible = visible && -distance <= rules.window_right;
        score = visible ? score : MASKED;
    }
    return score;
}

// Scores of keys [key0, key0 + BK) for the lane's row at position q_pos -> masked base-2 scores, then
// probabilities relative to the new running max; the state and O are rescaled to that max. A key exists
// if it is below key_end and its bit in tile_valid (bit r: key key0 + r) is set. `edge` false (a tile the
// caller proved wholly visible to every row: inside the band, the sequences and the rows; the decode vector path also
// to padded rows, whose scores it drops) skips every mask test.
template <int D, int BK>
METAL_FUNC void softmax_tile(thread Fragments<BK / 8>& s, thread OnlineSoftmax& state, thread Fragments<D / 8>& o,
                             int key0, int key_end, uint tile_valid, int q_pos, bool row_valid, bool edge,
                             float slope_log2, ScoreRules rules, FragmentCoord fc) {
    float block_max = MASKED;
    UNROLL_FRAGMENTS
    for (int j = 0; j < BK / 8; ++j) {
        UNROLL_FRAGMENTS
        for (int e = 0; e < 2; ++e) {
            const float score = masked_score(s.frag[j].thread_elements()[e], key0 + j * 8 + fc.col + e, key0, key_end,
                                             tile_valid, q_pos, row_valid, edge, slope_log2, rules);
            s.frag[j].thread_elements()[e] = score;
            block_max = max(block_max, score);
        }
    }
    const float new_max = max(state.max_log2, row_max(block_max));
    // exp2 of (MASKED - real max) underflows to 0; a fully masked row keeps p = 0 explicitly (no NaN).
    const float rescale = fast::exp2(state.max_log2 - new_max);
    float block_sum = 0.0f;
    UNROLL_FRAGMENTS
    for (int j = 0; j < BK / 8; ++j) {
        UNROLL_FRAGMENTS
        for (int e = 0; e < 2; ++e) {
            const float score = s.frag[j].thread_elements()[e];
            const float prob = edge && score == MASKED ? 0.0f : fast::exp2(score - new_max);
            s.frag[j].thread_elements()[e] = prob;
            block_sum += prob;
        }
    }
    state.denominator = state.denominator * rescale + row_sum(block_sum);
    state.max_log2 = new_max;
    UNROLL_FRAGMENTS
    for (int d = 0; d < D / 8; ++d) o.frag[d].thread_elements() *= rescale;
}

// A fragment's two elements in E: already E (the backward's T operands), or converted to fp32 by the vector
// constructor.
template <typename E>
struct FragmentElements {
    METAL_FUNC static vec<E, 2> from(vec<E, 2> x) { return x; }
};
template <>
struct FragmentElements<float> {
    template <typename T>
    METAL_FUNC static float2 from(vec<T, 2> x) { return float2(x); }
};

// O += P V with the BK x D value tile in threadgroup memory; V fragments are converted to P's element type
// (nothing to convert when P is in T, as the backward rounds it).
template <typename T, int D, int BK, int LD, typename E = float>
METAL_FUNC void pv_tile(thread Fragments<D / 8>& o, thread const Fragments<BK / 8, E>& p, const threadgroup T* tile) {
    UNROLL_FRAGMENTS
    for (int j = 0; j < BK / 8; ++j) {
        UNROLL_FRAGMENTS
        for (int d = 0; d < D / 8; ++d) {
            simdgroup_matrix<T, 8, 8> vt;
            simdgroup_load(vt, tile, LD, ulong2(d * 8, j * 8));
            simdgroup_matrix<E, 8, 8> vt_e;
            vt_e.thread_elements() = FragmentElements<E>::from(vt.thread_elements());
            simdgroup_multiply_accumulate(o.frag[d], p.frag[j], vt_e, o.frag[d]);
        }
    }
}

// Sinks (gpt-oss): a logit that joins the denominator only; folded into the running max for stability.
template <int D>
METAL_FUNC void fold_sink(thread OnlineSoftmax& state, thread Fragments<D / 8>& o, float sink_log2) {
    const float new_max = max(state.max_log2, sink_log2);
    const float rescale = fast::exp2(state.max_log2 - new_max);
    state.denominator = state.denominator * rescale + fast::exp2(sink_log2 - new_max);
    state.max_log2 = new_max;
    UNROLL_FRAGMENTS
    for (int d = 0; d < D / 8; ++d) o.frag[d].thread_elements() *= rescale;
}

// Wide heads (HEAD_PARTS, params.h): simdgroup `simdgroup` publishes its S, partial over its part of the head dim;
// after a barrier, sum_score_parts gives every part of the row group the whole S, added in part order (so the parts'
// softmax states agree bit for bit).
template <int BK>
METAL_FUNC void share_score_part(thread const Fragments<BK / 8>& s, threadgroup float* exchange, int simdgroup,
                                 ushort lane) {
    UNROLL_FRAGMENTS
    for (int j = 0; j < BK / 8; ++j) {
        UNROLL_FRAGMENTS
        for (int e = 0; e < 2; ++e) exchange[((simdgroup * (BK / 8) + j) * 2 + e) * 32 + lane] = s.frag[j].thread_elements()[e];
    }
}

template <int BK, int PARTS>
METAL_FUNC void sum_score_parts(thread Fragments<BK / 8>& s, const threadgroup float* exchange, int row_group,
                                ushort lane) {
    UNROLL_FRAGMENTS
    for (int j = 0; j < BK / 8; ++j) {
        UNROLL_FRAGMENTS
        for (int e = 0; e < 2; ++e) {
            float sum = 0.0f;
            UNROLL_FRAGMENTS
            for (int part = 0; part < PARTS; ++part)
                sum += exchange[(((row_group * PARTS + part) * (BK / 8) + j) * 2 + e) * 32 + lane];
            s.frag[j].thread_elements()[e] = sum;
        }
    }
}

// Normalised output row and natural-log LSE (written when writes_lse: one head part per row). A row that sees no key
// (and no sink) gives zeros and -inf.
template <typename T, int D>
METAL_FUNC void store_row(device T* out_row, device float* lse, thread const OnlineSoftmax& state,
                          thread const Fragments<D / 8>& o, FragmentCoord fc, bool writes_lse) {
    const float inv = state.denominator > 0.0f ? 1.0f / state.denominator : 0.0f;
    UNROLL_FRAGMENTS
    for (int d = 0; d < D / 8; ++d) {
        UNROLL_FRAGMENTS
        for (int e = 0; e < 2; ++e) out_row[d * 8 + fc.col + e] = T(o.frag[d].thread_elements()[e] * inv);
    }
    if (writes_lse && fc.col == 0)   // one lane per row
        *lse = state.denominator > 0.0f ? (state.max_log2 + log2(state.denominator)) * LN2 : -INFINITY;
}
