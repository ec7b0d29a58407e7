#include <metal_stdlib>
using namespace metal;
kernel void k(device float* x [[buffer(0)]]) { x[0] = std::max(x[0], 1.0f); }
