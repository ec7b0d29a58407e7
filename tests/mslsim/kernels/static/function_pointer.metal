#include <metal_stdlib>
using namespace metal;
static float twice(float v) { return 2.0f * v; }
kernel void k(device float* x [[buffer(0)]]) { float (*op)(float) = twice; x[0] = op(x[0]); }
