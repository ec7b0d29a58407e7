#include <metal_stdlib>
using namespace metal;
kernel void k(device float* out [[buffer(0)]], uint tid [[thread_position_in_grid]]) {
    int i = 0;
again:
    if (++i < 3) goto again;
    out[tid] = float(i);
}
