// mslsim self-tests: each kernel exercises one feature; tests/mslsim/test_features.py checks it
// against numpy.
#include <metal_stdlib>
#include "work_counters.h"
using namespace metal;

// Tree reduction through threadgroup memory: exercises barriers and per-threadgroup memory.
kernel void threadgroup_sum(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                            uint tid [[thread_index_in_threadgroup]], uint tg [[threadgroup_position_in_grid]],
                            uint n [[threads_per_threadgroup]]) {
    threadgroup float partial[1024];
    partial[tid] = x[tg * n + tid];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint stride = n / 2; stride > 0; stride /= 2) {
        if (tid < stride) partial[tid] += partial[tid + stride];
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    if (tid == 0) out[tg] = partial[0];
}

// Every SIMD-group function. Lanes >= active return first and take no part (GPU semantics).
kernel void simd_functions(device const float* x [[buffer(0)]], device const int* bits [[buffer(1)]],
                           device float* out [[buffer(2)]], constant uint& active [[buffer(3)]],
                           uint tid [[thread_position_in_grid]], ushort lane [[thread_index_in_simdgroup]]) {
    if (lane >= active) return;
    const float v = x[tid];
    const int b = bits[tid];
    device float* o = out + tid * 20;
    o[0] = simd_sum(v);
    o[1] = simd_product(v);
    o[2] = simd_max(v);
    o[3] = simd_min(v);
    o[4] = float(simd_and(b));
    o[5] = float(simd_or(b));
    o[6] = float(simd_xor(b));
    o[7] = simd_prefix_inclusive_sum(v);
    o[8] = simd_prefix_exclusive_sum(v);
    o[9] = simd_prefix_inclusive_product(v);
    o[10] = simd_prefix_exclusive_product(v);
    if (active == 32) {   // a shuffle from a lane that returned is undefined: only in full simdgroups
        o[11] = simd_shuffle(v, (lane * 7 + 3) % 32);
        o[12] = simd_broadcast(v, 5);
        o[13] = simd_shuffle_xor(v, 6);
        o[14] = simd_shuffle_down(v, 3);
        o[15] = simd_shuffle_up(v, 2);
    }
    o[16] = simd_broadcast_first(v);
    o[17] = float(simd_all(v > -3.0f)) + 2.0f * float(simd_any(v > 1.5f));
    o[18] = float(simd_is_first());
    o[19] = simd_sum(float2(v, 1.0f)).y;
}

// acc = a * acc + b, `steps` times: every product and sum rounds to T.
template <typename T>
kernel void mul_add_chain(device const T* a [[buffer(0)]], device const T* b [[buffer(1)]],
                          device T* acc [[buffer(2)]], constant uint& steps [[buffer(3)]],
                          uint i [[thread_position_in_grid]]) {
    T r = acc[i];
    for (uint s = 0; s < steps; ++s) r = a[i] * r + b[i];
    acc[i] = r;
}
template [[host_name("mul_add_chain_half")]] [[kernel]] decltype(mul_add_chain<half>) mul_add_chain<half>;
template [[host_name("mul_add_chain_bfloat")]] [[kernel]] decltype(mul_add_chain<bfloat>) mul_add_chain<bfloat>;
template [[host_name("mul_add_chain_float")]] [[kernel]] decltype(mul_add_chain<float>) mul_add_chain<float>;

// float -> half / bfloat conversions (round to nearest even, overflow to inf, subnormals).
kernel void convert(device const float* x [[buffer(0)]], device half* h [[buffer(1)]], device bfloat* bf [[buffer(2)]],
                    uint i [[thread_position_in_grid]]) {
    h[i] = half(x[i]);
    bf[i] = bfloat(x[i]);
}

// Function constants select code paths per launch.
constant bool use_square [[function_constant(0)]];
constant int offset [[function_constant(1)]];
constant half scale [[function_constant(2)]];
constant bool has_bias [[function_constant(3)]];   // optional: tested with is_function_constant_defined

kernel void constant_paths(device float* out [[buffer(0)]], uint i [[thread_position_in_grid]]) {
    float v = float(i);
    if (use_square) {
        v = v * v;
    } else {
        v = -v;
    }
    v = (v + float(offset)) * float(scale);
    if (is_function_constant_defined(has_bias) && has_bias) v += 0.5f;
    out[i] = v;
}

// Work counters: each threadgroup reports the tiles it "loaded".
kernel void count_work(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]],
                       uint tg [[threadgroup_position_in_grid]]) {
    if (tid == 0) {
        WORK_COUNT("tiles_loaded", tg + 1);
        WORK_COUNT("threadgroups_seen", 1);
    }
    out[tg * 32 + tid] = 1.0f;
}

// Dynamic threadgroup memory ([[threadgroup(0)]]), a scalar threadgroup variable and threadgroup atomics.
kernel void dynamic_and_atomics(device float* out [[buffer(0)]], threadgroup float* scratch [[threadgroup(0)]],
                                uint tid [[thread_index_in_threadgroup]], uint n [[threads_per_threadgroup]]) {
    threadgroup atomic_uint arrivals;
    threadgroup float largest;
    if (tid == 0) {
        atomic_store_explicit(&arrivals, 0u, memory_order_relaxed);
        largest = -INFINITY;
    }
    scratch[tid] = float(tid) * 2.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    atomic_fetch_add_explicit(&arrivals, 1u, memory_order_relaxed);
    const float m = simd_max(scratch[n - 1 - tid]);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid == 0) largest = m;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[tid * 2] = largest;
    out[tid * 2 + 1] = float(atomic_load_explicit(&arrivals, memory_order_relaxed));
}

// A SIMD reduction in divergent code reduces the lanes that run its branch (Metal's active lanes).
kernel void divergent_reductions(device float* out [[buffer(0)]], ushort lane [[thread_index_in_simdgroup]]) {
    float x = float(lane);
    if (lane < 12) x = simd_sum(x);
    else x = simd_max(x);
    out[lane] = x + 1000.0f * float(simd_sum(1));   // uniform again: all 32 lanes
}

// Several threadgroup arrays in one declaration, each with its own storage and bounds.
kernel void declarator_list(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
    threadgroup float a[64], b[64];
    a[tid] = float(tid);
    b[tid] = 2.0f * float(tid);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[tid] = a[63 - tid] + b[tid];
}

// Whole-struct copies from device and constant memory (traced: bounds-checked and counted).
struct Record { float values[6]; int first; };
kernel void copy_records(device const Record* records [[buffer(0)]], constant Record& extra [[buffer(1)]],
                         device Record* out [[buffer(2)]], uint i [[thread_position_in_grid]]) {
    Record r = records[i];
    const Record e = extra;
    r.first += e.first;
    out[i] = r;
}

// Numerics the GPU-numerics twin changes: contraction of a*b+c, fast-math transcendentals.
kernel void numerics_probe(device const float* a [[buffer(0)]], device const float* b [[buffer(1)]],
                           device const float* c [[buffer(2)]], device float* out [[buffer(3)]],
                           uint i [[thread_position_in_grid]]) {
    device float* o = out + i * 6;
    o[0] = a[i] * b[i] + c[i];
    o[1] = exp(a[i]);
    o[2] = fast::exp2(a[i]);
    o[3] = precise::exp(a[i]);
    o[4] = log(b[i]);
    o[5] = precise::log(b[i]);
}

// Division: `/` is fast math (GPU numerics: one reciprocal for a divisor used twice), precise::divide is IEEE.
kernel void division_probe(device const float* a [[buffer(0)]], device const float* b [[buffer(1)]],
                           device const float* c [[buffer(2)]], device float* out [[buffer(3)]],
                           uint i [[thread_position_in_grid]]) {
    device float* o = out + i * 4;
    const float x = a[i], y = b[i], z = c[i];
    o[0] = x / y;
    o[1] = z / y;
    o[2] = precise::divide(x, y);
    o[3] = precise::divide(z, y);
}

// Atomics on floats, compare-exchange, ballots, rotations, and a buffer that exists only when a function
// constant says so; `tile` is a program-scope constant computed from a function constant, per launch.
constant bool bias_bound [[function_constant(10)]];
constant bool use_big_tiles [[function_constant(11)]];
constant int tile = use_big_tiles ? 64 : 32;
constant int half_tile = tile / 2;

kernel void more_features(device atomic_float* total [[buffer(0)]], device atomic_uint* counter [[buffer(1)]],
                          device float* out [[buffer(2)]],
                          device const float* bias [[buffer(3), function_constant(bias_bound)]],
                          uint tid [[thread_position_in_grid]], ushort lane [[thread_index_in_simdgroup]]) {
    threadgroup atomic_float local_total;
    if (tid == 0) atomic_store_explicit(&local_total, 0.0f, memory_order_relaxed);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    atomic_fetch_add_explicit(&local_total, 0.5f, memory_order_relaxed);
    atomic_fetch_add_explicit(total, 1.5f, memory_order_relaxed);
    uint expected = atomic_load_explicit(counter, memory_order_relaxed);
    while (!atomic_compare_exchange_weak_explicit(counter, &expected, expected + 2, memory_order_relaxed,
                                                  memory_order_relaxed)) {
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    device float* o = out + tid * 5;
    o[0] = float(uint(simd_vote::vote_t(simd_ballot(lane % 3 == 0))));
    o[1] = simd_shuffle_rotate_down(float(lane), ushort(5));
    o[2] = simd_shuffle_rotate_up(float(lane), ushort(5));
    o[3] = (bias_bound ? bias[tid] : 0.0f) + float(half_tile);
    o[4] = atomic_load_explicit(&local_total, memory_order_relaxed);
}
