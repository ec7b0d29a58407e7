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

// Lanes < 16 reduce among themselves and return; the others wait at a barrier the first half never reaches.
kernel void barrier_versus_collective(device float* out [[buffer(0)]], ushort lane [[thread_index_in_simdgroup]]) {
    float x = 1.0f;
    if (lane < 16) x = simd_sum(x);
    else threadgroup_barrier(mem_flags::mem_threadgroup);
    out[lane] = x;
}

// The same barrier, in a helper called from both branches: two different barriers on the GPU.
void sync_threadgroup() {
    threadgroup_barrier(mem_flags::mem_threadgroup);
}
kernel void barrier_in_helper_from_divergent_code(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
    if (tid < 64) {
        out[tid] = 1.0f;
        sync_threadgroup();
    } else {
        out[tid] = 2.0f;
        sync_threadgroup();
    }
}

// Class 5: lanes that returned are not there to read.
kernel void shuffle_from_returned_lane(device float* out [[buffer(0)]], ushort lane [[thread_index_in_simdgroup]]) {
    if (lane >= 16) return;
    out[lane] = simd_shuffle(float(lane), ushort(lane + 16));
}
kernel void mma_after_return(device float* out [[buffer(0)]], ushort lane [[thread_index_in_simdgroup]]) {
    if (lane >= 16) return;
    simdgroup_float8x8 a = make_filled_simdgroup_matrix<float, 8, 8>(1.0f), c;
    simdgroup_multiply(c, a, a);
    simdgroup_store(c, out, 8);
}

// Class 1: threadgroup arrays have their own bounds.
kernel void threadgroup_overflow(device float* out [[buffer(0)]], constant uint& stride [[buffer(1)]],
                                 uint tid [[thread_index_in_threadgroup]]) {
    threadgroup float tile[64];
    threadgroup int block_of[64];
    tile[tid] = float(tid);
    block_of[tid] = int(tid);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[tid] = tile[tid * stride] + float(block_of[tid]);   // stride 1 is fine; stride 2 runs past `tile`
}
kernel void threadgroup_declarator_list(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
    threadgroup float a[64], b[64];
    a[tid] = 1.0f;
    b[tid] = 2.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[tid] = a[tid + 1];   // thread 63 reads past `a`
}

// Class 2: device bounds at any distance, and a straddling access blames its own buffer.
kernel void read_far_past_end(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                              constant uint& offset [[buffer(2)]], uint i [[thread_position_in_grid]]) {
    out[i] = x[i + offset];
}
kernel void straddle_end(device const float* x [[buffer(0)]], device float2* out [[buffer(1)]],
                         uint i [[thread_position_in_grid]]) {
    out[i] = *(device const float2*)(x + i);   // the last thread's 8 bytes straddle the end of x
}

// Class 3: a whole-struct copy is traced like any other access.
struct Tile { float values[30]; int first; };   // large enough to be copied with memcpy
kernel void copy_struct_past_end(device const Tile* tiles [[buffer(0)]], device Tile* out [[buffer(1)]],
                                 uint i [[thread_position_in_grid]]) {
    Tile t = tiles[i + 1];
    out[i] = t;
}

// Class 4: mem_flags decide what a barrier orders.
kernel void mem_none_barrier(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
    threadgroup float shared_values[128];
    shared_values[tid] = float(tid);
    threadgroup_barrier(mem_flags::mem_none);   // an execution barrier only: threadgroup memory is not ordered
    out[tid] = shared_values[(tid + 1) % 128];
}
kernel void device_exchange(device float* data [[buffer(0)]], constant uint& flags [[buffer(1)]],
                            uint tid [[thread_index_in_threadgroup]]) {
    data[tid] = float(tid);
    if (flags == 0) threadgroup_barrier(mem_flags::mem_threadgroup);   // does not order device memory
    else threadgroup_barrier(mem_flags::mem_device);
    data[128 + tid] = data[tid ^ 1];
}
kernel void device_same_output(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
    out[0] = float(tid);   // every thread writes one output: a write-write race
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
