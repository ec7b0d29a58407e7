// Element offsets in the strided [batch, token, head, dim] views every kernel reads and writes (decode
// caches: [block, slot, head, dim]); strides are int64 elements, the head dim is contiguous.
#pragma once
#include <metal_stdlib>

#include "params.h"
using namespace metal;

// Offset in elements of (batch, token, head) in a view with strides {batch, token, head} (TokenStride).
METAL_FUNC int64_t element_offset(constant const int64_t* strides, int64_t batch, int64_t token, int64_t head) {
    return batch * strides[STRIDE_BATCH] + token * strides[STRIDE_TOKEN] + head * strides[STRIDE_HEAD];
}

// Offset in elements of (batch, head, token) in the fp32 LSE, strides {batch, head, token} (LseStride).
METAL_FUNC int64_t lse_offset(constant const int64_t* strides, int64_t batch, int64_t head, int64_t token) {
    return batch * strides[LSE_BATCH] + head * strides[LSE_HEAD] + token * strides[LSE_TOKEN];
}
