#include <metal_stdlib>
using namespace metal;
kernel void k(device float* x [[buffer(0)]]) { try { x[0] = 1.0f; } catch (...) { throw; } }
