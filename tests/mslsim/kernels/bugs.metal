// Seeded bugs: each kernel does one thing that is undefined or rejected on a GPU;
// tests/mslsim/test_checks.py asserts the simulator reports it.
#include <metal_stdlib>
using namespace metal;

kernel void divergent_barrier(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
    if (tid < 64) {
        threadgroup_barrier(mem_flags::mem_threadgroup);
    } else {
        threadgroup_barrier(mem_flags::mem_device);
    }
    out[tid] = 1.0f;
}

kernel void barrier_after_return(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
    if (tid >= 100) return;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[tid] = 1.0f;
}

kernel void barrier_versus_collective(device float* out [[buffer(0)]], ushort lane [[thread_index_in_simdgroup]]) {
    float x = 1.0f;
    if (lane < 16) x = simd_sum(x);
    else threadgroup_barrier(mem_flags::mem_threadgroup);
    out[lane] = x;
}

kernel void divergent_collective(device float* out [[buffer(0)]], ushort lane [[thread_index_in_simdgroup]]) {
    float x = 1.0f;
    if (lane < 16) x = simd_sum(x);
    else x = simd_max(x);
    out[lane] = x;
}

kernel void too_much_threadgroup_memory(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
    threadgroup float keys[4096];
    threadgroup float values[4100];
    keys[tid] = 1.0f;
    values[tid] = 2.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[tid] = keys[tid] + values[tid];
}

kernel void read_past_end(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                          uint i [[thread_position_in_grid]]) {
    out[i] = x[i + 1];
}

kernel void write_past_end(device float* out [[buffer(0)]], uint i [[thread_position_in_grid]]) {
    out[i * 2] = 1.0f;
}

kernel void read_before_start(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                              uint i [[thread_position_in_grid]]) {
    out[i] = x[int(i) - 3];
}

constant bool needs_value [[function_constant(40)]];
kernel void uses_unset_constant(device float* out [[buffer(0)]], uint i [[thread_position_in_grid]]) {
    out[i] = needs_value ? 1.0f : 2.0f;
}

struct Params { uint n; float scale; };
kernel void reads_params(device float* out [[buffer(0)]], constant Params& p [[buffer(1)]],
                         uint i [[thread_position_in_grid]]) {
    out[i] = float(p.n) * p.scale;
}

kernel void missing_barrier(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
    threadgroup float shared_values[128];
    shared_values[tid] = float(tid);
    out[tid] = tid > 0 ? shared_values[tid - 1] : 0.0f;   // reads a neighbour's write without a barrier
}

kernel void write_after_read(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
    threadgroup float shared_values[128];
    shared_values[tid] = float(tid);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const float neighbour = shared_values[(tid + 1) % 128];
    shared_values[tid] = neighbour * 2.0f;    // overwrites what thread tid-1 may not have read yet
    out[tid] = neighbour;
}

kernel void uninitialised_read(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
    threadgroup float shared_values[128];
    if (tid < 100) shared_values[tid] = 1.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[tid] = shared_values[127 - tid];
}

kernel void wild_pointer(device float* out [[buffer(0)]], constant ulong& address [[buffer(1)]],
                         uint i [[thread_position_in_grid]]) {
    device float* p = (device float*)address;
    out[i] = p[i];
}

kernel void huge_thread_array(device float* out [[buffer(0)]], uint i [[thread_position_in_grid]]) {
    float big[200000];
    for (uint k = 0; k < 200000; ++k) big[k] = float(k + i);
    out[i] = big[(i * 7919) % 200000];
}

// Correct kernel: simdgroup_barrier orders lanes of one simdgroup (no race reported).
kernel void simdgroup_ordered(device float* out [[buffer(0)]], ushort lane [[thread_index_in_simdgroup]],
                              ushort sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup float shared_values[64];
    shared_values[sg * 32 + lane] = float(lane);
    simdgroup_barrier(mem_flags::mem_threadgroup);
    out[sg * 32 + lane] = shared_values[sg * 32 + (lane + 1) % 32];
}
