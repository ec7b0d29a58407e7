// Kernels whose profile counts are known by hand (tests/mslsim/test_profile.py): constant indices only, so no
// address arithmetic, and straight-line code, so every block runs once per thread.
#include <metal_stdlib>
using namespace metal;

struct Inputs { float a, b, c, d; half h; ulong l, m; int i, j; };

kernel void arithmetic(device const Inputs& in [[buffer(0)]], device float* out [[buffer(1)]]) {
  out[0] = exp2(in.a);                          // transcendental
  out[1] = in.a / in.b;                         // fp32 (fdiv)
  out[2] = float(in.h * in.h);                  // fp16 (fmul), convert (fpext)
  out[3] = float(in.l * in.m);                  // int64_mul, convert (uitofp)
  out[4] = float(in.i / in.j);                  // int_div (sdiv), convert (sitofp)
  out[5] = in.a < in.b ? in.c : in.d;           // compare_select: fcmp + select
}

kernel void matrix(device const float* a [[buffer(0)]], device float* c [[buffer(1)]],
                   ushort lane [[thread_index_in_simdgroup]]) {
  threadgroup float tile[64];
  tile[lane] = a[lane];
  tile[lane + 32] = a[lane + 32];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_float8x8 m, d;
  simdgroup_load(m, tile);
  simdgroup_multiply_accumulate(d, m, m, m);
  simdgroup_store(d, c);
  float s = simd_sum(a[lane]);
  if (lane == 0) c[64] = s;
}
