#include <metal_stdlib>
using namespace metal;
kernel void k(device float* x [[buffer(0)]]) { double d = 1.0; x[0] = float(d); }
