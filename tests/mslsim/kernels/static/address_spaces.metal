#include <metal_stdlib>
using namespace metal;
static float first(device const float* p) { return p[0]; }
static float first_thread(const thread float* p) { return p[0]; }
kernel void k(device float* out [[buffer(0)]], constant float* cst [[buffer(1)]],
              uint tid [[thread_index_in_threadgroup]]) {
    threadgroup float buf[32];
    buf[tid % 32] = 1.0f;
    out[0] = first(buf);              // threadgroup pointer passed as device pointer
    out[1] = first_thread(out);       // device pointer passed as thread pointer
    cst[0] = 2.0f;                    // write through a constant pointer
    device float* p = buf;            // threadgroup -> device
    threadgroup float* q = out;       // device -> threadgroup
    out[2] = p[0] + q[0];
}
