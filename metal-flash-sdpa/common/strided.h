// Element offsets in the strided [batch, token, head, dim] views every kernel reads and writes (decode
// caches: [block, slot, head, dim]); strides are int64 elements, the head dim is contiguous. And the index
// arithmetic that finds them.
#pragma once
#include <metal_stdlib>

#include "params.h"
using namespace metal;

// Offset in elements of (batch, token, head) in a view with strides {batch, token, head} (TokenStride).
METAL_FUNC int64_t element_offset(constant const int64_t* strides, int64_t batch, int64_t token, int64_t head) {
    return batch * strides[STRIDE_BATCH] + token * strides[STRIDE_TOKEN] + head * strides[STRIDE_HEAD];
}

// n / d.divisor for 0 <= n < 2^31 (FastDivisor, params.h).
METAL_FUNC int fast_divide(int n, FastDivisor d) { return int((mulhi(uint(n), d.multiplier) + uint(n)) >> d.shift); }

// Offset in elements of (batch, head, token) in the fp32 LSE, strides {batch, head, token} (LseStride).
METAL_FUNC int64_t lse_offset(constant const int64_t* strides, int64_t batch, int64_t head, int64_t token) {
    return batch * strides[LSE_BATCH] + head * strides[LSE_HEAD] + token * strides[LSE_TOKEN];
}

// Where sequence `seq` of a prefill-style call sits. Packed varlen (uniform_seqlen_q < 0): from cu_seqlens, which
// come from user data, clamped to the totals so no bad value can index outside the tensors. Batched: the uniform
// lengths. Params: any struct with total_q/k and uniform_seqlen_q/k (PrefillParams, BackwardParams).
struct SequenceSpan {
    int q_start, seqlen_q, k_start, seqlen_k;
};

// Tokens [start, start + length) of sequence `seq` in a packed layout with prefix sums `cu` over `total` tokens.
struct TokenSpan {
    int start, length;
};

METAL_FUNC TokenSpan packed_span(const device int* cu, int seq, int total) {
    const int start = clamp(cu[seq], 0, total);
    return {start, clamp(cu[seq + 1], start, total) - start};
}

template <typename Params>
METAL_FUNC SequenceSpan sequence_span(int seq, constant Params& p, const device int* cu_seqlens_q,
                                      const device int* cu_seqlens_k) {
    if (p.uniform_seqlen_q >= 0) return {0, p.uniform_seqlen_q, 0, p.uniform_seqlen_k};
    const TokenSpan queries = packed_span(cu_seqlens_q, seq, p.total_q), keys = packed_span(cu_seqlens_k, seq, p.total_k);
    return {queries.start, queries.length, keys.start, keys.length};
}

// Zeroes rows [first, last) of `head` in a packed [token, head, D] view (strides {batch, token, head}, batch 0),
// ROWS rows per pass of a threadgroup of 4 x ROWS threads (four threads per row), the passes striding over the
// grid's `columns` from `column`.
template <typename T, int D, int ROWS>
METAL_FUNC void zero_token_rows(device T* x, constant const int64_t* strides, int head, int first, int last, uint column,
                                uint columns, uint tid) {
    const int part = int(tid % 4);
    for (int64_t token = first + int64_t(column) * ROWS + tid / 4; token < last; token += int64_t(columns) * ROWS) {
        device T* row = x + element_offset(strides, 0, token, head);
        for (int col = part; col < D; col += 4) row[col] = T(0);
    }
}
