// mslsim: Metal's element-wise math functions (abs, min, max, clamp, fma, mix, sign, floor, divide, ..., their
// fast:: and precise:: spellings and the compiler intrinsics MLX's bf16_math.h calls), included by shim.h inside
// namespace metal. A header of its own because what its code computes is the kernel's: mslsim/ir_mix.py counts
// the instructions written here when the call comes from kernel code (the first frame of the inlining chain
// outside this file is the kernel's), compares and element conversions excepted, so a call costs per element what
// an Apple GPU executes: min/max/fmin/fmax one compare_select (the select, or the min/max LLVM folds it into),
// clamp and saturate two, abs one (fabs: fp; integers: compare_select), fma one fp (half's in double, counted
// fp16), floor/ceil/round/rint/trunc/fabs/divide one fp, fract two, mix two (a sub, and an FMA: the mul and add
// contract), sign two compare_select. A use inside the shim (simd_max's reduction, counted by the runtime) stays
// free.
#pragma once
#pragma clang system_header

namespace detail {
// Apply f element-wise (vectors) or directly (scalars).
template <class F, class T, class... Rest> inline T map(F f, T a, Rest... rest) {
  if constexpr (mslsim::is_vector_v<T>) {
    T r;
    for (int i = 0; i < mslsim::vector_traits<T>::size; i++) r[i] = f(a[i], rest[i]...);
    return r;
  } else {
    return f(a, rest...);
  }
}
}  // namespace detail

// Exact functions: evaluated in fp32 and rounded to the argument type.
#define MSLSIM_UNARY(name, expr)                                               \
  template <class T> inline detail::if_float<T> name(T x) {                    \
    using E = mslsim::element_t<T>;                                            \
    return detail::map([](E v) { float f = (float)v; return (E)(expr); }, x); \
  }
MSLSIM_UNARY(fabs, __builtin_fabsf(f))
MSLSIM_UNARY(floor, __builtin_floorf(f))
MSLSIM_UNARY(ceil, __builtin_ceilf(f))
MSLSIM_UNARY(round, __builtin_roundf(f))
MSLSIM_UNARY(rint, __builtin_rintf(f))
MSLSIM_UNARY(trunc, __builtin_truncf(f))
MSLSIM_UNARY(fract, f - __builtin_floorf(f))
MSLSIM_UNARY(saturate, f < 0.f ? 0.f : (f > 1.f ? 1.f : f))
#undef MSLSIM_UNARY

// abs of a floating-point value is fabs (Metal's: the sign bit cleared, abs(-0.0) = +0.0).
template <class T> inline T abs(T x) {
  if constexpr (detail::is_float<T>) return fabs(x);
  else return detail::map([](mslsim::element_t<T> v) { return v < 0 ? (mslsim::element_t<T>)-v : v; }, x);
}
template <class T> inline T max(T a, T b) { return detail::map([](auto x, auto y) { return x > y ? x : y; }, a, b); }
template <class T> inline T min(T a, T b) { return detail::map([](auto x, auto y) { return x < y ? x : y; }, a, b); }
template <class T, class = std::enable_if_t<mslsim::is_vector_v<T>>> inline T max(T a, mslsim::element_t<T> b) { return max(a, T(b)); }
template <class T, class = std::enable_if_t<mslsim::is_vector_v<T>>> inline T min(T a, mslsim::element_t<T> b) { return min(a, T(b)); }
template <class T> inline detail::if_float<T> fmax(T a, T b) { return max(a, b); }
template <class T> inline detail::if_float<T> fmin(T a, T b) { return min(a, b); }
template <class T> inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <class T> inline detail::if_float<T> mix(T x, T y, T a) { return x + (y - x) * a; }
template <class T> inline detail::if_float<T> sign(T x) {
  return detail::map([](auto v) { return v > 0 ? (decltype(v))1 : v < 0 ? (decltype(v))-1 : (decltype(v))0; }, x);
}
// One rounding, as a fused multiply-add: a double fma for half (exact: the product of two halves fits a double);
// fp32 fmaf for float; bfloat via fp32 (double rounding possible, documented).
template <class T> inline detail::if_float<T> fma(T a, T b, T c) {
  return detail::map([](auto x, auto y, auto z) {
    using E = decltype(x);
    if constexpr (std::is_same_v<E, half>) return (E)__builtin_fma((double)x, (double)y, (double)z);
    else return (E)__builtin_fmaf((float)x, (float)y, (float)z);
  }, a, b, c);
}
template <class T> inline detail::if_float<T> pow(T a, T b) {
  return detail::map([](auto x, auto y) { return (decltype(x))__builtin_powf((float)x, (float)y); }, a, b);
}
template <class T> inline detail::if_float<T> powr(T a, T b) { return pow(a, b); }
// Fast-math division is within 2.5 ulp; GPU numerics compile `/` with -freciprocal-math (a * (1 / b)).
template <class T> inline detail::if_float<T> divide(T a, T b) { return a / b; }
// precise::divide is correctly rounded in either twin (Metal: IEEE division even under fast math).
template <class T> inline detail::if_float<T> ieee_divide(T a, T b) {
#pragma float_control(precise, on)
  return a / b;
}

// The other fast:: and precise:: functions share the implementation above.
#define MSLSIM_FORWARD(ns, name) \
  namespace ns { template <class... A> inline auto name(A... a) { return metal::name(a...); } }
#define MSLSIM_FORWARD_ALL(ns)                                                                              \
  MSLSIM_FORWARD(ns, max) MSLSIM_FORWARD(ns, min) MSLSIM_FORWARD(ns, fmax) MSLSIM_FORWARD(ns, fmin)       \
  MSLSIM_FORWARD(ns, pow) MSLSIM_FORWARD(ns, powr) MSLSIM_FORWARD(ns, clamp)                               \
  MSLSIM_FORWARD(ns, saturate) MSLSIM_FORWARD(ns, fma)
MSLSIM_FORWARD_ALL(fast)
MSLSIM_FORWARD_ALL(precise)
namespace fast { template <class T> inline auto divide(T a, T b) { return metal::divide(a, b); } }
namespace precise { template <class T> inline auto divide(T a, T b) { return metal::ieee_divide(a, b); } }
#undef MSLSIM_FORWARD_ALL
#undef MSLSIM_FORWARD

// Apple's compiler intrinsics of these functions (shim.h has the others): scalars; the last argument says fast or
// precise math. fmax and fmin return the other argument when one is a NaN, as Metal's do.
#define MSLSIM_INTRINSIC_1(name) \
  template <class T, class... M> inline T __metal_##name(T x, M...) { return name(x); }
MSLSIM_INTRINSIC_1(fabs) MSLSIM_INTRINSIC_1(floor) MSLSIM_INTRINSIC_1(ceil) MSLSIM_INTRINSIC_1(trunc)
MSLSIM_INTRINSIC_1(round) MSLSIM_INTRINSIC_1(rint) MSLSIM_INTRINSIC_1(fract)
#undef MSLSIM_INTRINSIC_1
template <class T, class... M> inline T __metal_fmax(T x, T y, M...) { return (T)__builtin_fmaxf((float)x, (float)y); }
template <class T, class... M> inline T __metal_fmin(T x, T y, M...) { return (T)__builtin_fminf((float)x, (float)y); }
template <class T, class... M> inline T __metal_divide(T x, T y, M...) { return (T)((float)x / (float)y); }
template <class T, class... M> inline T __metal_fma(T x, T y, T z, M...) { return fma(x, y, z); }
template <class T, class... M> inline T __metal_fmax3(T x, T y, T z, M...) { return __metal_fmax(__metal_fmax(x, y), z); }
template <class T, class... M> inline T __metal_fmin3(T x, T y, T z, M...) { return __metal_fmin(__metal_fmin(x, y), z); }
template <class T, class... M> inline T __metal_fmedian3(T x, T y, T z, M...) {
  return __metal_fmax(__metal_fmin(x, y), __metal_fmin(__metal_fmax(x, y), z));
}
