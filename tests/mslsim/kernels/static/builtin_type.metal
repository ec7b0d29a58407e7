#include <metal_stdlib>
using namespace metal;
kernel void k(device float* out [[buffer(0)]], float position [[thread_position_in_grid]]) {
    out[uint(position)] = position;
}
