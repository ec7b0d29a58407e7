// C = A * B on simdgroup_matrix 8x8 tiles, one simdgroup per 8x8 tile of C.
#include <metal_stdlib>
using namespace metal;

// All operands of type T; the A tile round-trips through threadgroup memory transposed.
template <typename T>
kernel void mma_gemm(device const T* A [[buffer(0)]], device const T* B [[buffer(1)]], device T* C [[buffer(2)]],
                     constant uint3& mnk [[buffer(3)]], uint2 tg [[threadgroup_position_in_grid]],
                     ushort sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup T staging[4][64];
    const uint N = mnk.y, K = mnk.z;
    const uint row0 = tg.y * 8, col0 = (tg.x * 4 + sg) * 8;
    simdgroup_matrix<T, 8, 8> acc = make_filled_simdgroup_matrix<T, 8, 8>(T(0));
    for (uint k = 0; k < K; k += 8) {
        simdgroup_matrix<T, 8, 8> a, b;
        simdgroup_load(a, A + row0 * K, K, ulong2(k, 0));
        simdgroup_store(a, &staging[sg][0], 8, ulong2(0, 0), true);
        simdgroup_barrier(mem_flags::mem_threadgroup);
        simdgroup_load(a, &staging[sg][0], 8, ulong2(0, 0), true);
        simdgroup_barrier(mem_flags::mem_threadgroup);
        simdgroup_load(b, B + k * N + col0, N);
        simdgroup_multiply_accumulate(acc, a, b, acc);
    }
    simdgroup_store(acc, C + row0 * N + col0, N);
}
template [[host_name("mma_gemm_half")]] [[kernel]] decltype(mma_gemm<half>) mma_gemm<half>;
template [[host_name("mma_gemm_bfloat")]] [[kernel]] decltype(mma_gemm<bfloat>) mma_gemm<bfloat>;
template [[host_name("mma_gemm_float")]] [[kernel]] decltype(mma_gemm<float>) mma_gemm<float>;

// Writes each lane's ownership of an 8x8 fragment: out[row][col] = lane * 2 + element.
kernel void fragment_owners(device float* out [[buffer(0)]], ushort lane [[thread_index_in_simdgroup]]) {
    simdgroup_float8x8 m;
    m.thread_elements()[0] = float(lane * 2);
    m.thread_elements()[1] = float(lane * 2 + 1);
    simdgroup_store(m, out, 8);
}
