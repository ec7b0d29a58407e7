// Flash attention forward for variable-length batches (flash-attn varlen layout).
//
// Grid: (ceil(max_seqlen_q / 32), num_heads, num_seqs); 128 threads = 4 simdgroups. A threadgroup owns
// 32 query rows of one (sequence, head), each simdgroup 8 of them as 8x8 simdgroup_matrix fragments;
// it strides over further query blocks if a sequence is longer than the grid, so an understated
// max_seqlen_q can cost time but never drops rows. Inputs are strided views (head dim contiguous):
// packed varlen [total, H, D] with cu_seqlens, or batched [B, S, H, D] with uniform lengths. With FC_PAGED_KV (varlen)
// k/v are paged caches [num_blocks, block_size, Hkv, D] read in place through block_table: per tile, simdgroup 0
// maps the band's keys to cache slots (kv_tile.h, as the decode kernel does) and the copies read those rows only.
// K and V tiles of BK keys stream through threadgroup memory (attention_tile.h does the math). The K
// loop visits only the key blocks that intersect the causal/window band of the query block, so the
// work is O(n * window). Every row of out and lse is written by this kernel, also the rows of tokens that
// unchecked cu_seqlens_q leave in no sequence (zeros, LSE -inf), so the host allocates them uninitialised.
#include <metal_stdlib>

#include "common/attention_tile.h"
#include "common/kv_tile.h"
#include "common/mask_band.h"
#include "common/params.h"
#include "common/strided.h"
#include "common/work_counters.h"
using namespace metal;

constant bool align_q [[function_constant(FC_ALIGN_Q)]];
constant bool align_k [[function_constant(FC_ALIGN_K)]];
constant bool paged_kv [[function_constant(FC_PAGED_KV)]];

// Where sequence `seq`'s queries and keys are: strided.h's sequence_span, or with seqused_k / a paged cache (varlen
// only) its key count from seqused_k or its cu_seqlens_k step, clamped to what exists: the cu_seqlens_k span
// (unpaged: the keys are that span's first ones) or the block_table row's capacity (paged: cache positions 0..).
METAL_FUNC SequenceSpan prefill_span(int seq, constant PrefillParams& p, const device int* cu_seqlens_q,
                                     const device int* cu_seqlens_k, const device int* seqused_k) {
    if (!paged_kv && !p.has_seqused_k) return sequence_span(seq, p, cu_seqlens_q, cu_seqlens_k);
    const TokenSpan queries = packed_span(cu_seqlens_q, seq, p.total_q);
    if (!paged_kv) {
        const TokenSpan keys = packed_span(cu_seqlens_k, seq, p.total_k);
        return {queries.start, queries.length, keys.start, clamp(seqused_k[seq], 0, keys.length)};
    }
    const int64_t capacity = int64_t(p.blocks_per_seq) * p.block_size.divisor;   // < 2^31 (host check)
    const int64_t count = p.has_seqused_k ? int64_t(seqused_k[seq]) : int64_t(cu_seqlens_k[seq + 1]) - cu_seqlens_k[seq];
    return {queries.start, queries.length, 0, int(clamp(count, int64_t(0), capacity))};
}
// Whether keys [key0, key0 + BK) may hide some pair from a query block whose rows sit at key positions
// [first_pos, last_pos]: the tile cuts the sequence end, the causal diagonal or a window edge, or the block has
// rows past the sequence. Interior tiles skip the mask math (MLX: masks only on the diagonal / last block).
METAL_FUNC bool edge_tile(int key0, int BK, int seqlen_k, int first_pos, int last_pos, bool rows_valid,
                          constant MaskParams& mask) {
    const int64_t last_key = int64_t(key0) + BK - 1;
    bool edge = !rows_valid || (!align_k && last_key >= seqlen_k);
    if (do_causal) edge = edge || last_key > first_pos;
    if (has_window && mask.window_right >= 0) edge = edge || last_key - first_pos > mask.window_right;
    if (has_window && mask.window_left >= 0) edge = edge || int64_t(last_pos) - key0 > mask.window_left;
    return edge;
}

// Whether packed token `token` lies in no sequence. Sequence s owns tokens [c_s, c_s+1) of c = cu_seqlens_q clamped
// to [0, total_q], as the kernel reads them (a step that does not go up owns nothing).
METAL_FUNC bool in_no_sequence(const device int* cu_seqlens_q, int num_seqs, int total_q, int token) {
    int start = clamp(cu_seqlens_q[0], 0, total_q);
    for (int s = 0; s < num_seqs; ++s) {
        const int end = clamp(cu_seqlens_q[s + 1], 0, total_q);
        if (start <= token && token < end) return false;
        start = end;
    }
    return true;
}

// Rows of tokens [first, last) that no sequence owns get what a row without keys gets: zeros and LSE -inf. Unchecked
// cu_seqlens_q can leave such tokens only before its first entry or past its last, so the threadgroups of the first
// and last sequence write them here and out / lse need no fill pass. THREADS / PREFILL_BLOCK_Q threads per row,
// PREFILL_BLOCK_Q rows per block; the blocks stride over the grid's columns as the query blocks do.
template <typename T, int D, int THREADS>
METAL_FUNC void clear_rows_in_no_sequence(device T* out, device float* lse, const device int* cu_seqlens_q,
                                          constant PrefillParams& p, int head, int first, int last, uint column,
                                          uint columns, uint tid) {
    constexpr int PER_ROW = THREADS / PREFILL_BLOCK_Q;
    const int part = int(tid % PER_ROW);
    for (int64_t token = first + int64_t(column) * PREFILL_BLOCK_Q + tid / PER_ROW; token < last;
         token += int64_t(columns) * PREFILL_BLOCK_Q) {
        if (!in_no_sequence(cu_seqlens_q, p.shape.num_seqs, p.total_q, int(token))) continue;
        device T* row = out + element_offset(p.shape.out_strides, 0, token, head);
        for (int col = part; col < D; col += PER_ROW) row[col] = T(0);
        if (part == 0) lse[lse_offset(p.shape.lse_strides, 0, head, token)] = -INFINITY;
    }
}

// DK: the head dim of q and k, DV: of v and out. HEAD_PARTS(DV) simdgroups share each 8 query rows (params.h).
template <typename T, int DK, int DV>
[[kernel, max_total_threads_per_threadgroup(PREFILL_THREADS * HEAD_PARTS(DV))]] void attention_prefill(
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
    const device int* block_table [[buffer(PREFILL_BUFFER_BLOCK_TABLE)]],
    const device int* seqused_k [[buffer(PREFILL_BUFFER_SEQUSED_K)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    uint3 grid [[threadgroups_per_grid]],
    uint tid [[thread_index_in_threadgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
    constexpr int PARTS = HEAD_PARTS(DV), DKP = DK / PARTS, DVP = DV / PARTS;   // a simdgroup's part of Q and of O
    constexpr int THREADS = PREFILL_THREADS * PARTS;
    constexpr int BK = KV_TILE_KEYS(DK);
    constexpr int LD = DK + 8;   // padded row: staggers threadgroup memory banks
    // The K/V tile, then (wide heads) the score exchange.
    threadgroup uint4 tile_storage[KV_TILE_VECTORS(T, BK, LD) + HEAD_PARTS_SCORE_FLOATS(PREFILL_BLOCK_Q / 8, DK, DV) / 4];
    threadgroup T* tile = reinterpret_cast<threadgroup T*>(tile_storage);
    threadgroup float* score_parts = reinterpret_cast<threadgroup float*>(tile_storage + KV_TILE_VECTORS(T, BK, LD));
    threadgroup int64_t k_offset[BK], v_offset[BK];   // paged: element offset of each tile key in k / v (-1: none)
    threadgroup uint tile_valid;                      // paged: bit r set when key key0 + r is read

    const int seq = int(tgid.z), head = int(tgid.y);
    const SequenceSpan span = prefill_span(seq, p, cu_seqlens_q, cu_seqlens_k, seqused_k);
    const int seqlen_q = span.seqlen_q, seqlen_k = span.seqlen_k;
    const int kv_head = head / (p.shape.num_heads / p.shape.num_kv_heads);
    // Bottom-right alignment: query row i sits at key position i + shift.
    const int shift = seqlen_k - seqlen_q;
    const device T* q_seq = q + element_offset(p.shape.q_strides, seq, span.q_start, head);
    device T* out_seq = out + element_offset(p.shape.out_strides, seq, span.q_start, head);
    device float* lse_seq = lse + lse_offset(p.shape.lse_strides, seq, head, span.q_start);
    // Paged: the caches at this KV head (tile rows come from the table); else the sequence's first key.
    const device T* k_head = k + element_offset(p.shape.k_strides, paged_kv ? 0 : seq, span.k_start, kv_head);
    const device T* v_head = v + element_offset(p.shape.v_strides, paged_kv ? 0 : seq, span.k_start, kv_head);
    const PagedLayout cache = paged_kv ? paged_layout(p, block_table, seq) : PagedLayout{};   // (read when paged)
    const float slope = has_alibi ? alibi_slopes[seq * p.mask.alibi_seq_stride + head] * LOG2E : 0.0f;

    const FragmentCoord fc = fragment_coord(lane);
    // Q is loaded unscaled (exact in its 16-bit type) and the scale applied to the scores.
    const ScoreRules rules = score_rules(do_causal, has_window, has_softcap, has_alibi, p.mask, p.mask.scale);

    // Uniform over the threadgroup, so the barriers inside stay convergent. The block counter is 64-bit: the
    // next block's first row can pass 2^31 when seqlen_q is near it.
    for (int64_t block = tgid.x; block * PREFILL_BLOCK_Q < seqlen_q; block += grid.x) {
        const int block_row0 = int(block * PREFILL_BLOCK_Q);
        const int last_row = min(block_row0 + PREFILL_BLOCK_Q, seqlen_q) - 1;
        const KeyBand band = key_band(block_row0 + shift, last_row + shift, seqlen_k, p.mask);
        const int kb_begin = band.begin / BK;
        const int kb_end = band.end > band.begin ? (band.end + BK - 1) / BK : kb_begin;

        const int row_group = int(sg) / PARTS, part = int(sg) % PARTS;
        const int row = block_row0 + row_group * 8 + fc.row;   // query row in the sequence
        const bool row_valid = align_q || row < seqlen_q;
        // Q stays in the input type at every head dim: D/8 registers per lane in 16 bits instead of D/4 in fp32 (at
        // D = 256 fp32 Q and O alone, 64 + 64 floats, overrun a thread's 128 registers), and the K fragments it
        // multiplies need no conversion. Nothing is lost: products of 16-bit values are exact in the fp32 sums.
        Fragments<DKP / 8, T> q_frag;
        Fragments<DVP / 8> o_frag;
        load_q<T, DKP>(q_frag, q_seq + row * p.shape.q_strides[STRIDE_TOKEN] + part * DKP, row_valid, 1.0f, fc);
        clear<DVP>(o_frag);
        OnlineSoftmax state;

        for (int kb = kb_begin; kb < kb_end; ++kb) {
            const int key0 = kb * BK;
            const TokenRows k_rows{align_k ? BK : min(BK, seqlen_k - key0), p.shape.k_strides[STRIDE_TOKEN]};
            const TokenRows v_rows{k_rows.rows, p.shape.v_strides[STRIDE_TOKEN]};
            threadgroup_barrier(mem_flags::mem_threadgroup);
            uint valid = ~0u;
            if (paged_kv) {   // only the band's keys are read: the bytes read are the visible keys' rows
                if (sg == 0)
                    map_paged_keys<BK>(cache, 0, key0, band.begin, band.end, seqlen_k, k_offset, v_offset, &tile_valid, lane);
                threadgroup_barrier(mem_flags::mem_threadgroup);
                valid = tile_valid;
                copy_kv_tile<T, DK, BK, LD>(tile, k_head, TableRows{k_offset}, tid, THREADS);
            } else {
                copy_kv_tile<T, DK, BK, LD>(tile, k_head + int64_t(key0) * k_rows.token_stride, k_rows, tid, THREADS);
            }
            // Counted by thread 0 without a branch: a divergent `if` right before a barrier lets the compiler copy
            // the barrier into both paths, and the simulator then sees two barriers.
            WORK_COUNT("k_tiles_loaded", tid == 0);
            threadgroup_barrier(mem_flags::mem_threadgroup);
            Fragments<BK / 8> s_frag;
            qk_tile<T, DKP, BK, LD>(s_frag, q_frag, tile + part * DKP);
            if (PARTS > 1) share_score_part<BK>(s_frag, score_parts, sg, lane);

            threadgroup_barrier(mem_flags::mem_threadgroup);
            if (PARTS > 1) sum_score_parts<BK, PARTS>(s_frag, score_parts, row_group, lane);
            if (!v_in_k_tile) {
                if (paged_kv)
                    copy_kv_tile<T, DV, BK, LD>(tile, v_head, TableRows{v_offset}, tid, THREADS);
                else
                    copy_kv_tile<T, DV, BK, LD>(tile, v_head + int64_t(key0) * v_rows.token_stride, v_rows, tid, THREADS);
            }
            WORK_COUNT("v_tiles_loaded", tid == 0 && !v_in_k_tile);
            // The softmax runs between issuing the V loads and the barrier that waits for them, so its math hides
            // their latency (MLX steel orders it so too); it reads only registers.
            // A paged tile with a key missing (outside the band or the sequence, or its block hidden) masks it.
            const bool edge = edge_tile(key0, BK, seqlen_k, block_row0 + shift, last_row + shift,
                                        align_q || block_row0 + PREFILL_BLOCK_Q <= seqlen_q, p.mask) ||
                              (paged_kv && valid != (BK == 32 ? ~0u : (1u << BK) - 1u));
            softmax_tile<DVP, BK>(s_frag, state, o_frag, key0, seqlen_k, valid, row + shift, row_valid, edge, slope, rules, fc);
            threadgroup_barrier(mem_flags::mem_threadgroup);
            pv_tile<T, DVP, BK, LD>(o_frag, s_frag, tile + part * DVP);
        }
        if (has_sinks) fold_sink<DVP>(state, o_frag, sinks[head] * LOG2E);

        if (!row_valid) continue;   // only ever true in the last block, so no barrier follows
        store_row<T, DVP>(out_seq + row * p.shape.out_strides[STRIDE_TOKEN] + part * DVP,
                          lse_seq + row * p.shape.lse_strides[LSE_TOKEN], state, o_frag, fc, part == 0);
    }
    // After the last barrier: the threads take different paths through this.
    if (p.uniform_seqlen_q < 0 && seq == 0)
        clear_rows_in_no_sequence<T, DV, THREADS>(out, lse, cu_seqlens_q, p, head, 0, clamp(cu_seqlens_q[0], 0, p.total_q),
                                                  tgid.x, grid.x, tid);
    if (p.uniform_seqlen_q < 0 && seq == p.shape.num_seqs - 1)
        clear_rows_in_no_sequence<T, DV, THREADS>(out, lse, cu_seqlens_q, p, head,
                                                  clamp(cu_seqlens_q[seq + 1], 0, p.total_q), p.total_q, tgid.x, grid.x,
                                                  tid);
}

// Host names as kernel_name() (launch.cpp) builds them: "_<D>" when K and V share a head dim, else "_<DK>_<DV>".
#define INSTANTIATE_PREFILL_NAMED(type, dk, dv, name) \
    template [[host_name("attention_prefill_" #type "_" name)]] [[kernel]] \
    decltype(attention_prefill<type, dk, dv>) attention_prefill<type, dk, dv>;
#define INSTANTIATE_PREFILL(type, d) INSTANTIATE_PREFILL_NAMED(type, d, d, #d)
#define INSTANTIATE_PREFILL_PAIR(type, dk, dv) INSTANTIATE_PREFILL_NAMED(type, dk, dv, #dk "_" #dv)
#define INSTANTIATE_PREFILL_TYPE(unused, type) \
    FOR_EACH_HEAD_DIM(INSTANTIATE_PREFILL, type) \
    FOR_EACH_FORWARD_ONLY_HEAD_DIM(INSTANTIATE_PREFILL, type) \
    FOR_EACH_HEAD_DIM_PAIR(INSTANTIATE_PREFILL_PAIR, type)
INSTANTIATE_PREFILL_TYPE(_, float)
INSTANTIATE_PREFILL_TYPE(_, half)
INSTANTIATE_PREFILL_TYPE(_, bfloat)
