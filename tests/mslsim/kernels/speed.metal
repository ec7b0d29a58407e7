// Simulator throughput: each thread does `phases` rounds of `fmas_per_phase` fp32 FMAs, exchanging its
// accumulator through threadgroup memory with a barrier after every round.
#include <metal_stdlib>
using namespace metal;

kernel void fma_phases(device float* out [[buffer(0)]], constant uint2& work [[buffer(1)]],
                       uint tid [[thread_index_in_threadgroup]], uint tg [[threadgroup_position_in_grid]],
                       uint n [[threads_per_threadgroup]]) {
    threadgroup float exchange[1024];
    float acc = float(tid) * 1e-3f;
    const float a = 0.999f, b = 1e-4f * float(tg + 1);
    for (uint phase = 0; phase < work.x; ++phase) {
        for (uint i = 0; i < work.y; ++i) acc = fma(acc, a, b);
        exchange[tid] = acc;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        acc = 0.5f * (acc + exchange[(tid + 1) % n]);
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    out[tg * n + tid] = acc;
}
