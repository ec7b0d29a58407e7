#include <metal_stdlib>
using namespace metal;
kernel void k(device float* x [[buffer(0)]]) { float* p = new float[4]; x[0] = p[0]; delete[] p; }
