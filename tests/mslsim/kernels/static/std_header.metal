#include <metal_stdlib>
#include <cmath>
using namespace metal;
kernel void k(device float* out [[buffer(0)]], uint tid [[thread_position_in_grid]]) {
    out[tid] = 1.0f;
}
