// The mask switches every attention kernel shares (function constants) and the band of keys the causal /
// window masks leave visible, so the K loops visit only those.
#pragma once
#include <metal_stdlib>

#include "params.h"
using namespace metal;

constant bool do_causal [[function_constant(FC_DO_CAUSAL)]];
constant bool has_window [[function_constant(FC_HAS_WINDOW)]];
constant bool has_sinks [[function_constant(FC_HAS_SINKS)]];
constant bool has_softcap [[function_constant(FC_HAS_SOFTCAP)]];
constant bool has_alibi [[function_constant(FC_HAS_ALIBI)]];

// Keys [begin, end) that a query at some position in [first_pos, last_pos] may see (positions are key
// indices, bottom-right aligned); begin == end when none. In 64-bit: a position plus a window can pass 2^31.
struct KeyBand {
    int begin, end;
};

METAL_FUNC KeyBand key_band(int first_pos, int last_pos, int seqlen_k, constant MaskParams& mask) {
    int64_t lo = 0, hi = seqlen_k;
    if (do_causal) hi = min(hi, int64_t(last_pos) + 1);
    if (has_window && mask.window_right >= 0) hi = min(hi, int64_t(last_pos) + mask.window_right + 1);
    if (has_window && mask.window_left >= 0) lo = max(lo, int64_t(first_pos) - mask.window_left);
    return {int(lo), int(max(lo, hi))};   // lo <= first_pos and hi <= seqlen_k: both fit 32 bits
}

// The transpose of key_band: query rows [begin, end) (row r sits at key position r + shift) that may see some
// key in [first_key, last_key]; begin == end when none. In 64-bit like key_band.
struct QueryBand {
    int begin, end;
};

METAL_FUNC QueryBand query_band(int first_key, int last_key, int seqlen_q, int shift, constant MaskParams& mask) {
    int64_t lo = 0, hi = seqlen_q;
    if (do_causal) lo = max(lo, int64_t(first_key) - shift);
    if (has_window && mask.window_right >= 0) lo = max(lo, int64_t(first_key) - mask.window_right - shift);
    if (has_window && mask.window_left >= 0) hi = min(hi, int64_t(last_key) + mask.window_left - shift + 1);
    lo = min(lo, int64_t(seqlen_q));
    return {int(lo), int(max(lo, hi))};
}

// Whether the causal / window masks leave every pair of query positions [first_pos, last_pos] x keys
// [first_key, last_key] visible, so a tile of them needs no mask test.
METAL_FUNC bool band_interior(int first_pos, int last_pos, int first_key, int last_key, constant MaskParams& mask) {
    bool inside = true;
    if (do_causal) inside = inside && last_key <= first_pos;
    if (has_window && mask.window_right >= 0) inside = inside && int64_t(last_key) - first_pos <= mask.window_right;
    if (has_window && mask.window_left >= 0) inside = inside && int64_t(last_pos) - first_key <= mask.window_left;
    return inside;
}
