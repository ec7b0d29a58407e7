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

// Division by a constant compiles to a multiply-high and shifts on every GPU: a multiply, not an int_div.
kernel void constant_divisors(device const Inputs& in [[buffer(0)]], device float* out [[buffer(1)]]) {
  out[0] = float(in.i / 7);                     // sdiv by 7: int32_mul
  out[1] = float(uint(in.j) % 18u);             // urem by 18: int32_mul
  out[2] = float(in.l / 10);                    // udiv i64 by 10: int64_mul
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

// One body with its parameters in the `constant` address space (as our shaders and MLX's take them) and, seeded,
// as `const device` memory: only the class of the parameter loads may differ. Scale and shift differ in width,
// so they stay two loads.
struct Affine { float scale; int pad; ulong shift; };
constant bool has_bias [[function_constant(0)]];
#define AFFINE_KERNEL(name, space)                                                                              \
  kernel void name(device const float* x [[buffer(0)]], space Affine& p [[buffer(1)]], device float* out [[buffer(2)]], \
                   space float& bias [[buffer(3), function_constant(has_bias)]],                               \
                   ushort lane [[thread_index_in_simdgroup]]) {                                                 \
    out[lane] = x[lane] * p.scale + float(p.shift) + (has_bias ? bias : 0.0f);                                 \
  }
AFFINE_KERNEL(affine_constant, constant)
AFFINE_KERNEL(affine_device, const device)

// A vector constructor that converts costs what the scalar casts cost: one convert per element (ir_mix's rule
// for include/mslsim/vector_constructors.h); one that only moves elements costs nothing.
kernel void vector_convert(device const half2* x [[buffer(0)]], device float2* out [[buffer(1)]],
                           ushort lane [[thread_index_in_simdgroup]]) {
  out[lane] = float2(x[lane]);
}
kernel void scalar_convert(device const half2* x [[buffer(0)]], device float2* out [[buffer(1)]],
                           ushort lane [[thread_index_in_simdgroup]]) {
  half2 h = x[lane];
  out[lane] = float2(float(h.x), float(h.y));
}
kernel void vector_copy(device const half2* x [[buffer(0)]], device half4* out [[buffer(1)]],
                        ushort lane [[thread_index_in_simdgroup]]) {
  out[lane] = half4(x[lane], x[lane].yx);
}

// The multiply-accumulate widens its half operands inside the shim: the runtime's matrix_multiply_accumulate
// count is its cost, not converts.
kernel void half_matrix(device const half* a [[buffer(0)]], device float* c [[buffer(1)]]) {
  simdgroup_half8x8 m;
  simdgroup_float8x8 d = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  simdgroup_load(m, a);
  simdgroup_multiply_accumulate(d, m, m, d);
  simdgroup_store(d, c);
}

// Metal's element-wise math functions cost the kernel what an Apple GPU executes per element (ir_mix's rule for
// include/mslsim/math_functions.h): a, b, c at constant indices, so the function is the only arithmetic.
#define MATH_KERNEL(name, T, expr)                                                               \
  kernel void name(device const T* v [[buffer(0)]], device T* out [[buffer(1)]]) {              \
    T a = v[0], b = v[1], c = v[2];                                                              \
    (void)b, (void)c;                                                                            \
    out[0] = expr;                                                                               \
  }
MATH_KERNEL(max_float, float, max(a, b))
MATH_KERNEL(max_float4, float4, max(a, b))
MATH_KERNEL(max_float4_scalar, float4, max(a, b.x))
MATH_KERNEL(fast_max_float4, float4, fast::max(a, b))
MATH_KERNEL(min_int4, int4, min(a, b))
MATH_KERNEL(fmin_half, half, fmin(a, b))
MATH_KERNEL(fma_float, float, fma(a, b, c))
MATH_KERNEL(fma_float4, float4, fma(a, b, c))
MATH_KERNEL(fma_half4, half4, fma(a, b, c))
MATH_KERNEL(clamp_float, float, clamp(a, b, c))
MATH_KERNEL(clamp_float4, float4, clamp(a, b, c))
MATH_KERNEL(abs_float4, float4, abs(a))
MATH_KERNEL(abs_int, int, abs(a))
MATH_KERNEL(saturate_float, float, saturate(a))
MATH_KERNEL(floor_half, half, floor(a))
MATH_KERNEL(mix_float, float, mix(a, b, c))
MATH_KERNEL(sign_float, float, sign(a))
MATH_KERNEL(divide_float, float, divide(a, b))
MATH_KERNEL(fast_divide_float4, float4, fast::divide(a, b))
MATH_KERNEL(precise_divide_float, float, precise::divide(a, b))   // ieee_divide's fdiv: one fp, as `/`
MATH_KERNEL(precise_divide_half4, half4, precise::divide(a, b))

// simd_max reduces with metal::max inside the shim: the runtime counts the SIMD-group function, and those max calls
// are not the kernel's arithmetic; simd_sum_lanes is the same kernel with simd_sum, whose additions are the shim's.
kernel void simd_max_lanes(device const float* v [[buffer(0)]], device float* out [[buffer(1)]],
                           ushort lane [[thread_index_in_simdgroup]]) {
  out[lane] = simd_max(v[lane]);
}
kernel void simd_sum_lanes(device const float* v [[buffer(0)]], device float* out [[buffer(1)]],
                           ushort lane [[thread_index_in_simdgroup]]) {
  out[lane] = simd_sum(v[lane]);
}

// Contraction: the GPU twin is compiled with -ffp-contract=fast, and a multiply whose only use is an add or
// subtract in its block fuses with it into one FMA (ir_mix's rule: the add counts 0, the multiply 1). The exact
// twin does not contract: its results are the unfused ones.
kernel void fma_loop(device const float* a [[buffer(0)]], device const float* b [[buffer(1)]],
                     device float* out [[buffer(2)]], constant uint& n [[buffer(3)]]) {
  float acc = 0.0f;
  for (uint i = 0; i < n; i++) acc = a[i] * b[i] + acc;   // one FMA an iteration
  out[0] = acc;
}
kernel void fma_pairs(device const float* v [[buffer(0)]], device float* out [[buffer(1)]]) {
  out[0] = v[0] * v[1] + v[2];                            // FMA
  out[1] = v[3] - v[4] * v[5];                            // FMA (negated product)
  out[2] = v[6] * v[7] - v[8];                            // FMA (negated addend)
}
kernel void fma_vectors(device const float4* v [[buffer(0)]], device const half4* h [[buffer(1)]],
                        device float4* out [[buffer(2)]], device half4* out_h [[buffer(3)]]) {
  out[0] = v[0] * v[1] + v[2];                            // 4 FMAs
  out_h[0] = h[0] * h[1] + h[2];                          // 4 FMAs
}
kernel void shared_product(device const float* v [[buffer(0)]], device float* out [[buffer(1)]]) {
  float p = v[0] * v[1];                                  // two uses: a multiply and two adds
  out[0] = p + v[2];
  out[1] = p + v[3];
}
// A loop-invariant product is hoisted out of the loop (LICM), where it has one use: the add in the loop, which has
// no multiply in its block to fuse with and runs unfused every iteration (not unrolled, so the use stays single).
kernel void invariant_product_loop(device const float* v [[buffer(0)]], device float* out [[buffer(1)]],
                                   constant uint& n [[buffer(2)]]) {
  float x = v[0], y = v[1], acc = v[2];
#pragma clang loop unroll(disable)
  for (uint i = 0; i < n; i++) acc = x * y + acc;
  out[0] = acc;
}
