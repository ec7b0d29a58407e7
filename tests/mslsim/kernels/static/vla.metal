#include <metal_stdlib>
using namespace metal;
kernel void k(device float* x [[buffer(0)]], constant uint& n [[buffer(1)]]) { float tmp[n]; tmp[0] = 1.0f; x[0] = tmp[0]; }
