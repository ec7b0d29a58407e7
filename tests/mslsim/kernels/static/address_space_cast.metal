#include <metal_stdlib>
using namespace metal;
kernel void k(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
    threadgroup float shared_values[32];
    shared_values[tid % 32] = 1.0f;
    device float4* vectors = (device float4*)out;     // same address space: valid
    device float* p = (device float*)shared_values;   // threadgroup -> device
    out[tid] = p[0] + vectors[0].x;
}
