// Flash attention forward for variable-length batches (flash-attn varlen layout).
//
// Grid: (ceil(max_seqlen_q / 32), num_heads, num_seqs); 128 threads = 4 simdgroups. A threadgroup owns
// 32 query rows of one (sequence, head), each simdgroup 8 of them as 8x8 simdgroup_matrix fragments;
// it strides over further query blocks if a sequence is longer than the grid, so an understated
// max_seqlen_q can cost time but never drops rows. Inputs are strided views (head dim contiguous):
// packed varlen [total, H, D] with cu_seqlens, or batched [B, S, H, D] with uniform lengths.
// K and V tiles of BK keys stream through threadgroup memory; S = Q K^T and O += P V run on 8x8
// fp32 MMAs; the softmax is the base-2 online softmax in fp32. The K loop visits only the key blocks
// that intersect the causal/window band of the query block, so the work is O(n * window).
//
// Fragment layout (Apple GPUs): lane l owns row (q & 4) + (l / 2) % 4 of every 8x8 fragment (q = l / 4),
// so the running max / sum of a query row live in one lane, and the four lanes that share a row differ
// in lane bits 0 and 3 (row reductions: simd_shuffle_xor by 1 and 8).
#include <metal_stdlib>

#include "attention_params.h"
#include "work_counters.h"
using namespace metal;

constant bool align_q [[function_constant(FC_ALIGN_Q)]];
constant bool align_k [[function_constant(FC_ALIGN_K)]];
constant bool do_causal [[function_constant(FC_DO_CAUSAL)]];
constant bool has_window [[function_constant(FC_HAS_WINDOW)]];
constant bool has_sinks [[function_constant(FC_HAS_SINKS)]];
constant bool has_softcap [[function_constant(FC_HAS_SOFTCAP)]];
constant bool has_alibi [[function_constant(FC_HAS_ALIBI)]];

// A masked score. Finite on purpose: Metal compiles with fast math, which may assume no infinities.
constant constexpr float MASKED = -1.0e30f;
constant constexpr float LOG2E = 1.4426950408889634f;
constant constexpr float LN2 = 0.6931471805599453f;

// Row reduction over the four lanes that hold one fragment row.
METAL_FUNC float row_max(float x) {
    x = max(x, simd_shuffle_xor(x, 1));
    return max(x, simd_shuffle_xor(x, 8));
}
METAL_FUNC float row_sum(float x) {
    x += simd_shuffle_xor(x, 1);
    return x + simd_shuffle_xor(x, 8);
}

// Copy keys [key0, key0 + BK) of one KV head into the tile (rows past the sequence are zero).
template <typename T, int D, int BK, int LD>
METAL_FUNC void load_tile(threadgroup T* tile, const device T* src, int key0, int seqlen_k, int64_t token_stride, uint tid) {
    for (int i = int(tid); i < BK * D; i += PREFILL_THREADS) {
        const int row = i / D, col = i % D;
        const int key = key0 + row;
        tile[row * LD + col] = align_k || key < seqlen_k ? src[key * token_stride + col] : T(0);
    }
}

template <typename T, int D>
[[kernel]] void attention_prefill(
    const device T* q [[buffer(PREFILL_BUFFER_Q)]],
    const device T* k [[buffer(PREFILL_BUFFER_K)]],
    const device T* v [[buffer(PREFILL_BUFFER_V)]],
    device T* out [[buffer(PREFILL_BUFFER_OUT)]],
    const device int* cu_seqlens_q [[buffer(PREFILL_BUFFER_CU_SEQLENS_Q)]],
    const device int* cu_seqlens_k [[buffer(PREFILL_BUFFER_CU_SEQLENS_K)]],
    constant PrefillParams& p [[buffer(PREFILL_BUFFER_PARAMS)]],
    const device float* sinks [[buffer(PREFILL_BUFFER_SINKS)]],
    const device float* alibi_slopes [[buffer(PREFILL_BUFFER_ALIBI)]],
    device float* lse [[buffer(PREFILL_BUFFER_LSE)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    uint3 grid [[threadgroups_per_grid]],
    uint tid [[thread_index_in_threadgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
    constexpr int BK = PREFILL_BLOCK_K(D);
    constexpr int LD = D + 8;   // padded row: staggers threadgroup memory banks
    threadgroup T tile[BK * LD];

    const int seq = int(tgid.z), head = int(tgid.y);
    int q_start = 0, seqlen_q = p.uniform_seqlen_q, k_start = 0, seqlen_k = p.uniform_seqlen_k;
    if (p.uniform_seqlen_q < 0) {
        // cu_seqlens come from user data: clamp them so no bad value can index outside q/k/v/out.
        q_start = clamp(cu_seqlens_q[seq], 0, p.total_q);
        seqlen_q = clamp(cu_seqlens_q[seq + 1], q_start, p.total_q) - q_start;
        k_start = clamp(cu_seqlens_k[seq], 0, p.total_k);
        seqlen_k = clamp(cu_seqlens_k[seq + 1], k_start, p.total_k) - k_start;
    }
    const int kv_head = head / (p.num_heads / p.num_kv_heads);
    // Bottom-right alignment: query row i sits at key position i + shift.
    const int shift = seqlen_k - seqlen_q;
    const device T* q_seq = q + seq * p.q_strides[STRIDE_BATCH] + q_start * p.q_strides[STRIDE_TOKEN]
                              + head * p.q_strides[STRIDE_HEAD];
    device T* out_seq = out + seq * p.out_strides[STRIDE_BATCH] + q_start * p.out_strides[STRIDE_TOKEN]
                            + head * p.out_strides[STRIDE_HEAD];
    device float* lse_seq = lse + seq * p.lse_strides[0] + head * p.lse_strides[1] + q_start * p.lse_strides[2];
    const device T* k_head = k + seq * p.k_strides[STRIDE_BATCH] + k_start * p.k_strides[STRIDE_TOKEN]
                               + kv_head * p.k_strides[STRIDE_HEAD];
    const device T* v_head = v + seq * p.v_strides[STRIDE_BATCH] + k_start * p.v_strides[STRIDE_TOKEN]
                               + kv_head * p.v_strides[STRIDE_HEAD];
    const float slope = has_alibi ? alibi_slopes[seq * p.alibi_seq_stride + head] * LOG2E : 0.0f;

    // This lane's fragment coordinates: row `frag_row`, columns frag_col, frag_col + 1.
    const int quad = lane / 4;
    const int frag_row = (quad & 4) + (lane / 2) % 4;
    const int frag_col = (quad & 2) * 2 + (lane % 2) * 2;

    // Uniform over the threadgroup, so the barriers inside stay convergent.
    for (int block_row0 = int(tgid.x) * PREFILL_BLOCK_Q; block_row0 < seqlen_q;
         block_row0 += int(grid.x) * PREFILL_BLOCK_Q) {
        // Keys [band_lo, band_hi) can be visible to some row of this block.
        const int last_row = min(block_row0 + PREFILL_BLOCK_Q, seqlen_q) - 1;
        int band_lo = 0, band_hi = seqlen_k;
        if (do_causal) band_hi = min(band_hi, last_row + shift + 1);
        if (has_window && p.window_right >= 0) band_hi = min(band_hi, last_row + shift + p.window_right + 1);
        if (has_window && p.window_left >= 0) band_lo = max(band_lo, block_row0 + shift - p.window_left);
        const int kb_begin = max(band_lo, 0) / BK;
        const int kb_end = band_hi > band_lo ? (band_hi + BK - 1) / BK : kb_begin;

        const int row = block_row0 + int(sg) * 8 + frag_row;   // query row in the sequence
        const bool row_valid = align_q || row < seqlen_q;
        const int q_pos = row + shift;

        // Q fragments in fp32, pre-scaled; rows past the sequence are zero.
        simdgroup_float8x8 q_frag[D / 8];
        const device T* q_row = q_seq + row * p.q_strides[STRIDE_TOKEN];
        for (int d = 0; d < D / 8; ++d) {
            for (int e = 0; e < 2; ++e)
                q_frag[d].thread_elements()[e] = row_valid ? float(q_row[d * 8 + frag_col + e]) * p.scale : 0.0f;
        }
        simdgroup_float8x8 o_frag[D / 8];
        for (int d = 0; d < D / 8; ++d) o_frag[d] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
        float row_max_log2 = MASKED;   // running max of the base-2 scores of this row
        float row_denominator = 0.0f;  // running sum of exp2(score - row_max_log2)

        for (int kb = kb_begin; kb < kb_end; ++kb) {
            const int key0 = kb * BK;
            threadgroup_barrier(mem_flags::mem_threadgroup);
            load_tile<T, D, BK, LD>(tile, k_head, key0, seqlen_k, p.k_strides[STRIDE_TOKEN], tid);
            if (tid == 0) WORK_COUNT("k_tiles_loaded", 1);
            threadgroup_barrier(mem_flags::mem_threadgroup);

            // S = Q K^T for this simdgroup's 8 rows and BK keys.
            simdgroup_float8x8 s_frag[BK / 8];
            for (int j = 0; j < BK / 8; ++j) {
                s_frag[j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
                for (int d = 0; d < D / 8; ++d) {
                    simdgroup_matrix<T, 8, 8> kt;
                    simdgroup_load(kt, tile, LD, ulong2(j * 8, d * 8), true);
                    simdgroup_float8x8 kt_f;
                    kt_f.thread_elements() = float2(kt.thread_elements());
                    simdgroup_multiply_accumulate(s_frag[j], q_frag[d], kt_f, s_frag[j]);
                }
            }

            // Scores -> base 2, masks, new running max.
            float block_max = MASKED;
            for (int j = 0; j < BK / 8; ++j) {
                for (int e = 0; e < 2; ++e) {
                    const int key = key0 + j * 8 + frag_col + e;
                    float s = s_frag[j].thread_elements()[e];
                    if (has_softcap) s = p.softcap * precise::tanh(s / p.softcap);
                    s *= LOG2E;
                    if (has_alibi) s -= slope * float(abs(q_pos - key));
                    const int distance = q_pos - key;
                    bool visible = row_valid && (align_k || key < seqlen_k);
                    if (do_causal) visible = visible && distance >= 0;
                    if (has_window && p.window_left >= 0) visible = visible && distance <= p.window_left;
                    if (has_window && p.window_right >= 0) visible = visible && -distance <= p.window_right;
                    s = visible ? s : MASKED;
                    s_frag[j].thread_elements()[e] = s;
                    block_max = max(block_max, s);
                }
            }
            const float new_max = max(row_max_log2, row_max(block_max));
            // exp2 of (MASKED - real max) underflows to 0; a fully masked row keeps p = 0 explicitly.
            const float rescale = fast::exp2(row_max_log2 - new_max);
            float block_sum = 0.0f;
            for (int j = 0; j < BK / 8; ++j) {
                for (int e = 0; e < 2; ++e) {
                    const float s = s_frag[j].thread_elements()[e];
                    const float prob = s == MASKED ? 0.0f : fast::exp2(s - new_max);
                    s_frag[j].thread_elements()[e] = prob;
                    block_sum += prob;
                }
            }
            row_denominator = row_denominator * rescale + row_sum(block_sum);
            row_max_log2 = new_max;
            for (int d = 0; d < D / 8; ++d) o_frag[d].thread_elements() *= rescale;

            threadgroup_barrier(mem_flags::mem_threadgroup);
            load_tile<T, D, BK, LD>(tile, v_head, key0, seqlen_k, p.v_strides[STRIDE_TOKEN], tid);
            if (tid == 0) WORK_COUNT("v_tiles_loaded", 1);
            threadgroup_barrier(mem_flags::mem_threadgroup);

            // O += P V
            for (int j = 0; j < BK / 8; ++j) {
                for (int d = 0; d < D / 8; ++d) {
                    simdgroup_matrix<T, 8, 8> vt;
                    simdgroup_load(vt, tile, LD, ulong2(d * 8, j * 8));
                    simdgroup_float8x8 vt_f;
                    vt_f.thread_elements() = float2(vt.thread_elements());
                    simdgroup_multiply_accumulate(o_frag[d], s_frag[j], vt_f, o_frag[d]);
                }
            }
        }

        // Sinks (gpt-oss): one logit per head that joins the denominator only; fold it into the running max.
        if (has_sinks) {
            const float sink = sinks[head] * LOG2E;
            const float new_max = max(row_max_log2, sink);
            const float rescale = fast::exp2(row_max_log2 - new_max);
            row_denominator = row_denominator * rescale + fast::exp2(sink - new_max);
            row_max_log2 = new_max;
            for (int d = 0; d < D / 8; ++d) o_frag[d].thread_elements() *= rescale;
        }

        if (!row_valid) continue;   // only ever true in the last block, so no barrier follows
        // A row that sees no key (and has no sink) outputs zeros and LSE -inf, never NaN.
        const float inv = row_denominator > 0.0f ? 1.0f / row_denominator : 0.0f;
        device T* out_row = out_seq + row * p.out_strides[STRIDE_TOKEN];
        for (int d = 0; d < D / 8; ++d) {
            for (int e = 0; e < 2; ++e) out_row[d * 8 + frag_col + e] = T(o_frag[d].thread_elements()[e] * inv);
        }
        if (frag_col == 0)   // one lane per row writes the log-sum-exp (natural log)
            lse_seq[row * p.lse_strides[2]] =
                row_denominator > 0.0f ? (row_max_log2 + log2(row_denominator)) * LN2 : -INFINITY;
    }
}

#define INSTANTIATE_PREFILL(type, d) \
    template [[host_name("attention_prefill_" #type "_" #d)]] [[kernel]] \
    decltype(attention_prefill<type, d>) attention_prefill<type, d>;
#define INSTANTIATE_PREFILL_ALL_DIMS(type) \
    INSTANTIATE_PREFILL(type, 32) INSTANTIATE_PREFILL(type, 64) INSTANTIATE_PREFILL(type, 72) \
    INSTANTIATE_PREFILL(type, 80) INSTANTIATE_PREFILL(type, 96) INSTANTIATE_PREFILL(type, 128) \
    INSTANTIATE_PREFILL(type, 192) INSTANTIATE_PREFILL(type, 256)
INSTANTIATE_PREFILL_ALL_DIMS(float)
INSTANTIATE_PREFILL_ALL_DIMS(half)
INSTANTIATE_PREFILL_ALL_DIMS(bfloat)
