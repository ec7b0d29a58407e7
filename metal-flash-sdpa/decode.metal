// Flash-Decoding over a paged KV cache and its split-K reduce.
//
// attention_decode: grid (partitions, KV heads x row chunks, sequences); 32-128 threads. A threadgroup
// takes the query rows of one KV head (its H / Hkv query heads x the Sq new tokens, row r = head-in-group
// * Sq + token; at most DECODE_MAX_ROWS) against one partition of keys, so each K/V byte of a step is read
// once. Keys are read in place through block_table (no gather). The partition is band-limited like the
// prefill K loop; a partition with no key in the band exits before any math and, when split, writes
// neutral partials (max -FLT_MAX, sum 0, out 0) so the reduce stays NaN-free. Without a split
// (FC_SPLIT_K false) the kernel writes the final output itself.
//
// Everything read from data is guarded: seqlens are clamped to the table's capacity and a block_table
// entry outside [0, num_blocks) hides its keys, so no input can index outside the cache.
#include <metal_stdlib>

#include "common/attention_tile.h"
#include "common/kv_quant.h"
#include "common/kv_tile.h"
#include "common/mask_band.h"
#include "common/params.h"
#include "common/strided.h"
#include "common/work_counters.h"
using namespace metal;

constant bool split_k [[function_constant(FC_SPLIT_K)]];

// Keys of one sequence: key j (0-based) lives at cache position kv_start + j.
struct SequenceKeys {
    int kv_start;
    int count;
};

// The lengths are uniform over the threadgroup: lane 0 of each simdgroup reads them and broadcasts.
METAL_FUNC SequenceKeys sequence_keys(const device int* seqlens_k, const device int* kv_start, int seq,
                                      constant DecodeParams& p, ushort lane) {
    // 64-bit: cache_seqlens + the appended tokens can pass 2^31; the capacity itself fits (host check).
    const int64_t capacity = int64_t(p.blocks_per_seq) * p.block_size.divisor;
    const int seqlen = simd_broadcast(lane == 0 ? seqlens_k[seq] : 0, 0);
    const int end = int(clamp(int64_t(seqlen) + p.new_keys, int64_t(0), capacity));
    const int first = p.has_kv_start ? simd_broadcast(lane == 0 ? kv_start[seq] : 0, 0) : 0;
    const int start = clamp(first, 0, end);
    return {start, end - start};
}

// The query rows of a threadgroup's KV head: row r is query head kv_head * group + r / seqlen_q, new token
// r % seqlen_q.
struct QueryRows {
    int count, group, seqlen_q, kv_head;
    // (one new token, a decode step's usual case, needs no division)
    METAL_FUNC int head(int r) const { return kv_head * group + (seqlen_q == 1 ? r : r / seqlen_q); }
    METAL_FUNC int token(int r) const { return seqlen_q == 1 ? 0 : r % seqlen_q; }
};

// What attend_tile loads into the tile: K, then V in its place.
template <typename T>
struct TileLoads {
    threadgroup uint4* tile_storage;   // the tile (with its affine pairs: kv_quant.h, affine_pair)
    CacheTile<T> k, v;
    uint tid, threads;
};

// A simdgroup's head part (HEAD_PARTS, params.h): which part of Q / O it holds, among the parts of its row group.
struct HeadPart {
    int part, row_group, simdgroup;
    threadgroup float* score_parts;   // the exchange of partial scores (wide heads)
};

// One K/V tile for a simdgroup's KEYS keys at `slice` (rows of the tile in threadgroup memory): S = Q K^T (its
// head part's, summed over the parts after the barrier that frees the K tile), the V tile replaces K, the online
// softmax runs while the V loads are in flight (as prefill's), and O += P V. An affine tile holds the codes and each
// key's (scale, bias) per group: S and P V are computed with the exact affine values in fp32, the affine map folded
// out of the MMAs per 32-element block (kv_quant.h: affine_qk_tile, affine_pv_tile; q_block_sum: Q's row sums per
// block, value_bias: the running P bias per block), so each packed byte is read once. Affine caches have equal head
// dims up to KV_QUANT_MAX_HEAD_DIM (the host checks), so there DKP == DK and DVP == DV.
template <typename T, int DK, int DV, int BK, int KEYS, int LD>
METAL_FUNC void attend_tile(thread Fragments<DV / HEAD_PARTS(DV) / 8>& o, thread float* value_bias,
                            thread OnlineSoftmax& state, thread const Fragments<DK / HEAD_PARTS(DV) / 8>& q,
                            thread const float* q_block_sum, int slice_row, int key0, int key_end, uint valid, int q_pos,
                            bool row_valid, float slope, ScoreRules rules, FragmentCoord fc, TileLoads<T> loads,
                            HeadPart head, ushort lane) {
    constexpr int PARTS = HEAD_PARTS(DV), DKP = DK / PARTS, DVP = DV / PARTS;
    threadgroup T* tile = reinterpret_cast<threadgroup T*>(loads.tile_storage);
    const threadgroup T* rows = tile + slice_row * LD;
    Fragments<KEYS / 8> s;
    if (kv_quantized && loads.k.kind == KV_AFFINE)
        affine_qk_tile<T, DKP, BK, KEYS, LD>(s, q, q_block_sum, tile, slice_row, loads.k, fc);
    else
        qk_tile<T, DKP, KEYS, LD>(s, q, rows + head.part * DKP);
    if (PARTS > 1) share_score_part<KEYS>(s, head.score_parts, head.simdgroup, lane);
    const float old_max = state.max_log2;   // before softmax_tile moves it: the running P bias's rescale
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (PARTS > 1) sum_score_parts<KEYS, PARTS>(s, head.score_parts, head.row_group, lane);
    if (!v_in_k_tile) {
        load_cache_tile<T, DV, BK, LD>(tile, loads.v, loads.tid, loads.threads);
        if (loads.tid == 0) WORK_COUNT("v_tiles_loaded", 1);
    }
    softmax_tile<DVP, KEYS>(s, state, o, key0 + slice_row, key_end, valid >> slice_row, q_pos, row_valid, true, slope,
                            rules, fc);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (kv_quantized && loads.v.kind == KV_AFFINE) {
        const float rescale = fast::exp2(old_max - state.max_log2);   // softmax_tile's, for the running P bias
        UNROLL_FRAGMENTS
        for (int b = 0; b < kv_affine_blocks<DVP>(); ++b) value_bias[b] *= rescale;
        affine_pv_tile<T, DVP, BK, KEYS, LD>(o, value_bias, s, tile, slice_row, loads.v, fc);
    } else {
        pv_tile<T, DVP, KEYS, LD>(o, s, rows + head.part * DVP);
    }
}

// ---------------------------------------------------------------------------------------------- direct path
// Affine K and V (kv_quant.h), head dim 64 or 128, at most 8 query rows (key slices): each slice reads the raw codes
// of its 8 keys of a tile from the device straight into MMA fragments, with no threadgroup tile (2 barriers a tile
// instead of 4), and the affine map x = scale * code + bias (scale, bias per key and group) is folded out of the MMAs:
// - S[r, j] = sum_g scale[j, g] (Q_g . code_j,g) + bias[j, g] qsum[r, g]: Q (T) times the codes (T, exact) into one
//   fp32 accumulator per group, then scaled per key; qsum[r, g] (sum of Q's row r over group g) is computed at Q load;
// - O[r, :] += sum_j (P[r, j] scale[j, g]) code_j,g + sum_j P[r, j] bias[j, g]: P scaled per key for each group times
//   the codes (fp32), and per lane a running sum of P bias per group (value_bias, rescaled with O), added to O once.
// The kernel computes with the exact affine values in fp32 (no rounding of a dequantized element to T, as MLX's
// quantized matmuls), which dequantize_kv rounds to T. A dot product does not see the order of the head dim, so the
// kernel permutes it in blocks of 32 elements (a block lies in one quantization group: groups are 32 to 128 elements):
// - S = Q K^T: row k of K^T fragment 4 a + b is element 32 a + 4 k + b, so a lane reads 4 codes of each of its two keys
//   per block; Q is loaded in the same order (load_q_direct);
// - O += P V: column c of V fragment 4 a + b is element 32 a + 8 (c / 2) + 2 b + c % 2, so a lane reads 8 codes of its
//   key per block; O's columns come out in that order and are put back before the store (unpermute_o).
// The fragments of a group are GROUP_BLOCKS = group_size / 32 consecutive blocks (a template argument, chosen per
// tile). Lane l reads the scale and bias of key l % 8 and group l / 8 (each once) and the lanes shuffle them.
template <int D>
constexpr bool direct_head_dim() { return D == 64 || D == 128; }

// Q in the direct path's order as T fragments, unscaled (exact), and the sums of its row over each block. Every slice
// reads it: Q is 1/64 of a 32-key tile's K/V bytes at 8 rows, and no conversion or barrier is needed.
template <typename T, int D>
struct DirectQ {
    Fragments<D / 8, T> q;
    float block_sum[D / KV_AFFINE_BLOCK];
};

template <typename T, int D>
METAL_FUNC void load_q_direct(thread DirectQ<T, D>& dq, const device T* q_row, bool row_valid, FragmentCoord fc) {
    UNROLL_FRAGMENTS
    for (int a = 0; a < D / KV_AFFINE_BLOCK; ++a) {
        float sum = 0.0f;
        UNROLL_FRAGMENTS
        for (int b = 0; b < 4; ++b) {
            UNROLL_FRAGMENTS
            for (int e = 0; e < 2; ++e) {
                const T x = row_valid ? q_row[KV_AFFINE_BLOCK * a + 4 * (fc.col + e) + b] : T(0);
                dq.q.frag[4 * a + b].thread_elements()[e] = x;
                sum += float(x);
            }
        }
        dq.block_sum[a] = row_sum(sum);
    }
}

// The blocks of a quantization group (direct path: K and V share the group size, the kernel's `direct` condition), and
// whether the groups whose scales and biases the lane reads exist (direct and vector paths).
struct DirectGroups {
    int blocks = 1;
    bool k_exists = false, v_exists = false;
};

template <int D>
METAL_FUNC DirectGroups direct_groups(CacheFormat k, CacheFormat v, ushort lane) {
    return {k.group_size / KV_AFFINE_BLOCK, lane / 8 < (D >> group_size_log2(k.group_size)),
            lane / 8 < (D >> group_size_log2(v.group_size))};
}

// The (scale, bias) of group g of the slice's key `key`: lane g * 8 + key holds it (kv_quant.h: fold_scores).
struct ShuffledAffine {
    float2 mine;
    METAL_FUNC float2 operator()(int group, int key) const { return simd_shuffle(mine, ushort(group * 8 + key)); }
};

// The row offset lane `from` holds (a 64-bit value as two 32-bit shuffles).
METAL_FUNC int64_t shuffle_offset(int64_t offset, int from) {
    return as_type<int64_t>(simd_shuffle(as_type<int2>(offset), ushort(from)));
}

// One slice's 8 keys (tile rows first..first + 7) on the direct path, GROUP_BLOCKS blocks a group: S = Q K^T, the
// online softmax, O += P V; value_bias[g] is the lane's running sum of P bias over its two keys (per group).
template <typename T, int D, int GROUP_BLOCKS>
METAL_FUNC void attend_direct(thread Fragments<D / 8>& o, thread float* value_bias, thread OnlineSoftmax& state,
                              thread const DirectQ<T, D>& dq, CacheTile<T> k, CacheTile<T> v, DirectGroups groups,
                              int first, int key0, int key_end, uint valid, int q_pos, bool row_valid, float slope,
                              ScoreRules rules, float scale, FragmentCoord fc, ushort lane) {
    constexpr int BLOCKS = D / KV_AFFINE_BLOCK, GROUPS = BLOCKS / GROUP_BLOCKS;
    const int mine = first + lane % 8, group = lane / 8;
    const int64_t k_row = k.offset[mine], v_row = v.offset[mine];   // key l % 8 (-1 in both: no key)
    const float2 k_mine = affine_group_at(k, k_row >= 0, k.scale_offset[mine], group, groups.k_exists);
    const float2 v_mine = affine_group_at(v, k_row >= 0, v.scale_offset[mine], group, groups.v_exists);
    uint codes[2][BLOCKS][4];
    UNROLL_FRAGMENTS
    for (int e = 0; e < 2; ++e)
        row_codes<T, 4, BLOCKS, KV_AFFINE_BLOCK>(codes[e], k, shuffle_offset(k_row, fc.col + e), 4 * fc.row);
    Fragments<1> dots[GROUPS];   // Q_g . code_j,g
    UNROLL_FRAGMENTS
    for (int g = 0; g < GROUPS; ++g) dots[g].frag[0] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    UNROLL_FRAGMENTS
    for (int a = 0; a < BLOCKS; ++a) {
        UNROLL_FRAGMENTS
        for (int b = 0; b < 4; ++b) {
            simdgroup_matrix<T, 8, 8> kt;
            UNROLL_FRAGMENTS
            for (int e = 0; e < 2; ++e) kt.thread_elements()[e] = T(codes[e][a][b]);
            simdgroup_multiply_accumulate(dots[a / GROUP_BLOCKS].frag[0], dq.q.frag[4 * a + b], kt,
                                          dots[a / GROUP_BLOCKS].frag[0]);
        }
    }
    float q_sum[GROUPS];   // of the lane's row over each group
    UNROLL_FRAGMENTS
    for (int g = 0; g < GROUPS; ++g) {
        q_sum[g] = dq.block_sum[g * GROUP_BLOCKS];
        UNROLL_FRAGMENTS
        for (int a = g * GROUP_BLOCKS + 1; a < (g + 1) * GROUP_BLOCKS; ++a) q_sum[g] += dq.block_sum[a];
    }
    Fragments<1> s;
    fold_scores<1, GROUPS>(s, dots, q_sum, ShuffledAffine{k_mine}, fc);
    rules.raw_scale = scale;   // Q is unscaled
    const float old_max = state.max_log2;
    // O is rescaled here, and only when some row's max moved (a uniform branch): softmax_tile rescales a stand-in.
    Fragments<1> stand_in;
    stand_in.frag[0] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    softmax_tile<8, 8>(s, state, stand_in, key0 + first, key_end, valid >> first, q_pos, row_valid, true, slope, rules,
                       fc);
    if (simd_any(state.max_log2 != old_max)) {
        const float rescale = fast::exp2(old_max - state.max_log2);   // as softmax_tile's
        UNROLL_FRAGMENTS
        for (int d = 0; d < D / 8; ++d) o.frag[d].thread_elements() *= rescale;
        UNROLL_FRAGMENTS
        for (int g = 0; g < GROUPS; ++g) value_bias[g] *= rescale;
    }

    uint value_codes[BLOCKS][8];
    row_codes<T, 8, BLOCKS, KV_AFFINE_BLOCK>(value_codes, v, shuffle_offset(v_row, fc.row), 4 * fc.col);
    Fragments<1> scaled_p[GROUPS];   // P[r, j] scale[j, g]
    scale_probabilities<1, GROUPS>(scaled_p, value_bias, s, ShuffledAffine{v_mine}, fc);
    UNROLL_FRAGMENTS
    for (int a = 0; a < BLOCKS; ++a) {
        UNROLL_FRAGMENTS
        for (int b = 0; b < 4; ++b) {
            simdgroup_float8x8 vt;
            vt.thread_elements() = float2(float(value_codes[a][2 * b]), float(value_codes[a][2 * b + 1]));
            simdgroup_multiply_accumulate(o.frag[4 * a + b], scaled_p[a / GROUP_BLOCKS].frag[0], vt, o.frag[4 * a + b]);
        }
    }
}

// The direct path's steps for the group size at hand (uniform; D / 32 blocks at most). Every head dim instantiates
// them; a pair of blocks is a valid grouping only when the block count is even (direct_head_dim's are).
template <int D>
constexpr int direct_pair() { return D / KV_AFFINE_BLOCK % 2 == 0 ? 2 : 1; }

template <typename T, int D>
METAL_FUNC void attend_direct_groups(thread Fragments<D / 8>& o, thread float* value_bias, thread OnlineSoftmax& state,
                                     thread const DirectQ<T, D>& dq, CacheTile<T> k, CacheTile<T> v,
                                     DirectGroups groups, int first, int key0, int key_end, uint valid, int q_pos,
                                     bool row_valid, float slope, ScoreRules rules, float scale, FragmentCoord fc,
                                     ushort lane) {
    if (groups.blocks == 1)
        attend_direct<T, D, 1>(o, value_bias, state, dq, k, v, groups, first, key0, key_end, valid, q_pos, row_valid,
                               slope, rules, scale, fc, lane);
    else if (groups.blocks == 2)
        attend_direct<T, D, direct_pair<D>()>(o, value_bias, state, dq, k, v, groups, first, key0, key_end, valid,
                                              q_pos, row_valid, slope, rules, scale, fc, lane);
    else
        attend_direct<T, D, D / KV_AFFINE_BLOCK>(o, value_bias, state, dq, k, v, groups, first, key0, key_end, valid,
                                              q_pos, row_valid, slope, rules, scale, fc, lane);
}

template <int D>
METAL_FUNC void add_value_bias_groups(thread Fragments<D / 8>& o, thread const float* value_bias, DirectGroups groups) {
    // O += the row's sum of P bias per group (the four lanes of a row hold two keys each), before the slices merge.
    if (groups.blocks == 1) add_value_bias<D, kv_affine_blocks<D>()>(o, value_bias);
    else if (groups.blocks == 2) add_value_bias<D, kv_affine_blocks<D>() / direct_pair<D>()>(o, value_bias);
    else add_value_bias<D, 1>(o, value_bias);
}

// O's columns from the direct path's V order back to the fragment order, through `scratch` (8 x D floats).
template <int D>
METAL_FUNC void unpermute_o(thread Fragments<D / 8>& o, threadgroup float* scratch, FragmentCoord fc) {
    simdgroup_barrier(mem_flags::mem_threadgroup);
    UNROLL_FRAGMENTS
    for (int d = 0; d < D / 8; ++d) {
        UNROLL_FRAGMENTS
        for (int e = 0; e < 2; ++e)
            scratch[fc.row * D + KV_AFFINE_BLOCK * (d / 4) + 4 * fc.col + 2 * (d % 4) + e] =
                o.frag[d].thread_elements()[e];
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);
    UNROLL_FRAGMENTS
    for (int d = 0; d < D / 8; ++d) {
        UNROLL_FRAGMENTS
        for (int e = 0; e < 2; ++e) o.frag[d].thread_elements()[e] = scratch[fc.row * D + d * 8 + fc.col + e];
    }
}

// ---------------------------------------------------------------------------------------------- vector path
// Affine K and V as on the direct path, but at most VECTOR_MAX_ROWS query rows (R = 1, 2 or 4, the rows padded up): an
// 8x8 MMA does 8 rows of work whatever R is, so here keys are computed with per-lane fp32 FMAs, on the direct path's
// exact affine values. Each simdgroup walks tiles of its own, VECTOR_TILE_KEYS keys each, with no threadgroup memory
// and no barrier until the slices merge: lane j maps the tile's key j to its cache offsets (vector_keys), and the keys
// are taken 8 at a time in one lane layout for K and V (VectorLayout):
// - lane LR h + c (LR = D / 8 lanes per key) takes keys KPL h .. KPL h + KPL - 1 of the 8 (KPL = D / 32) and head-dim
//   elements [8 c, 8 c + 8): 8 codes, 4 or 8 bytes, one load (an 8-key group in consecutive slots of one block is
//   addressed from its first key: VectorKeys::in_run); Q's 8 elements of each row live in fp32 registers;
// - S: the lane's KPL x R dot products of Q with the raw codes are summed over the lanes of a key by a reduce-scatter,
//   first over the 4 lanes of a 32-element block (inside one quantization group), where the affine map is applied
//   once per value: S = scale (Q . codes) + bias sum(Q) (the direct path's fold), then over the blocks;
// - O += P V: each lane takes P of its keys from the score lanes and accumulates (P scale) codes into its 8 elements
//   of each row and P bias into one sum per row (its elements share a group); the key groups' partial O are summed
//   once, after the last tile (vector_to_fragments).
constant constexpr int VECTOR_MAX_ROWS = 4;
constant constexpr int VECTOR_TILE_KEYS = 32;   // a simdgroup's tile: one key per lane

constexpr int vector_log_rows(int rows) { return rows <= 1 ? 0 : rows <= 2 ? 1 : 2; }

// The lane layout. The reduce-scatter's steps halve each lane's values, step k exchanging with the lane that differs
// in step_bit(k): the lanes of a block first (bits 2, 1), then the blocks (LR / 2 .. 4). A lane stores its values XOR-
// permuted by the value it will end with (value n = key-in-lane * R + row in slot n ^ lane_value), so at every step it
// keeps the lower half of its slots and sends the upper half: no selects.
// D is 64 or 128 (attend_vector asserts it; vector_to_fragments is instantiated for every head dim, runs for those).
template <int D>
struct VectorLayout {
    static constexpr int LR = D / 8, KPL = D / 32, LOG_KPL = KPL == 4 ? 2 : 1, STEPS = LR == 16 ? 4 : 3;
    static constexpr ushort step_bit(int k) { return ushort(k == 0 ? 2 : k == 1 ? 1 : LR >> (k - 1)); }
    // Lane bit b (0..2) of the 8 keys: the key-in-lane bits (the first LOG_KPL steps), then the key groups'.
    static constexpr ushort key_bit(int b) { return ushort(b < LOG_KPL ? step_bit(b) : LR << (b - LOG_KPL)); }
    // The value (key-in-lane * R + row) lane `lane` holds once the reduce-scatter is done.
    METAL_FUNC static int lane_value(ushort lane, int log_rows) {
        const int bits = LOG_KPL + log_rows;
        int value = 0;
        UNROLL_RUN
        for (int k = 0; k < STEPS; ++k)
            if (k < bits && (lane & step_bit(k)) != 0) value |= 1 << (bits - 1 - k);
        return value;
    }
    // The lane holding the score of (key KPL h + i, row `row`), less the key group's first lane LR h.
    static constexpr int score_lane_in_group(int i, int row, int log_rows) {
        const int bits = LOG_KPL + log_rows, value = (i << log_rows) + row;
        int lane = 0;
        for (int k = 0; k < STEPS; ++k)
            if (k < bits && ((value >> (bits - 1 - k)) & 1) != 0) lane |= step_bit(k);
        return lane;
    }
    METAL_FUNC static ushort score_lane(int key, int row, int log_rows) {
        return ushort(LR * (key / KPL) + score_lane_in_group(key % KPL, row, log_rows));
    }
};

// The weight of an odd element's code as vector_codes returns it: 1/16 for 4-bit codes (a power of 2: exact for
// normal floats).
constexpr float odd_weight(int bits) { return bits == 4 ? 1.0f / 16.0f : 1.0f; }

// Per lane: Q's elements of each row and their block sums, O's partial elements and P bias sums, and the online
// softmax of the lane's score row. Q's rows are stored in the lane's permuted order (VectorLayout), O's in order.
struct VectorRows {
    float q[VECTOR_MAX_ROWS][8];   // times the softmax scale (odd elements also by odd_weight(K)); slot r: row
                                   // r ^ (lane_value % R)
    float q_sum[VECTOR_MAX_ROWS];  // the sum of slot r's row over the lane's 32-element block (unweighed: K's bias)
    float o[VECTOR_MAX_ROWS][8];   // over the lane's keys only (odd elements / odd_weight(V))
    float v_odd_weight;            // odd_weight(V)
    float value_bias[VECTOR_MAX_ROWS];   // sum of P bias over the lane's keys, per row
    float max_log2 = MASKED, denominator = 0.0f;   // the row's running max; the lane's part of its denominator
    int log_rows;                  // R = 1 << log_rows (the dispatch; R's kernels know it at compile time)
    int lane_value;                // VectorLayout::lane_value
    ushort k_group_lane, v_group_lane;   // lane holding the (scale, bias) of this lane's group for an 8-key group's
                                         // first key
    // Run addressing (VectorKeys::in_run): the byte distance from an 8-key group's first key to the lane's first K key
    // (key-in-lane order, i ^ key permutation) and, per bit b of i, the step to the others; V's keys are in order.
    int64_t k_run_first, k_run_step[2], v_run_first, v_run_step;
    int q_pos;                     // the score row's position, validity and ALiBi slope (base 2)
    bool row_valid;
    bool band_seen_by_all;         // every row sees every key of the band (one new token, or no causal / window mask)
    float slope;
};

template <typename T, int D>
METAL_FUNC void load_q_vector(thread VectorRows& st, const device T* q, constant const int64_t* q_strides,
                              const device float* alibi_slopes, int alibi_seq_stride, QueryRows rows, int shift,
                              int seq, CacheFormat k_format, CacheFormat v_format, float scale, ushort lane) {
    using Layout = VectorLayout<D>;
    const int c = lane % Layout::LR;
    st.log_rows = vector_log_rows(rows.count);
    st.lane_value = Layout::lane_value(lane, st.log_rows);
    const int row_mask = (1 << st.log_rows) - 1, permutation = st.lane_value & row_mask;
    // Group indices once (runtime group sizes, shifted: no division, none in the tile loop).
    st.k_group_lane = ushort(8 * ((8 * c) >> group_size_log2(k_format.group_size)));
    st.v_group_lane = ushort(8 * ((8 * c) >> group_size_log2(v_format.group_size)));
    const float k_odd_weight = odd_weight(k_format.bits);
    st.v_odd_weight = odd_weight(v_format.bits);
    float slot_sum[VECTOR_MAX_ROWS];   // the lane's part of each slot's row sum
    UNROLL_RUN
    for (int slot = 0; slot < VECTOR_MAX_ROWS; ++slot) {
        const int r = slot ^ permutation;
        const bool valid = slot <= row_mask && r < rows.count;
        const device T* q_row = q + element_offset(q_strides, seq, rows.token(valid ? r : 0), rows.head(valid ? r : 0));
        float sum = 0.0f;
        UNROLL_RUN
        for (int j = 0; j < 8; ++j) {
            const float x = valid ? float(q_row[8 * c + j]) * scale : 0.0f;
            sum += x;
            st.q[slot][j] = j % 2 == 1 ? x * k_odd_weight : x;
            st.o[slot][j] = 0.0f;
        }
        slot_sum[slot] = sum;
        st.value_bias[slot] = 0.0f;
    }
    float in_order[VECTOR_MAX_ROWS];
    UNROLL_RUN
    for (int r = 0; r < VECTOR_MAX_ROWS; ++r) {
        in_order[r] = r <= row_mask ? slot_sum[r ^ permutation] : 0.0f;   // (a block's lanes may permute differently)
        in_order[r] += simd_shuffle_xor(in_order[r], 1);   // over the block's 4 lanes
        in_order[r] += simd_shuffle_xor(in_order[r], 2);
    }
    UNROLL_RUN
    for (int slot = 0; slot < VECTOR_MAX_ROWS; ++slot)
        st.q_sum[slot] = slot <= row_mask ? in_order[slot ^ permutation] : 0.0f;
    const int row = st.lane_value & row_mask;
    st.row_valid = row < rows.count;
    st.q_pos = rows.token(row) + shift;
    st.slope = has_alibi && st.row_valid ? alibi_slopes[seq * alibi_seq_stride + rows.head(row)] * LOG2E : 0.0f;
}

// A simdgroup's tile of VECTOR_TILE_KEYS keys from key0: lane j holds key j's byte offsets in the caches and its
// element offsets in their scales / biases (negative: no key); `valid` (uniform) has bit j set when key j exists,
// `in_run` when it does and sits m slots after key 8 * (j / 8) in the same block, m = j % 8. An 8-key group whose 8
// in_run bits are set is one run of slots: its keys are found from the first one's offset, without a shuffle each
// (run addressing).
struct VectorKeys {
    int64_t k_bytes, v_bytes, k_scale, v_scale;
    uint valid, in_run;
};

METAL_FUNC VectorKeys vector_keys(PagedLayout cache, SequenceKeys keys, int key0, int lo, int hi,
                                  SlotStrides k_scales, SlotStrides v_scales, ushort lane) {
    const PagedKey key = paged_key<VECTOR_TILE_KEYS>(cache, keys.kv_start, key0, lo, hi, keys.count, lane);
    const int run_start = simd_shuffle(key.slot, ushort(lane & ~7u));   // (a different block restarts the slots)
    const bool in_run = key.exists && key.slot == run_start + int(lane & 7u);
    return {key.offset(cache.k) * PACKED_WORD_BYTES, key.offset(cache.v) * PACKED_WORD_BYTES, key.offset(k_scales),
            key.offset(v_scales), simd_or(key.exists ? 1u << lane : 0u), simd_or(in_run ? 1u << lane : 0u)};
}

// The lane's run distances (VectorRows::k_run_first ..) from the caches' slot strides.
template <int D>
METAL_FUNC void vector_run_distances(thread VectorRows& st, SlotStrides k, SlotStrides v, ushort lane) {
    using Layout = VectorLayout<D>;
    const int first_key = Layout::KPL * (lane / Layout::LR), key_permutation = st.lane_value >> st.log_rows;
    const int64_t k_slot = k.slot * PACKED_WORD_BYTES, v_slot = v.slot * PACKED_WORD_BYTES;
    st.k_run_first = (first_key + key_permutation) * k_slot;
    UNROLL_RUN
    for (int b = 0; b < 2; ++b) st.k_run_step[b] = ((key_permutation >> b) & 1) != 0 ? -(k_slot << b) : k_slot << b;
    st.v_run_first = first_key * v_slot;
    st.v_run_step = v_slot;
}

// The lane's 8 raw codes of the row `bytes` after `lane_codes` (the cache's codes [8 c, 8 c + 8) of its first row: 8
// codes are BITS bytes; negative: no key, zeros), as fp32 (exact); 4-bit odd elements are 16 x their code, so Q's odd
// elements are weighed 1/16 (load_q_vector) and O's unweighed once, at the end (vector_to_fragments). (A run's keys,
// which all exist, are read by load_codes itself.)
template <int BITS>
METAL_FUNC void vector_codes(thread float* x, const device uchar* lane_codes, int64_t bytes) {
    if (bytes >= 0) {
        load_codes<BITS, 8, float, true>(x, lane_codes + bytes);   // 4-bit odd elements: 16 x the code
    } else {
        UNROLL_RUN
        for (int j = 0; j < 8; ++j) x[j] = 0.0f;
    }
}

// Reduce-scatter steps K .. END - 1 of N values (VectorLayout): each step adds the partner's upper half to the lower
// half; once one value is left, the steps are plain sums. (A template, so every loop has a constant trip count and the
// values stay in registers.)
template <int D, int N, int K, int END>
struct ReduceScatter {
    METAL_FUNC static void run(thread float* part) {
        constexpr ushort BIT = VectorLayout<D>::step_bit(K);
        UNROLL_RUN
        for (int i = 0; i < (N > 1 ? N / 2 : 1); ++i) part[i] += simd_shuffle_xor(part[N > 1 ? i + N / 2 : 0], BIT);
        ReduceScatter<D, (N > 1 ? N / 2 : 1), K + 1, END>::run(part);
    }
};
template <int D, int N, int END>
struct ReduceScatter<D, N, END, END> {
    METAL_FUNC static void run(thread float*) {}
};

// The lane's score (the raw q.k of key KPL h + lane_value / R, row lane_value % R, over the whole head dim).
template <typename T, int D, int R, int BITS, bool EDGE>
METAL_FUNC float vector_score(thread const VectorRows& st, CacheTile<T> k, float2 k_mine, VectorKeys tile, int first,
                              ushort lane) {
    using Layout = VectorLayout<D>;
    constexpr int LOG_R = vector_log_rows(R), N = Layout::KPL * R, FOLDED = N >= 4 ? N / 4 : 1;
    const int h = lane / Layout::LR, c = lane % Layout::LR, key_permutation = st.lane_value >> LOG_R;
    const device uchar* lane_codes = k.head + c * BITS;
    const device uchar* run_codes =   // the lane's first key's codes (EDGE false)
        EDGE ? lane_codes : lane_codes + st.k_run_first + shuffle_offset(tile.k_bytes, first);
    float part[N];   // slot i R + r: key-in-lane i ^ key_permutation, row r ^ (lane_value % R)
    UNROLL_RUN
    for (int i = 0; i < Layout::KPL; ++i) {
        float x[8];
        if (EDGE) {
            const int key = Layout::KPL * h + (i ^ key_permutation);
            vector_codes<BITS>(x, lane_codes, shuffle_offset(tile.k_bytes, first + key));
        } else {   // key i ^ key_permutation = the lane's first + the steps of i's bits
            const int64_t distance = (i & 1 ? st.k_run_step[0] : 0) + (i & 2 ? st.k_run_step[1] : 0);
            load_codes<BITS, 8, float, true>(x, run_codes + distance);
        }
        UNROLL_RUN
        for (int r = 0; r < R; ++r) {
            part[i * R + r] = 0.0f;
            UNROLL_RUN
            for (int j = 0; j < 8; ++j) part[i * R + r] += st.q[r][j] * x[j];
        }
    }
    ReduceScatter<D, N, 0, 2>::run(part);   // over the block: one key, one group left
    const float2 scale_bias = simd_shuffle(k_mine, ushort(st.k_group_lane + Layout::KPL * h + key_permutation));
    UNROLL_RUN
    for (int s = 0; s < FOLDED; ++s) part[s] = scale_bias.x * part[s] + scale_bias.y * st.q_sum[s];
    ReduceScatter<D, FOLDED, 2, Layout::STEPS>::run(part);
    return part[0];
}

// O += P V over the lane's keys (prob: the score lane's probability).
template <typename T, int D, int R, int BITS, bool EDGE>
METAL_FUNC void vector_accumulate(thread VectorRows& st, float prob, CacheTile<T> v, float2 v_mine, VectorKeys tile,
                                  int first, ushort lane) {
    using Layout = VectorLayout<D>;
    const int h = lane / Layout::LR, c = lane % Layout::LR, group_lane = Layout::LR * h;
    const device uchar* lane_codes = v.head + c * BITS;
    const device uchar* run_codes =
        EDGE ? lane_codes : lane_codes + st.v_run_first + shuffle_offset(tile.v_bytes, first);
    UNROLL_RUN
    for (int i = 0; i < Layout::KPL; ++i) {
        const int key = Layout::KPL * h + i;
        float x[8];
        if (EDGE) vector_codes<BITS>(x, lane_codes, shuffle_offset(tile.v_bytes, first + key));
        else load_codes<BITS, 8, float, true>(x, run_codes + i * st.v_run_step);
        const float2 scale_bias = simd_shuffle(v_mine, ushort(st.v_group_lane + key));   // (0, 0): no key
        UNROLL_RUN
        for (int r = 0; r < R; ++r) {
            const int in_group = Layout::score_lane_in_group(i, r, vector_log_rows(R));   // a constant once unrolled
            const float p = simd_shuffle(prob, ushort(group_lane + in_group));
            const float scaled = p * scale_bias.x;
            st.value_bias[r] += p * scale_bias.y;
            UNROLL_RUN
            for (int j = 0; j < 8; ++j) st.o[r][j] += scaled * x[j];
        }
    }
}

// The lane's masked base-2 score (its key of tile keys first .. first + 7, its row) on the vector path, R rows. EDGE
// false: the 8 keys are one run of slots (read by run addressing) and every real row sees them (no mask test; a
// padded row, Q = 0, scores 0 and is dropped).
template <typename T, int D, int R, bool EDGE>
METAL_FUNC float vector_group_score(thread const VectorRows& st, CacheTile<T> k, VectorKeys tile, DirectGroups groups,
                                    int first, int key0, int key_end, ScoreRules rules, ushort lane) {
    using Layout = VectorLayout<D>;
    static_assert(direct_head_dim<D>(), "the layout's head dims: 2 or 4 keys a lane");
    const int mine = first + lane % 8, group = lane / 8;   // the (scale, bias) this lane reads (direct path's rule)
    const bool exists = !EDGE || ((tile.valid >> mine) & 1u) != 0;
    const float2 k_mine = affine_group_at(k, exists, shuffle_offset(tile.k_scale, mine), group, groups.k_exists);
    const float raw = k.bits == 4 ? vector_score<T, D, R, 4, EDGE>(st, k, k_mine, tile, first, lane)
                                  : vector_score<T, D, R, 8, EDGE>(st, k, k_mine, tile, first, lane);
    const int key = Layout::KPL * (lane / Layout::LR) + (st.lane_value >> vector_log_rows(R));
    return masked_score(raw, key0 + first + key, key0, key_end, tile.valid, st.q_pos, st.row_valid, EDGE, st.slope,
                        rules);
}

// O += P V over tile keys first .. first + 7 (prob: the score lane's probability; EDGE as vector_group_score).
template <typename T, int D, int R, bool EDGE>
METAL_FUNC void vector_group_values(thread VectorRows& st, float prob, CacheTile<T> v, VectorKeys tile,
                                    DirectGroups groups, int first, ushort lane) {
    const int mine = first + lane % 8, group = lane / 8;
    const bool exists = !EDGE || ((tile.valid >> mine) & 1u) != 0;
    const float2 v_mine = affine_group_at(v, exists, shuffle_offset(tile.v_scale, mine), group, groups.v_exists);
    if (v.bits == 4) vector_accumulate<T, D, R, 4, EDGE>(st, prob, v, v_mine, tile, first, lane);
    else vector_accumulate<T, D, R, 8, EDGE>(st, prob, v, v_mine, tile, first, lane);
}

#define NO_UNROLL _Pragma("clang loop unroll(disable)")

// How a tile's 8-key group at `first` runs: not at all (no key), without per-key checks and by run addressing (its 8
// keys are one run of slots and every row sees the whole band), or with them.
enum VectorGroupKind { GROUP_EMPTY, GROUP_INTERIOR, GROUP_EDGE };
METAL_FUNC VectorGroupKind vector_group_kind(VectorKeys tile, int first, bool band_seen_by_all) {
    const uint keys = (tile.valid >> first) & 0xFFu, run_keys = (tile.in_run >> first) & 0xFFu;
    return keys == 0u ? GROUP_EMPTY : run_keys == 0xFFu && band_seen_by_all ? GROUP_INTERIOR : GROUP_EDGE;
}

// The tile's 8-key groups read by run addressing, without per-key checks (the work counter's).
METAL_FUNC int vector_run_groups(VectorKeys tile, bool band_seen_by_all) {
    int groups = 0;
    for (int first = 0; first < VECTOR_TILE_KEYS; first += 8)
        groups += vector_group_kind(tile, first, band_seen_by_all) == GROUP_INTERIOR ? 1 : 0;
    return groups;
}

// A simdgroup's tile of VECTOR_TILE_KEYS keys at key0, R rows: the scores of its 8-key groups (a group with no key is
// skipped; one whose 8 keys are one run of slots, when every row sees the whole band, without checks), one online-
// softmax step for the whole tile, then O += P V group by group. The groups' loops are not unrolled (one copy of a
// group's code): their scores and probabilities shift through registers. The lane's denominator is its part of its
// row's (the lanes of a row differ in the key bits), summed once, in vector_to_fragments.
template <typename T, int D, int R>
METAL_FUNC void attend_vector(thread VectorRows& st, CacheTile<T> k, CacheTile<T> v, VectorKeys tile,
                              DirectGroups groups, int key0, int key_end, ScoreRules rules, ushort lane) {
    using Layout = VectorLayout<D>;
    constexpr int GROUPS = VECTOR_TILE_KEYS / 8, LOG_R = vector_log_rows(R);
    float score[GROUPS];   // group g's in score[g] once the loop is done
    UNROLL_RUN
    for (int g = 0; g < GROUPS; ++g) score[g] = MASKED;
    NO_UNROLL
    for (int first = 0; first < VECTOR_TILE_KEYS; first += 8) {
        const VectorGroupKind kind = vector_group_kind(tile, first, st.band_seen_by_all);
        float group_score = MASKED;
        if (kind == GROUP_INTERIOR)
            group_score = vector_group_score<T, D, R, false>(st, k, tile, groups, first, key0, key_end, rules, lane);
        else if (kind == GROUP_EDGE)
            group_score = vector_group_score<T, D, R, true>(st, k, tile, groups, first, key0, key_end, rules, lane);
        UNROLL_RUN
        for (int g = 0; g + 1 < GROUPS; ++g) score[g] = score[g + 1];
        score[GROUPS - 1] = group_score;
    }
    float tile_max = MASKED;
    UNROLL_RUN
    for (int g = 0; g < GROUPS; ++g) tile_max = max(tile_max, score[g]);
    UNROLL_RUN
    for (int b = 0; b < 3; ++b) tile_max = max(tile_max, simd_shuffle_xor(tile_max, Layout::key_bit(b)));
    const float new_max = max(st.max_log2, tile_max);
    const float rescale = fast::exp2(st.max_log2 - new_max);
    float prob[GROUPS], sum = 0.0f;
    UNROLL_RUN
    for (int g = 0; g < GROUPS; ++g) {
        prob[g] = score[g] == MASKED ? 0.0f : fast::exp2(score[g] - new_max);
        sum += prob[g];
    }
    st.denominator = st.denominator * rescale + sum;
    const bool moved = simd_any(new_max != st.max_log2);   // O is rescaled only when some row's max moved
    st.max_log2 = new_max;
    if (moved) {
        UNROLL_RUN
        for (int r = 0; r < R; ++r) {
            const float f = simd_shuffle(rescale, Layout::score_lane(0, r, LOG_R));
            st.value_bias[r] *= f;
            UNROLL_RUN
            for (int j = 0; j < 8; ++j) st.o[r][j] *= f;
        }
    }
    NO_UNROLL
    for (int first = 0; first < VECTOR_TILE_KEYS; first += 8) {
        const VectorGroupKind kind = vector_group_kind(tile, first, st.band_seen_by_all);
        if (kind == GROUP_INTERIOR)
            vector_group_values<T, D, R, false>(st, prob[0], v, tile, groups, first, lane);
        else if (kind == GROUP_EDGE)
            vector_group_values<T, D, R, true>(st, prob[0], v, tile, groups, first, lane);
        UNROLL_RUN
        for (int g = 0; g + 1 < GROUPS; ++g) prob[g] = prob[g + 1];
    }
}

// The vector path's tile, dispatched on the (runtime) padded row count.
template <typename T, int D>
METAL_FUNC void attend_vector_tile(thread VectorRows& st, CacheTile<T> k, CacheTile<T> v, VectorKeys tile,
                                   DirectGroups groups, int key0, int key_end, ScoreRules rules, ushort lane) {
    if (st.log_rows == 0) attend_vector<T, D, 1>(st, k, v, tile, groups, key0, key_end, rules, lane);
    else if (st.log_rows == 1) attend_vector<T, D, 2>(st, k, v, tile, groups, key0, key_end, rules, lane);
    else attend_vector<T, D, 4>(st, k, v, tile, groups, key0, key_end, rules, lane);
}

// The slice's O and softmax state in the fragment layout the key slices merge in: the key groups' partial O (with their
// P bias) summed (shuffles), put in head-dim order through the simdgroup's `region` of scratch (VECTOR_MAX_ROWS x D
// floats). Instantiated for every head dim; runs only for D 64 and 128 (VECTOR_DIMS).
template <int D>
METAL_FUNC void vector_to_fragments(thread Fragments<D / 8>& o, thread OnlineSoftmax& state, thread VectorRows& st,
                                    threadgroup float* region, FragmentCoord fc, ushort lane) {
    constexpr int LR = VectorLayout<D>::LR;
    UNROLL_RUN
    for (int r = 0; r < VECTOR_MAX_ROWS; ++r) {
        UNROLL_RUN
        for (int j = 0; j < 8; ++j) {
            if (j % 2 == 1) st.o[r][j] *= st.v_odd_weight;
            st.o[r][j] += st.value_bias[r];
            UNROLL_RUN
            for (int bit = LR; bit < 32; bit *= 2) st.o[r][j] += simd_shuffle_xor(st.o[r][j], ushort(bit));
            if (int(lane) < LR) region[r * D + 8 * lane + j] = st.o[r][j];
        }
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);
    const bool mine = fc.row < (1 << st.log_rows);
    UNROLL_FRAGMENTS
    for (int d = 0; d < D / 8; ++d) {
        UNROLL_FRAGMENTS
        for (int e = 0; e < 2; ++e)
            o.frag[d].thread_elements()[e] = mine ? region[fc.row * D + d * 8 + fc.col + e] : 0.0f;
    }
    float row_denominator = st.denominator;   // the lane's part, over the row's lanes
    UNROLL_RUN
    for (int b = 0; b < 3; ++b) row_denominator += simd_shuffle_xor(row_denominator, VectorLayout<D>::key_bit(b));
    const ushort from = VectorLayout<D>::score_lane(0, min(fc.row, VECTOR_MAX_ROWS - 1), st.log_rows);
    const float max_log2 = simd_shuffle(st.max_log2, from), denominator = simd_shuffle(row_denominator, from);
    state.max_log2 = mine ? max_log2 : MASKED;
    state.denominator = mine ? denominator : 0.0f;
}

// Fragments lane by lane in threadgroup memory (D / 4 x 32 floats: with the two state words below, they fit
// every head dim's K/V tile), for the key slices of a threadgroup, which hold the same rows.
template <int D>
METAL_FUNC void stash(thread const Fragments<D / 8>& f, threadgroup float* scratch, ushort lane) {
    UNROLL_FRAGMENTS
    for (int d = 0; d < D / 8; ++d) {
        UNROLL_FRAGMENTS
        for (int e = 0; e < 2; ++e) scratch[(d * 2 + e) * 32 + lane] = f.frag[d].thread_elements()[e];
    }
}

// Q is read from the device by slice 0 only (each byte once per threadgroup) and handed to the other slices.
template <int D>
METAL_FUNC void share_q(thread Fragments<D / 8>& q, threadgroup float* scratch, int slice, ushort lane) {
    if (slice == 0) stash<D>(q, scratch, lane);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    UNROLL_FRAGMENTS
    for (int d = 0; d < D / 8; ++d) {
        UNROLL_FRAGMENTS
        for (int e = 0; e < 2; ++e) q.frag[d].thread_elements()[e] = scratch[(d * 2 + e) * 32 + lane];
    }
}

// Fold slices 1.. into slice 0, one at a time.
template <int D>
METAL_FUNC void merge_key_slices(thread OnlineSoftmax& state, thread Fragments<D / 8>& o, threadgroup float* scratch,
                                 int slices, int slice, ushort lane) {
    constexpr int STATE = D / 4 * 32;   // scratch[STATE + lane]: max, scratch[STATE + 32 + lane]: sum
    for (int from = 1; from < slices; ++from) {
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (slice == from) {
            stash<D>(o, scratch, lane);
            scratch[STATE + lane] = state.max_log2;
            scratch[STATE + 32 + lane] = state.denominator;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (slice == 0) {
            const float other_max = scratch[STATE + lane];
            const float new_max = max(state.max_log2, other_max);
            const float mine = fast::exp2(state.max_log2 - new_max), theirs = fast::exp2(other_max - new_max);
            state.denominator = state.denominator * mine + scratch[STATE + 32 + lane] * theirs;
            state.max_log2 = new_max;
            UNROLL_FRAGMENTS
            for (int d = 0; d < D / 8; ++d) {
                UNROLL_FRAGMENTS
                for (int e = 0; e < 2; ++e)
                    o.frag[d].thread_elements()[e] = o.frag[d].thread_elements()[e] * mine + scratch[(d * 2 + e) * 32 + lane] * theirs;
            }
        }
    }
}

// DK: the head dim of q and the K cache, DV: of the V cache and out. HEAD_PARTS(DV) simdgroups share each 8 rows.
template <typename T, int DK, int DV>
[[kernel, max_total_threads_per_threadgroup(128 * HEAD_PARTS(DV))]] void attention_decode(
    const device T* q [[buffer(DECODE_BUFFER_Q)]],
    const device uchar* k_cache [[buffer(DECODE_BUFFER_K_CACHE)]],   // T, or quantized (params.h: CacheFormat)
    const device uchar* v_cache [[buffer(DECODE_BUFFER_V_CACHE)]],
    const device int* block_table [[buffer(DECODE_BUFFER_BLOCK_TABLE)]],
    const device int* seqlens_k [[buffer(DECODE_BUFFER_SEQLENS_K)]],
    const device int* kv_start [[buffer(DECODE_BUFFER_KV_START)]],
    constant DecodeParams& p [[buffer(DECODE_BUFFER_PARAMS)]],
    const device float* sinks [[buffer(DECODE_BUFFER_SINKS)]],
    const device float* alibi_slopes [[buffer(DECODE_BUFFER_ALIBI)]],
    device T* out [[buffer(DECODE_BUFFER_OUT)]],
    device float* lse [[buffer(DECODE_BUFFER_LSE)]],
    device float* partial_max [[buffer(DECODE_BUFFER_PARTIAL_MAX)]],
    device float* partial_sum [[buffer(DECODE_BUFFER_PARTIAL_SUM)]],
    device float* partial_out [[buffer(DECODE_BUFFER_PARTIAL_OUT)]],
    const device T* k_scales [[buffer(DECODE_BUFFER_K_SCALES)]],
    const device T* k_biases [[buffer(DECODE_BUFFER_K_BIASES)]],
    const device T* v_scales [[buffer(DECODE_BUFFER_V_SCALES)]],
    const device T* v_biases [[buffer(DECODE_BUFFER_V_BIASES)]],
    constant KvQuantParams& quant [[buffer(DECODE_BUFFER_KV_QUANT)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint threads [[threads_per_threadgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
    constexpr int PARTS = HEAD_PARTS(DV), DKP = DK / PARTS, DVP = DV / PARTS;   // a simdgroup's part of Q and of O
    constexpr int BK = KV_TILE_KEYS(DK);
    constexpr int LD = DK + 8;
    constexpr int TILE_VECTORS = KV_TILE_VECTORS(T, BK, LD + 2 * KV_TILE_EXTRA_GROUPS(DK));   // with the affine pairs
    constexpr int SCORE_FLOATS = HEAD_PARTS_SCORE_FLOATS(DECODE_MAX_ROWS / 8, DK, DV);
    threadgroup uint4 tile_storage[TILE_VECTORS + SCORE_FLOATS / 4];   // the K/V tile, the score exchange
    threadgroup T* tile = reinterpret_cast<threadgroup T*>(tile_storage);
    threadgroup int64_t k_offset[BK], v_offset[BK];   // element offset of each tile key in the caches (-1: none)
    threadgroup int64_t k_scale_offset[BK], v_scale_offset[BK];   // ... and in their scales / biases (affine)
    threadgroup uint tile_valid;
    static_assert(sizeof(uint4) * TILE_VECTORS + 4 * sizeof(int64_t) * BK + sizeof(uint) + sizeof(float) * SCORE_FLOATS ==
                      DECODE_THREADGROUP_BYTES(sizeof(T), DK, DV),
                  "the host's residency estimate");

    const int seq = int(tgid.z), partition = int(tgid.x);
    const int group = p.query_group;
    int kv_head = int(tgid.y), row_chunk = 0;   // (one chunk of rows, the usual case, needs no division)
    if (group * p.seqlen_q > DECODE_MAX_ROWS) {
        kv_head = int(tgid.y) % p.shape.num_kv_heads;
        row_chunk = int(tgid.y) / p.shape.num_kv_heads;
    }
    const QueryRows query_rows{group * p.seqlen_q, group, p.seqlen_q, kv_head};
    const int rows = query_rows.count;
    const SequenceKeys keys = sequence_keys(seqlens_k, kv_start, seq, p, lane);
    const int shift = keys.count - p.seqlen_q;   // bottom-right: new token i sits at key i + shift

    // Keys [lo, hi) of this partition that some query row can see.
    const KeyBand band = key_band(shift, p.seqlen_q - 1 + shift, keys.count, p.mask);
    const int lo = int(max(int64_t(band.begin), int64_t(partition) * p.partition_size));
    const int hi = int(min(int64_t(band.end), (int64_t(partition) + 1) * p.partition_size));

    const HeadPart head_part{int(sg) % PARTS, int(sg) / PARTS, int(sg),
                             reinterpret_cast<threadgroup float*>(tile_storage + TILE_VECTORS)};
    const int part = head_part.part;
    const int slices = DECODE_KEY_SLICES(rows, DK), slice = slices > 1 ? head_part.row_group : 0;
    static_assert(PARTS == 1 || KV_TILE_KEYS(DK) == 8, "key slices and head parts never meet");
    const FragmentCoord fc = fragment_coord(lane);
    const int row = row_chunk * DECODE_MAX_ROWS + (slices > 1 ? 0 : head_part.row_group * 8) + fc.row;
    const bool row_valid = row < rows;
    const int head = query_rows.head(row_valid ? row : 0), token = query_rows.token(row_valid ? row : 0);
    const int64_t partial_row = ((int64_t(seq) * p.shape.num_heads + head) * p.seqlen_q + token) * p.num_partitions + partition;

    if (lo >= hi) {   // nothing of this partition is visible: no math, no K/V reads
        if (tid == 0) WORK_COUNT("partitions_skipped", 1);
        if (split_k) {
            if (row_valid && slice == 0 && part == 0 && fc.col == 0) {
                partial_max[partial_row] = -FLT_MAX;
                partial_sum[partial_row] = 0.0f;
            }
            if (row_valid && slice == 0 && part == 0) {
                for (int d = fc.col; d < DV; d += 8) {   // the row's four lanes cover the head dim
                    for (int e = 0; e < 2; ++e) partial_out[partial_row * DV + d + e] = 0.0f;
                }
            }
            return;
        }
    } else if (tid == 0) {
        WORK_COUNT("partitions_computed", 1);
    }

    const ScoreRules rules = score_rules(do_causal, has_window, has_softcap, has_alibi, p.mask);
    const float slope = has_alibi ? alibi_slopes[seq * p.mask.alibi_seq_stride + head] * LOG2E : 0.0f;
    Fragments<DKP / 8> q_frag;
    Fragments<DVP / 8> o_frag;
    threadgroup float* scratch = reinterpret_cast<threadgroup float*>(tile_storage);
    static_assert(KV_TILE_VECTORS(T, BK, LD) * sizeof(uint4) >= (DKP / 4 + 2) * 32 * sizeof(float), "slice scratch");
    static_assert(!direct_head_dim<DV>() || KV_TILE_VECTORS(T, BK, LD) * sizeof(uint4) >= 8 * DV * sizeof(float),
                  "unpermute_o scratch");
    const CacheFormat k_format = cache_format(quant.k), v_format = cache_format(quant.v);
    const bool affine_kv = k_format.kind == KV_AFFINE && v_format.kind == KV_AFFINE;   // (plain unless kv_quantized)
    constexpr bool VECTOR_DIMS = direct_head_dim<DV>() && DK == DV;
    constexpr int VD = VECTOR_DIMS ? DV : 64;   // the vector path's head dim (64 where it never runs)
    static_assert(!VECTOR_DIMS || KV_TILE_VECTORS(T, BK, LD) * sizeof(uint4) >= 4 * VECTOR_MAX_ROWS * VD * sizeof(float),
                  "vector_to_fragments scratch: a region per slice");
    const bool vector = VECTOR_DIMS && kv_vector && affine_kv && rows <= VECTOR_MAX_ROWS;
    const bool direct = !vector && direct_head_dim<DV>() && DK == DV && kv_vector && slices > 1 && affine_kv &&
                        k_format.group_size == v_format.group_size;
    VectorRows vrows;
    const device T* q_row = q + element_offset(p.shape.q_strides, seq, token, head);
    DirectQ<T, DVP> q_direct;   // only used when DK == DV (= DVP)
    DirectGroups groups;
    float value_bias[kv_affine_blocks<DVP>()] = {};   // per group (direct path) or block (tile path, affine V)
    float q_block_sum[kv_affine_blocks<DKP>()];        // tile path, affine K
    if (vector || direct) groups = direct_groups<DVP>(k_format, v_format, lane);
    if (vector) {
        load_q_vector<T, VD>(vrows, q, p.shape.q_strides, alibi_slopes, p.mask.alibi_seq_stride, query_rows, shift, seq,
                             k_format, v_format, p.mask.scale, lane);
        vrows.band_seen_by_all = p.seqlen_q == 1 || !(rules.causal || rules.window);   // (the band is the one row's)
    } else if (direct) {
        load_q_direct<T, DVP>(q_direct, q_row, row_valid, fc);
    } else {
        load_q<T, DKP>(q_frag, q_row + part * DKP, row_valid && slice == 0, p.mask.scale, fc);
        if (slices > 1) share_q<DKP>(q_frag, scratch, slice, lane);
        if (kv_quantized && k_format.kind == KV_AFFINE) block_sums<DKP>(q_block_sum, q_frag);
    }
    clear<DVP>(o_frag);
    OnlineSoftmax state;
    const CacheTile<T> k_tile = cache_tile<T>(k_cache, k_scales, k_biases, k_offset, k_scale_offset, k_format,
                                              p.shape.k_strides[STRIDE_HEAD], seq, kv_head, lane);
    const CacheTile<T> v_tile = cache_tile<T>(v_cache, v_scales, v_biases, v_offset, v_scale_offset, v_format,
                                              p.shape.v_strides[STRIDE_HEAD], seq, kv_head, lane);
    const PagedLayout cache = paged_layout(p, block_table, seq);
    const int block_size = cache.block_size.divisor;   // the scales' slot strides (quantized caches only)
    const SlotStrides k_scale_strides = !kv_quantized ? SlotStrides{} : slot_strides(p.num_blocks, block_size,
        k_format.scale_strides[STRIDE_BATCH], k_format.scale_strides[STRIDE_TOKEN]);
    const SlotStrides v_scale_strides = !kv_quantized ? SlotStrides{} : slot_strides(p.num_blocks, block_size,
        v_format.scale_strides[STRIDE_BATCH], v_format.scale_strides[STRIDE_TOKEN]);

    // The vector path: each simdgroup (key slice) its own tiles, every slices-th from the band's first.
    if (vector) vector_run_distances<VD>(vrows, cache.k, cache.v, lane);
    for (int key0 = (lo / VECTOR_TILE_KEYS + slice) * VECTOR_TILE_KEYS; vector && key0 < hi;
         key0 += slices * VECTOR_TILE_KEYS) {
        const VectorKeys vector_tile = vector_keys(cache, keys, key0, lo, hi, k_scale_strides, v_scale_strides, lane);
        attend_vector_tile<T, VD>(vrows, k_tile, v_tile, vector_tile, groups, key0, hi, rules, lane);
        if (lane == 0) WORK_COUNT("vector_tiles", 1);
        if (lane == 0) WORK_COUNT("vector_run_groups", vector_run_groups(vector_tile, vrows.band_seen_by_all));
    }
    for (int key0 = lo / BK * BK; !vector && key0 < hi; key0 += BK) {
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (sg == 0) {   // simdgroup 0 maps the tile's keys (one per lane) to cache slots
            const PagedKey key = map_paged_keys<BK>(cache, keys.kv_start, key0, lo, hi, keys.count, k_offset, v_offset,
                                                    &tile_valid, lane);
            if (kv_quantized && int(lane) < BK) {
                k_scale_offset[lane] = key.offset(k_scale_strides);
                v_scale_offset[lane] = key.offset(v_scale_strides);
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (direct) {   // the next tile's first barrier keeps the offsets until every slice has read them
            if (tid == 0) WORK_COUNT("direct_tiles", 1);
            attend_direct_groups<T, DVP>(o_frag, value_bias, state, q_direct, k_tile, v_tile, groups, slice * 8, key0,
                                         hi, tile_valid, token + shift, row_valid, slope, rules, p.mask.scale, fc, lane);
            continue;
        }
        load_cache_tile<T, DK, BK, LD>(tile, k_tile, tid, threads);
        if (tid == 0) WORK_COUNT("k_tiles_loaded", 1);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        const TileLoads<T> loads{tile_storage, k_tile, v_tile, tid, threads};
        if (slices > 1)
            attend_tile<T, DK, DV, BK, 8, LD>(o_frag, value_bias, state, q_frag, q_block_sum, slice * 8, key0, hi,
                                              tile_valid, token + shift, row_valid, slope, rules, fc, loads, head_part,
                                              lane);
        else
            attend_tile<T, DK, DV, BK, BK, LD>(o_frag, value_bias, state, q_frag, q_block_sum, 0, key0, hi, tile_valid,
                                               token + shift, row_valid, slope, rules, fc, loads, head_part, lane);
    }
    if (vector) vector_to_fragments<DVP>(o_frag, state, vrows, scratch + slice * VECTOR_MAX_ROWS * DVP, fc, lane);
    else if (direct) add_value_bias_groups<DVP>(o_frag, value_bias, groups);
    else if (kv_quantized && v_format.kind == KV_AFFINE) add_value_bias<DVP, kv_affine_blocks<DVP>()>(o_frag, value_bias);
    if (slices > 1) merge_key_slices<DVP>(state, o_frag, scratch, slices, slice, lane);
    if (direct && slice == 0) unpermute_o<DVP>(o_frag, scratch, fc);

    if (!row_valid || slice != 0) return;   // no barrier follows
    if (split_k) {
        if (part == 0 && fc.col == 0) {
            partial_max[partial_row] = state.max_log2;
            partial_sum[partial_row] = state.denominator;
        }
        device float* partial = partial_out + partial_row * DV + part * DVP;
        UNROLL_FRAGMENTS
        for (int d = 0; d < DVP / 8; ++d) {
            UNROLL_FRAGMENTS
            for (int e = 0; e < 2; ++e) partial[d * 8 + fc.col + e] = o_frag.frag[d].thread_elements()[e];
        }
        return;
    }
    if (has_sinks) fold_sink<DVP>(state, o_frag, sinks[head] * LOG2E);
    store_row<T, DVP>(out + element_offset(p.shape.out_strides, seq, token, head) + part * DVP,
                      lse + lse_offset(p.shape.lse_strides, seq, head, token), state, o_frag, fc, part == 0);
}

// Merge the partitions of one (sequence, head, new token): grid (Sq, H, B), one simdgroup.
template <typename T, int D>
[[kernel]] void attention_decode_reduce(
    constant DecodeParams& p [[buffer(DECODE_BUFFER_PARAMS)]],
    const device float* sinks [[buffer(DECODE_BUFFER_SINKS)]],
    device T* out [[buffer(DECODE_BUFFER_OUT)]],
    device float* lse [[buffer(DECODE_BUFFER_LSE)]],
    const device float* partial_max [[buffer(DECODE_BUFFER_PARTIAL_MAX)]],
    const device float* partial_sum [[buffer(DECODE_BUFFER_PARTIAL_SUM)]],
    const device float* partial_out [[buffer(DECODE_BUFFER_PARTIAL_OUT)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    ushort lane [[thread_index_in_simdgroup]]) {
    const int token = int(tgid.x), head = int(tgid.y), seq = int(tgid.z);
    const int64_t first = ((int64_t(seq) * p.shape.num_heads + head) * p.seqlen_q + token) * p.num_partitions;

    float max_log2 = -FLT_MAX;
    for (int part = lane; part < p.num_partitions; part += DECODE_REDUCE_THREADS)
        max_log2 = max(max_log2, partial_max[first + part]);
    max_log2 = simd_max(max_log2);
    if (has_sinks) max_log2 = max(max_log2, sinks[head] * LOG2E);
    // Neutral partitions (max -FLT_MAX, sum 0) add exp2(...) * 0 = 0: no branch, no NaN.
    float denominator = 0.0f;
    for (int part = lane; part < p.num_partitions; part += DECODE_REDUCE_THREADS)
        denominator += partial_sum[first + part] * fast::exp2(partial_max[first + part] - max_log2);
    denominator = simd_sum(denominator);
    if (has_sinks) denominator += fast::exp2(sinks[head] * LOG2E - max_log2);

    const float inv = denominator > 0.0f ? 1.0f / denominator : 0.0f;
    // out = sum_p weight_p * partial_out_p: 32 partitions at a time, each lane computes one weight and the
    // simdgroup shares them, so every partial is read once.
    constexpr int D_PER_LANE = (D + DECODE_REDUCE_THREADS - 1) / DECODE_REDUCE_THREADS;
    float acc[D_PER_LANE];
    for (int i = 0; i < D_PER_LANE; ++i) acc[i] = 0.0f;
    for (int part0 = 0; part0 < p.num_partitions; part0 += DECODE_REDUCE_THREADS) {
        const int mine = part0 + lane;
        const float weight = mine < p.num_partitions
            ? partial_sum[first + mine] > 0.0f ? fast::exp2(partial_max[first + mine] - max_log2) * inv : 0.0f
            : 0.0f;
        const int count = min(DECODE_REDUCE_THREADS, p.num_partitions - part0);
        for (int j = 0; j < count; ++j) {
            const float w = simd_shuffle(weight, ushort(j));
            if (w == 0.0f) continue;   // a skipped (or fully masked) partition adds nothing: do not read it
            const device float* partial = partial_out + (first + part0 + j) * D;
            for (int i = 0; i < D_PER_LANE; ++i) {
                const int d = i * DECODE_REDUCE_THREADS + lane;
                if (d < D) acc[i] += partial[d] * w;
            }
        }
    }
    device T* out_row = out + element_offset(p.shape.out_strides, seq, token, head);
    for (int i = 0; i < D_PER_LANE; ++i) {
        const int d = i * DECODE_REDUCE_THREADS + lane;
        if (d < D) out_row[d] = T(acc[i]);
    }
    if (lane == 0)
        lse[lse_offset(p.shape.lse_strides, seq, head, token)] =
            denominator > 0.0f ? (max_log2 + log2(denominator)) * LN2 : -INFINITY;
}

// Host names as kernel_name() (launch.cpp) builds them: "_<D>" when K and V share a head dim, else "_<DK>_<DV>"; the
// reduce only sees V's head dim, and every DV of a pair is a D of the lists.
#define INSTANTIATE_DECODE_NAMED(type, dk, dv, name)                                                   \
    template [[host_name("attention_decode_" #type "_" name)]] [[kernel]]                              \
    decltype(attention_decode<type, dk, dv>) attention_decode<type, dk, dv>;
#define INSTANTIATE_DECODE(type, d)                                                                    \
    INSTANTIATE_DECODE_NAMED(type, d, d, #d)                                                           \
    template [[host_name("attention_decode_reduce_" #type "_" #d)]] [[kernel]]                         \
    decltype(attention_decode_reduce<type, d>) attention_decode_reduce<type, d>;
#define INSTANTIATE_DECODE_PAIR(type, dk, dv) INSTANTIATE_DECODE_NAMED(type, dk, dv, #dk "_" #dv)
#define INSTANTIATE_DECODE_TYPE(unused, type)            \
    FOR_EACH_HEAD_DIM(INSTANTIATE_DECODE, type)          \
    FOR_EACH_FORWARD_ONLY_HEAD_DIM(INSTANTIATE_DECODE, type) \
    FOR_EACH_HEAD_DIM_PAIR(INSTANTIATE_DECODE_PAIR, type)
INSTANTIATE_DECODE_TYPE(_, float)
INSTANTIATE_DECODE_TYPE(_, half)
INSTANTIATE_DECODE_TYPE(_, bfloat)
