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
