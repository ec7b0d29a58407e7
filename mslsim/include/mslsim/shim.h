// mslsim shim: the subset of <metal_stdlib> our kernels use, as C++ for clang >= 19 on x86-64.
//
// A .metal file compiles unmodified against this header after mslsim's line-preserving prepass
// (mslsim/build.py), which rewrites only what the C++ grammar cannot express with macros:
// kernel-scope `threadgroup` variables, `[[function_constant(n)]]` declarations, `[[threadgroup(n)]]`
// arguments, the `[[buffer(n)]]` of `constant` kernel parameters (so the runtime knows their address space) and
// the attributes on MLX-style explicit instantiations. Everything else is here:
//  * types: half (_Float16, every operation rounded: -ffloat16-excess-precision=none), bfloat (__bf16,
//    likewise), vectors as clang ext_vector_type (swizzles, 3-vectors padded to 4 as in MSL), packed_*;
//  * kernel parameter attributes ([[buffer(n)]], [[thread_position_in_grid]], ...) become default
//    arguments that fetch the value from the runtime for the calling GPU thread;
//  * metal:: / fast:: / precise:: math, barriers, SIMD-group functions, simdgroup_matrix 8x8 with the
//    per-lane element ownership of Apple GPUs, atomics.
// Only what MSL has is provided: code that compiles here but not on Apple's compiler is a bug.
#pragma once
#pragma clang system_header   // silences "user-defined literal suffixes not starting with '_' are reserved"
#if !defined(__clang__) || __clang_major__ < 19
#error "mslsim needs clang >= 19 (x86 _Float16 and __bf16 arithmetic)"
#endif
#include <limits>
#include <type_traits>

#include "mslsim/runtime.h"

#define __MSLSIM__ 1
#define __METAL_VERSION__ 400   // kernel-builder compiles with -std=metal4.0
#define __HAVE_BFLOAT__ 1       // bfloat is a type (Metal 3.1+)
#define METAL_FUNC inline __attribute__((always_inline))

// ============================================================================ scalar and vector types
typedef _Float16 half;
typedef __bf16 bfloat;
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;

namespace metal {
template <class T, int N>
using vec = T __attribute__((ext_vector_type(N)));
}
namespace mslsim {
template <class T> struct vector_traits { using element = T; static constexpr int size = 1; static constexpr bool is_vector = false; };
template <class T, int N> struct vector_traits<metal::vec<T, N>> { using element = T; static constexpr int size = N; static constexpr bool is_vector = true; };
template <class T> constexpr bool is_vector_v = vector_traits<T>::is_vector;
template <class T> using element_t = typename vector_traits<T>::element;

// T without its Metal address space (the static pass maps address spaces to clang's; see the end).
template <class T> struct without_address_space { using type = T; };
template <class T> struct without_address_space<__attribute__((address_space(1))) T> { using type = T; };
template <class T> struct without_address_space<__attribute__((address_space(2))) T> { using type = T; };
template <class T> struct without_address_space<__attribute__((address_space(3))) T> { using type = T; };
template <class P, class T>
constexpr bool is_element_of = std::is_same_v<typename without_address_space<std::remove_cv_t<P>>::type, T>;

#include "mslsim/vector_constructors.h"   // float4(...) and friends; ir_mix counts their conversions
// packed_T3 and friends: tightly packed, element-aligned, convertible to and from the vector type.
template <class T, int N> struct packed_vec {
  T v[N];
  packed_vec() = default;
  packed_vec(metal::vec<T, N> x) { for (int i = 0; i < N; i++) v[i] = x[i]; }
  operator metal::vec<T, N>() const { metal::vec<T, N> r; for (int i = 0; i < N; i++) r[i] = v[i]; return r; }
  T& operator[](int i) { return v[i]; }
  const T& operator[](int i) const { return v[i]; }
};
}  // namespace mslsim

#define MSLSIM_VECTOR_TYPES(T)                                                                     \
  typedef metal::vec<T, 2> T##2; typedef metal::vec<T, 3> T##3; typedef metal::vec<T, 4> T##4; \
  typedef mslsim::packed_vec<T, 2> packed_##T##2; typedef mslsim::packed_vec<T, 3> packed_##T##3;   \
  typedef mslsim::packed_vec<T, 4> packed_##T##4;
MSLSIM_VECTOR_TYPES(float)
MSLSIM_VECTOR_TYPES(half)
MSLSIM_VECTOR_TYPES(bfloat)
MSLSIM_VECTOR_TYPES(int)
MSLSIM_VECTOR_TYPES(uint)
MSLSIM_VECTOR_TYPES(short)
MSLSIM_VECTOR_TYPES(ushort)
MSLSIM_VECTOR_TYPES(char)
MSLSIM_VECTOR_TYPES(uchar)
MSLSIM_VECTOR_TYPES(long)
MSLSIM_VECTOR_TYPES(ulong)
typedef metal::vec<bool, 2> bool2;
typedef metal::vec<bool, 3> bool3;
typedef metal::vec<bool, 4> bool4;
#undef MSLSIM_VECTOR_TYPES

constexpr half operator""h(long double v) { return (half)v; }
constexpr half operator""h(unsigned long long v) { return (half)v; }

// ============================================================================ constants
#define INFINITY __builtin_inff()
#define NAN __builtin_nanf("")
#define HUGE_VALF __builtin_huge_valf()
#define MAXFLOAT 0x1.fffffep+127f
#define FLT_MAX 0x1.fffffep+127f
#define FLT_MIN 0x1p-126f
#define FLT_EPSILON 0x1p-23f
#define HALF_MAX ((half)65504.0f)
#define HALF_MIN ((half)0x1p-14f)
#define M_E_F 2.71828182845904523536f
#define M_LOG2E_F 1.44269504088896340736f
#define M_LN2_F 0.69314718055994530942f
#define M_LN10_F 2.30258509299404568402f
#define M_PI_F 3.14159265358979323846f
#define M_SQRT2_F 1.41421356237309504880f
#define M_SQRT1_2_F 0.70710678118654752440f

// ============================================================================ metal:: functions
namespace metal {
// <metal_type_traits>: the same traits as C++'s, in namespace metal.
using std::conditional; using std::conditional_t; using std::enable_if; using std::enable_if_t; using std::false_type;
using std::integral_constant; using std::is_arithmetic; using std::is_arithmetic_v; using std::is_convertible;
using std::is_convertible_v; using std::is_floating_point; using std::is_floating_point_v; using std::is_integral;
using std::is_integral_v; using std::is_same; using std::is_same_v; using std::is_signed; using std::is_signed_v;
using std::is_unsigned; using std::is_unsigned_v; using std::make_signed; using std::make_signed_t;
using std::make_unsigned; using std::make_unsigned_t; using std::remove_cv; using std::remove_cv_t;
using std::remove_reference; using std::remove_reference_t; using std::true_type; using std::decay; using std::decay_t;
using std::bool_constant; using std::is_pointer; using std::is_pointer_v; using std::remove_pointer;
using std::remove_pointer_t; using std::remove_const; using std::remove_const_t; using std::is_const; using std::is_const_v;
using std::is_void; using std::is_void_v;
template <class T> struct remove_addrspace { using type = T; };   // one address space here
template <class T> using remove_addrspace_t = typename remove_addrspace<T>::type;
enum class mem_flags : int { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4, mem_threadgroup_imageblock = 8 };
constexpr mem_flags operator|(mem_flags a, mem_flags b) { return (mem_flags)((int)a | (int)b); }
enum memory_order { memory_order_relaxed = 0 };

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
template <class E> constexpr bool is_float_element = std::is_same_v<E, float> || std::is_same_v<E, half> || std::is_same_v<E, bfloat>;
template <class T> constexpr bool is_float = is_float_element<mslsim::element_t<T>>;
template <class T> using if_float = std::enable_if_t<is_float<T>, T>;
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

namespace detail {
// Fast-math error model of the GPU-numerics mode: the fp32 libm result moved by the full error bound Apple
// documents for fast math, in a direction hashed from the argument (deterministic, and not one uniform bias
// that a normalisation such as softmax would cancel). `bound` is in ulps of the result, or absolute.
inline float ulp_of(float r) {
  float a = __builtin_fabsf(r);
  return __builtin_nextafterf(a, __builtin_inff()) - a;
}
inline float fast_math(float arg, float exact, float absolute_error) {
  if (!__builtin_isfinite(exact) || exact == 0.0f) return exact;
  uint32_t h = __builtin_bit_cast(uint32_t, arg) * 0x9E3779B1u;
  h ^= h >> 16;
  return (h & 1) ? exact + absolute_error : exact - absolute_error;
}
}  // namespace detail
// Transcendentals: precise:: is libm-accurate; metal:: and fast:: are fast math (Metal's default), which is
// libm-accurate too unless the kernel runs with GPU numerics. Bounds (fast math, fp32), as modelled:
// exp/exp2/exp10 3 + floor(|2x|) ulp; log/log2/log10 2^-21 absolute on [0.5, 2], else 3 ulp; rsqrt 2 ulp;
// sqrt 3 ulp; tanh 5 ulp; sin/cos 2^-11 absolute.
#ifdef MSLSIM_GPU_NUMERICS
#define MSLSIM_FAST_ERROR(bound) detail::fast_math(f, r, bound)
#else
#define MSLSIM_FAST_ERROR(bound) r
#endif
#define MSLSIM_TRANSCENDENTAL(name, expr, bound)                                                           \
  namespace precise {                                                                                      \
  template <class T> inline detail::if_float<T> name(T x) {                                                \
    using E = mslsim::element_t<T>;                                                                        \
    return detail::map([](E v) { float f = (float)v; return (E)(expr); }, x);                             \
  }                                                                                                        \
  }                                                                                                        \
  template <class T> inline detail::if_float<T> name(T x) {                                                \
    using E = mslsim::element_t<T>;                                                                        \
    return detail::map([](E v) { float f = (float)v, r = (expr); (void)f; return (E)(MSLSIM_FAST_ERROR(bound)); }, x); \
  }                                                                                                        \
  namespace fast { template <class T> inline detail::if_float<T> name(T x) { return metal::name(x); } }
#define MSLSIM_ULPS(n) ((n) * detail::ulp_of(r))
#define MSLSIM_EXP_ULPS MSLSIM_ULPS(3.0f + __builtin_floorf(__builtin_fabsf(2.0f * f)))
#define MSLSIM_LOG_ERROR (f >= 0.5f && f <= 2.0f ? 0x1p-21f : MSLSIM_ULPS(3.0f))
MSLSIM_TRANSCENDENTAL(exp, __builtin_expf(f), MSLSIM_EXP_ULPS)
MSLSIM_TRANSCENDENTAL(exp2, __builtin_exp2f(f), MSLSIM_EXP_ULPS)
MSLSIM_TRANSCENDENTAL(exp10, __builtin_exp10f(f), MSLSIM_EXP_ULPS)
MSLSIM_TRANSCENDENTAL(log, __builtin_logf(f), MSLSIM_LOG_ERROR)
MSLSIM_TRANSCENDENTAL(log2, __builtin_log2f(f), MSLSIM_LOG_ERROR)
MSLSIM_TRANSCENDENTAL(log10, __builtin_log10f(f), MSLSIM_LOG_ERROR)
MSLSIM_TRANSCENDENTAL(sqrt, __builtin_sqrtf(f), MSLSIM_ULPS(3.0f))
MSLSIM_TRANSCENDENTAL(rsqrt, 1.0f / __builtin_sqrtf(f), MSLSIM_ULPS(2.0f))
MSLSIM_TRANSCENDENTAL(tanh, __builtin_tanhf(f), MSLSIM_ULPS(5.0f))
MSLSIM_TRANSCENDENTAL(sin, __builtin_sinf(f), 0x1p-11f)
MSLSIM_TRANSCENDENTAL(cos, __builtin_cosf(f), 0x1p-11f)
MSLSIM_TRANSCENDENTAL(tan, __builtin_tanf(f), MSLSIM_ULPS(5.0f))
#undef MSLSIM_LOG_ERROR
#undef MSLSIM_EXP_ULPS
#undef MSLSIM_ULPS
#undef MSLSIM_TRANSCENDENTAL
#undef MSLSIM_FAST_ERROR

template <class T> inline T abs(T x) {
  return detail::map([](mslsim::element_t<T> v) { return v < 0 ? (mslsim::element_t<T>)-v : v; }, x);
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
// One rounding, as a fused multiply-add: exact in double for half; fp32 fmaf for float; bfloat via fp32
// (double rounding possible, documented).
template <class T> inline detail::if_float<T> fma(T a, T b, T c) {
  return detail::map([](auto x, auto y, auto z) {
    using E = decltype(x);
    if constexpr (std::is_same_v<E, half>) return (E)((double)x * (double)y + (double)z);
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
template <class T> inline detail::if_float<T> precise_divide(T a, T b) { return a / b; }

// select(a, b, c): c ? b : a, element-wise for vectors.
template <class T, class C> inline T select(T a, T b, C c) {
  if constexpr (mslsim::is_vector_v<T>) {
    T r;
    for (int i = 0; i < mslsim::vector_traits<T>::size; i++) {
      bool ci;
      if constexpr (mslsim::is_vector_v<C>) ci = c[i] != 0;
      else ci = (bool)c;
      r[i] = ci ? b[i] : a[i];
    }
    return r;
  } else {
    return c ? b : a;
  }
}
template <class T> inline mslsim::element_t<T> dot(T a, T b) {
  mslsim::element_t<T> s = 0;
  for (int i = 0; i < mslsim::vector_traits<T>::size; i++) s += a[i] * b[i];
  return s;
}
template <class T> inline mslsim::element_t<T> length(T a) { return (mslsim::element_t<T>)__builtin_sqrtf((float)dot(a, a)); }
template <class T> inline bool all(T m) {
  for (int i = 0; i < mslsim::vector_traits<T>::size; i++)
    if (!m[i]) return false;
  return true;
}
template <class T> inline bool any(T m) {
  for (int i = 0; i < mslsim::vector_traits<T>::size; i++)
    if (m[i]) return true;
  return false;
}
template <class T> inline bool isnan(T x) { return x != x; }
template <class T> inline bool isinf(T x) { return x == (T)__builtin_inff() || x == (T)-__builtin_inff(); }
template <class T> inline bool isfinite(T x) { return !isnan(x) && !isinf(x); }
template <class T, class U> inline T as_type(U u) {
  static_assert(sizeof(T) == sizeof(U), "as_type: source and destination must have the same size");
  return __builtin_bit_cast(T, u);
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

// os_log (<metal_logging>): accepted, messages dropped (the simulator has no log stream).
struct os_log {
  constexpr os_log(const char*, const char*) {}
  template <class... A> void log_debug(const char*, A...) const {}
  template <class... A> void log_info(const char*, A...) const {}
  template <class... A> void log_error(const char*, A...) const {}
  template <class... A> void log_fault(const char*, A...) const {}
};

// numeric_limits: C++'s for the integer and fp32 types; half and bfloat spelled out.
template <class T> struct numeric_limits : std::numeric_limits<T> {};
#define MSLSIM_LIMITS(T, bits_min, bits_max, bits_epsilon)                                       \
  template <> struct numeric_limits<T> {                                                          \
    static constexpr bool is_specialized = true, is_signed = true, is_integer = false;             \
    static constexpr T min() { return __builtin_bit_cast(T, (unsigned short)bits_min); }          \
    static constexpr T max() { return __builtin_bit_cast(T, (unsigned short)bits_max); }          \
    static constexpr T lowest() { return -max(); }                                                \
    static constexpr T epsilon() { return __builtin_bit_cast(T, (unsigned short)bits_epsilon); }  \
    static constexpr T infinity() { return (T)__builtin_inff(); }                                 \
    static constexpr T quiet_NaN() { return (T)__builtin_nanf(""); }                              \
  };
MSLSIM_LIMITS(half, 0x0400, 0x7BFF, 0x1400)
MSLSIM_LIMITS(bfloat, 0x0080, 0x7F7F, 0x3C00)
#undef MSLSIM_LIMITS

// ============================================================================ synchronisation
// Functions that reach the runtime's barriers and SIMD-group exchange are always inlined: the runtime
// identifies a call by its file:line and the out-of-line calls above it (see call_path in runtime.cpp).
#define MSLSIM_SYNC inline __attribute__((always_inline))
// The GPU twins (-DMSLSIM_GPU_NUMERICS) also profile: they count the operations the shim implements; the exact
// twins compile nothing.
#ifdef MSLSIM_GPU_NUMERICS
#define MSLSIM_PROFILE_COUNT(counter) mslsim::rt::profile_count(MSLSIM_PROFILE_##counter)
#define MSLSIM_MATRIX_ACCESS(kind) mslsim::rt::profile_matrix_access(kind)
#else
#define MSLSIM_PROFILE_COUNT(counter) ((void)0)
#define MSLSIM_MATRIX_ACCESS(kind) ((void)0)
#endif
#define MSLSIM_SITE const char* file = __builtin_FILE(), unsigned line = __builtin_LINE()
// mulhi (MSL integer functions): the high half of the full product, one 32-bit multiply in the profile.
template <class T> inline T mulhi(T a, T b) {
  MSLSIM_PROFILE_COUNT(int32_mul);
  return detail::map([](auto x, auto y) {
    using E = decltype(x);
    static_assert(std::is_integral_v<E> && sizeof(E) <= 4, "mulhi: 8- to 32-bit integers");
    using Wide = std::conditional_t<std::is_signed_v<E>, int64_t, uint64_t>;
    return (E)(((Wide)x * (Wide)y) >> (8 * sizeof(E)));
  }, a, b);
}
MSLSIM_SYNC void threadgroup_barrier(mem_flags flags, MSLSIM_SITE) {
  MSLSIM_PROFILE_COUNT(threadgroup_barrier);
  mslsim::rt::threadgroup_barrier((int)flags, file, line);
}
MSLSIM_SYNC void simdgroup_barrier(mem_flags flags, MSLSIM_SITE) {
  MSLSIM_PROFILE_COUNT(simdgroup_barrier);
  mslsim::rt::simdgroup_barrier((int)flags, file, line);
}

// ============================================================================ SIMD-group functions
// Each is a collective over the lanes that execute the call together (Metal's active lanes): every such
// lane deposits its value, and once every live lane of the simdgroup waits somewhere the runtime releases
// them with the set of lanes that made the same call. Reading a lane outside that set (it returned, or it
// is in another branch) is undefined on the GPU and an error here.
namespace detail {
using Exchange = mslsim::rt::SimdExchange;
template <class T> inline T lane_value(const Exchange* x, int lane) {
  T v;
  __builtin_memcpy(&v, x->slot[lane], sizeof(T));
  return v;
}
template <class T> MSLSIM_SYNC Exchange* exchange(const T& v, const char* file, unsigned line) {
  static_assert(sizeof(T) <= sizeof(Exchange::slot[0]), "SIMD-group function on a value larger than 32 bytes");
  MSLSIM_PROFILE_COUNT(simd_function);
  return mslsim::rt::simd_exchange(&v, sizeof(T), file, line);
}
inline int my_lane() { return (int)mslsim::rt::current->lane; }
inline uint32_t active(const Exchange* x) { return x->participants[my_lane()]; }
inline bool participates(const Exchange* x, int lane) { return active(x) >> lane & 1; }
// Pairwise tree over the active lanes in lane order; computed once per set of lanes, shared by them.
template <class T, class F> inline T reduce(Exchange* x, F f) {
  const uint32_t lanes = active(x), leader = __builtin_ctz(lanes);
  if (x->has_result >> leader & 1) {
    T r;
    __builtin_memcpy(&r, x->result[leader], sizeof(T));
    return r;
  }
  T v[32];
  int n = 0;
  for (int i = 0; i < 32; i++)
    if (lanes >> i & 1) v[n++] = lane_value<T>(x, i);
  for (int width = 1; width < n; width *= 2)
    for (int i = 0; i + width < n; i += 2 * width) v[i] = f(v[i], v[i + width]);
  __builtin_memcpy(x->result[leader], &v[0], sizeof(T));
  x->has_result |= 1u << leader;
  return v[0];
}
template <class T, class F> inline T scan(const Exchange* x, bool inclusive, T identity, F f) {
  T s = identity;
  for (int i = 0; i < my_lane() + (inclusive ? 1 : 0); i++)
    if (participates(x, i)) s = f(s, lane_value<T>(x, i));
  return s;
}
// A source outside the simdgroup (shuffle_down/up past its edge) keeps the lane's own value, as Metal
// defines; a source lane that is not active is an error.
template <class T> inline T from_lane(const Exchange* x, int source, T self, const char* what) {
  if (source < 0 || source >= 32) return self;
  if (!participates(x, source))
    mslsim::rt::fail("%s reads lane %d, which is not active (it returned, or runs another branch of divergent code): "
                     "undefined on the GPU", what, source);
  return lane_value<T>(x, source);
}
}  // namespace detail

#define MSLSIM_REDUCTION(name, op) \
  template <class T> MSLSIM_SYNC T name(T x, MSLSIM_SITE) { return detail::reduce<T>(detail::exchange(x, file, line), [](T a, T b) { return op; }); }
MSLSIM_REDUCTION(simd_sum, a + b)
MSLSIM_REDUCTION(simd_product, a * b)
MSLSIM_REDUCTION(simd_max, max(a, b))
MSLSIM_REDUCTION(simd_min, min(a, b))
MSLSIM_REDUCTION(simd_and, a & b)
MSLSIM_REDUCTION(simd_or, a | b)
MSLSIM_REDUCTION(simd_xor, a ^ b)
#undef MSLSIM_REDUCTION
template <class T> MSLSIM_SYNC T simd_prefix_inclusive_sum(T x, MSLSIM_SITE) { return detail::scan(detail::exchange(x, file, line), true, T(0), [](T a, T b) { return a + b; }); }
template <class T> MSLSIM_SYNC T simd_prefix_exclusive_sum(T x, MSLSIM_SITE) { return detail::scan(detail::exchange(x, file, line), false, T(0), [](T a, T b) { return a + b; }); }
template <class T> MSLSIM_SYNC T simd_prefix_inclusive_product(T x, MSLSIM_SITE) { return detail::scan(detail::exchange(x, file, line), true, T(1), [](T a, T b) { return a * b; }); }
template <class T> MSLSIM_SYNC T simd_prefix_exclusive_product(T x, MSLSIM_SITE) { return detail::scan(detail::exchange(x, file, line), false, T(1), [](T a, T b) { return a * b; }); }
template <class T> MSLSIM_SYNC T simd_shuffle(T x, ushort lane, MSLSIM_SITE) { return detail::from_lane(detail::exchange(x, file, line), (int)lane, x, "simd_shuffle"); }
template <class T> MSLSIM_SYNC T simd_broadcast(T x, ushort lane, MSLSIM_SITE) { return detail::from_lane(detail::exchange(x, file, line), (int)lane, x, "simd_broadcast"); }
template <class T> MSLSIM_SYNC T simd_shuffle_xor(T x, ushort mask, MSLSIM_SITE) { return detail::from_lane(detail::exchange(x, file, line), detail::my_lane() ^ mask, x, "simd_shuffle_xor"); }
template <class T> MSLSIM_SYNC T simd_shuffle_down(T x, ushort delta, MSLSIM_SITE) { return detail::from_lane(detail::exchange(x, file, line), detail::my_lane() + delta, x, "simd_shuffle_down"); }
template <class T> MSLSIM_SYNC T simd_shuffle_up(T x, ushort delta, MSLSIM_SITE) { return detail::from_lane(detail::exchange(x, file, line), detail::my_lane() - delta, x, "simd_shuffle_up"); }
// Rotations wrap around the 32 lanes.
template <class T> MSLSIM_SYNC T simd_shuffle_rotate_down(T x, ushort delta, MSLSIM_SITE) { return detail::from_lane(detail::exchange(x, file, line), (detail::my_lane() + delta) & 31, x, "simd_shuffle_rotate_down"); }
template <class T> MSLSIM_SYNC T simd_shuffle_rotate_up(T x, ushort delta, MSLSIM_SITE) { return detail::from_lane(detail::exchange(x, file, line), (detail::my_lane() - delta) & 31, x, "simd_shuffle_rotate_up"); }
// Lanes fall into segments of `modulo` lanes; a source past the segment's edge reads `fill` of the lane that
// far into the next (down) or previous (up) segment.
template <class T> MSLSIM_SYNC T simd_shuffle_and_fill_down(T data, T fill, ushort delta, ushort modulo = 32, MSLSIM_SITE) {
  struct Pair { T data, fill; };
  const detail::Exchange* e = detail::exchange(Pair{data, fill}, file, line);
  const int base = detail::my_lane() / modulo * modulo, source = detail::my_lane() % modulo + delta;
  return source < modulo ? detail::from_lane<Pair>(e, base + source, {}, "simd_shuffle_and_fill_down").data
                         : detail::from_lane<Pair>(e, base + source - modulo, {}, "simd_shuffle_and_fill_down").fill;
}
template <class T> MSLSIM_SYNC T simd_shuffle_and_fill_up(T data, T fill, ushort delta, ushort modulo = 32, MSLSIM_SITE) {
  struct Pair { T data, fill; };
  const detail::Exchange* e = detail::exchange(Pair{data, fill}, file, line);
  const int base = detail::my_lane() / modulo * modulo, source = detail::my_lane() % modulo - delta;
  return source >= 0 ? detail::from_lane<Pair>(e, base + source, {}, "simd_shuffle_and_fill_up").data
                     : detail::from_lane<Pair>(e, base + source + modulo, {}, "simd_shuffle_and_fill_up").fill;
}
template <class T> MSLSIM_SYNC T simd_broadcast_first(T x, MSLSIM_SITE) {
  const detail::Exchange* e = detail::exchange(x, file, line);
  return detail::lane_value<T>(e, __builtin_ctz(detail::active(e)));
}
MSLSIM_SYNC bool simd_all(bool x, MSLSIM_SITE) { return detail::reduce<bool>(detail::exchange(x, file, line), [](bool a, bool b) { return a && b; }); }
MSLSIM_SYNC bool simd_any(bool x, MSLSIM_SITE) { return detail::reduce<bool>(detail::exchange(x, file, line), [](bool a, bool b) { return a || b; }); }
MSLSIM_SYNC bool simd_is_first(MSLSIM_SITE) {
  const detail::Exchange* e = detail::exchange(true, file, line);
  return __builtin_ctz(detail::active(e)) == detail::my_lane();
}
// simd_ballot: one bit per active lane whose predicate holds.
struct simd_vote {
  typedef ulong vote_t;
  vote_t v;
  explicit constexpr simd_vote(vote_t value = 0) : v(value) {}
  explicit constexpr operator vote_t() const { return v; }
  constexpr bool all() const { return v == ~0ul; }
  constexpr bool any() const { return v != 0; }
};
MSLSIM_SYNC simd_vote simd_ballot(bool x, MSLSIM_SITE) {
  const detail::Exchange* e = detail::exchange(x, file, line);
  ulong bits = 0;
  for (int i = 0; i < 32; i++)
    if (detail::participates(e, i) && detail::lane_value<bool>(e, i)) bits |= 1ul << i;
  return simd_vote(bits);
}

// ============================================================================ simdgroup_matrix
// Lane l owns row (q & 4) + (l / 2) % 4 and columns (q & 2) * 2 + (l % 2) * 2 + {0, 1}, q = l / 4: the
// fragment layout of Apple GPUs that MLX's MMAFrag relies on. load/store touch only the lane's own
// elements; multiply_accumulate gathers the operands with one collective and accumulates each output
// element as an fp32 fused multiply-add chain over k = 0..7, rounded once to the destination type.
template <class T, int Cols, int Rows> struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "mslsim implements 8x8 simdgroup matrices only");
  metal::vec<T, 2> elements;
  simdgroup_matrix() = default;
  explicit simdgroup_matrix(T diagonal) {
    int r, c;
    owned(detail::my_lane(), r, c);
    elements[0] = r == c ? diagonal : (T)0;
    elements[1] = r == c + 1 ? diagonal : (T)0;
  }
  metal::vec<T, 2>& thread_elements() { return elements; }
  const metal::vec<T, 2>& thread_elements() const { return elements; }
  static void owned(int lane, int& row, int& col) {
    int q = lane / 4;
    row = (q & 4) + (lane / 2) % 4;
    col = (q & 2) * 2 + (lane % 2) * 2;
  }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

template <class T, int C, int R> inline simdgroup_matrix<T, C, R> make_filled_simdgroup_matrix(T value) {
  simdgroup_matrix<T, C, R> m;
  m.elements = value;
  return m;
}
// matrix_origin is (column, row); elements_per_row is the leading dimension.
template <class T, class P>
inline void simdgroup_load(simdgroup_matrix<T, 8, 8>& d, const P* src, ulong elements_per_row = 8,
                           ulong2 matrix_origin = 0, bool transpose_matrix = false) {
  static_assert(mslsim::is_element_of<P, T>, "simdgroup_load: source element type must be the matrix type");
  int r, c;
  simdgroup_matrix<T, 8, 8>::owned(detail::my_lane(), r, c);
  MSLSIM_MATRIX_ACCESS(1);
  for (int k = 0; k < 2; k++) {
    long row = r + (long)matrix_origin.y, col = c + k + (long)matrix_origin.x;
    d.elements[k] = transpose_matrix ? src[col * (long)elements_per_row + row] : src[row * (long)elements_per_row + col];
  }
  MSLSIM_MATRIX_ACCESS(0);
}
template <class T, class P>
inline void simdgroup_store(const simdgroup_matrix<T, 8, 8>& a, P* dst, ulong elements_per_row = 8,
                            ulong2 matrix_origin = 0, bool transpose_matrix = false) {
  static_assert(mslsim::is_element_of<P, T>, "simdgroup_store: destination element type must be the matrix type");
  int r, c;
  simdgroup_matrix<T, 8, 8>::owned(detail::my_lane(), r, c);
  MSLSIM_MATRIX_ACCESS(2);
  for (int k = 0; k < 2; k++) {
    long row = r + (long)matrix_origin.y, col = c + k + (long)matrix_origin.x;
    (transpose_matrix ? dst[col * (long)elements_per_row + row] : dst[row * (long)elements_per_row + col]) = a.elements[k];
  }
  MSLSIM_MATRIX_ACCESS(0);
}
template <class TD, class TA, class TB, class TC>
MSLSIM_SYNC void simdgroup_multiply_accumulate(simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                                          const simdgroup_matrix<TB, 8, 8>& b, const simdgroup_matrix<TC, 8, 8>& c,
                                          MSLSIM_SITE) {
  struct Operands { float a0, a1, b0, b1; } mine = {(float)a.elements[0], (float)a.elements[1], (float)b.elements[0], (float)b.elements[1]};
  MSLSIM_PROFILE_COUNT(matrix_multiply_accumulate);   // one collective, not a SIMD-group function
  const detail::Exchange* x = mslsim::rt::simd_exchange(&mine, sizeof mine, file, line);
  if (detail::active(x) != ~0u)
    mslsim::rt::fail("simdgroup_multiply_accumulate with active lanes 0x%08x: all 32 lanes of the simdgroup must "
                     "execute it (a lane returned, or runs another branch of divergent code)", detail::active(x));
  float A[8][8], B[8][8];
  for (int lane = 0; lane < 32; lane++) {
    int r, col;
    simdgroup_matrix<TA, 8, 8>::owned(lane, r, col);
    Operands v = detail::lane_value<Operands>(x, lane);
    A[r][col] = v.a0;
    A[r][col + 1] = v.a1;
    B[r][col] = v.b0;
    B[r][col + 1] = v.b1;
  }
  int r, col;
  simdgroup_matrix<TD, 8, 8>::owned(detail::my_lane(), r, col);
  metal::vec<TD, 2> out;
  for (int k = 0; k < 2; k++) {
    float acc = (float)c.elements[k];
    for (int i = 0; i < 8; i++) acc = __builtin_fmaf(A[r][i], B[i][col + k], acc);
    out[k] = (TD)acc;
  }
  d.elements = out;
}
template <class TD, class TA, class TB>
MSLSIM_SYNC void simdgroup_multiply(simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                               const simdgroup_matrix<TB, 8, 8>& b, MSLSIM_SITE) {
  simdgroup_multiply_accumulate(d, a, b, make_filled_simdgroup_matrix<TD, 8, 8>((TD)0), file, line);
}
// ============================================================================ Apple's compiler intrinsics
// What <metal_stdlib> is built on. Third-party headers call some directly (MLX's bf16_math.h defines the
// bfloat overloads of the math and SIMD functions with them); they map onto the functions above. The last
// argument of a math intrinsic says fast or precise math.
enum class mslsim_math_mode { fast, maybe_fast, precise };
#define __METAL_FAST_MATH__ metal::mslsim_math_mode::fast
#define __METAL_MAYBE_FAST_MATH__ metal::mslsim_math_mode::maybe_fast
#define __METAL_PRECISE_MATH__ metal::mslsim_math_mode::precise
#define MSLSIM_INTRINSIC_MODAL(name)                                                                        \
  template <class T> inline T __metal_##name(T x, mslsim_math_mode mode) {                                  \
    return mode == mslsim_math_mode::precise ? precise::name(x) : name(x);                                   \
  }
#define MSLSIM_INTRINSIC_1(name, expr) \
  template <class T, class... M> inline T __metal_##name(T x, M...) { float f = (float)x; return (T)(expr); }
#define MSLSIM_INTRINSIC_2(name, expr) \
  template <class T, class... M> inline T __metal_##name(T x, T y, M...) { float f = (float)x, g = (float)y; return (T)(expr); }
MSLSIM_INTRINSIC_MODAL(exp) MSLSIM_INTRINSIC_MODAL(exp2) MSLSIM_INTRINSIC_MODAL(exp10) MSLSIM_INTRINSIC_MODAL(log)
MSLSIM_INTRINSIC_MODAL(log2) MSLSIM_INTRINSIC_MODAL(log10) MSLSIM_INTRINSIC_MODAL(sqrt) MSLSIM_INTRINSIC_MODAL(rsqrt)
MSLSIM_INTRINSIC_MODAL(tanh) MSLSIM_INTRINSIC_MODAL(sin) MSLSIM_INTRINSIC_MODAL(cos) MSLSIM_INTRINSIC_MODAL(tan)
MSLSIM_INTRINSIC_1(fabs, __builtin_fabsf(f)) MSLSIM_INTRINSIC_1(floor, __builtin_floorf(f))
MSLSIM_INTRINSIC_1(ceil, __builtin_ceilf(f)) MSLSIM_INTRINSIC_1(trunc, __builtin_truncf(f))
MSLSIM_INTRINSIC_1(round, __builtin_roundf(f)) MSLSIM_INTRINSIC_1(rint, __builtin_rintf(f))
MSLSIM_INTRINSIC_1(fract, f - __builtin_floorf(f)) MSLSIM_INTRINSIC_1(acos, __builtin_acosf(f))
MSLSIM_INTRINSIC_1(acosh, __builtin_acoshf(f)) MSLSIM_INTRINSIC_1(asin, __builtin_asinf(f))
MSLSIM_INTRINSIC_1(asinh, __builtin_asinhf(f)) MSLSIM_INTRINSIC_1(atan, __builtin_atanf(f))
MSLSIM_INTRINSIC_1(atanh, __builtin_atanhf(f)) MSLSIM_INTRINSIC_1(cosh, __builtin_coshf(f))
MSLSIM_INTRINSIC_1(sinh, __builtin_sinhf(f)) MSLSIM_INTRINSIC_1(cospi, __builtin_cosf(M_PI_F * f))
MSLSIM_INTRINSIC_1(sinpi, __builtin_sinf(M_PI_F * f)) MSLSIM_INTRINSIC_1(tanpi, __builtin_tanf(M_PI_F * f))
MSLSIM_INTRINSIC_2(atan2, __builtin_atan2f(f, g)) MSLSIM_INTRINSIC_2(fmax, __builtin_fmaxf(f, g))
MSLSIM_INTRINSIC_2(fmin, __builtin_fminf(f, g)) MSLSIM_INTRINSIC_2(fmod, __builtin_fmodf(f, g))
MSLSIM_INTRINSIC_2(pow, __builtin_powf(f, g)) MSLSIM_INTRINSIC_2(powr, __builtin_powf(f, g))
MSLSIM_INTRINSIC_2(divide, f / g) MSLSIM_INTRINSIC_2(nextafter, __builtin_nextafterf(f, g))
#undef MSLSIM_INTRINSIC_2
#undef MSLSIM_INTRINSIC_1
#undef MSLSIM_INTRINSIC_MODAL
template <class T, class... M> inline T __metal_fma(T x, T y, T z, M...) { return fma(x, y, z); }
template <class T, class... M> inline T __metal_fmax3(T x, T y, T z, M...) { return __metal_fmax(__metal_fmax(x, y), z); }
template <class T, class... M> inline T __metal_fmin3(T x, T y, T z, M...) { return __metal_fmin(__metal_fmin(x, y), z); }
template <class T, class... M> inline T __metal_fmedian3(T x, T y, T z, M...) {
  return __metal_fmax(__metal_fmin(x, y), __metal_fmin(__metal_fmax(x, y), z));
}
template <class T, class... M> inline T __metal_ldexp(T x, int k, M...) { return (T)__builtin_ldexpf((float)x, k); }
template <class T> inline T __metal_frexp(T x, int* exponent) { return (T)__builtin_frexpf((float)x, exponent); }
inline ushort __metal_get_simdgroup_size(ushort) { return MSLSIM_SIMD_WIDTH; }
inline ushort __metal_get_thread_index_in_simdgroup(ushort) { return (ushort)detail::my_lane(); }
#define MSLSIM_INTRINSIC_SIMD(name) \
  template <class T, class... A> MSLSIM_SYNC T __metal_##name(T x, A... a) { return name(x, a...); }
MSLSIM_INTRINSIC_SIMD(simd_sum) MSLSIM_INTRINSIC_SIMD(simd_product) MSLSIM_INTRINSIC_SIMD(simd_max)
MSLSIM_INTRINSIC_SIMD(simd_min) MSLSIM_INTRINSIC_SIMD(simd_prefix_inclusive_sum)
MSLSIM_INTRINSIC_SIMD(simd_prefix_exclusive_sum) MSLSIM_INTRINSIC_SIMD(simd_prefix_inclusive_product)
MSLSIM_INTRINSIC_SIMD(simd_prefix_exclusive_product) MSLSIM_INTRINSIC_SIMD(simd_broadcast)
MSLSIM_INTRINSIC_SIMD(simd_shuffle) MSLSIM_INTRINSIC_SIMD(simd_shuffle_down) MSLSIM_INTRINSIC_SIMD(simd_shuffle_up)
MSLSIM_INTRINSIC_SIMD(simd_shuffle_xor) MSLSIM_INTRINSIC_SIMD(simd_shuffle_rotate_down)
MSLSIM_INTRINSIC_SIMD(simd_shuffle_rotate_up) MSLSIM_INTRINSIC_SIMD(simd_shuffle_and_fill_down)
MSLSIM_INTRINSIC_SIMD(simd_shuffle_and_fill_up)
#undef MSLSIM_INTRINSIC_SIMD
// The intrinsic is untyped: a floating-point value is xor-ed as its bits.
template <class T> MSLSIM_SYNC T __metal_simd_xor(T x, MSLSIM_SITE) {
  if constexpr (std::is_floating_point_v<T> || sizeof(T) == 2) {
    using Bits = std::conditional_t<sizeof(T) == 2, ushort, uint>;
    return __builtin_bit_cast(T, simd_xor(__builtin_bit_cast(Bits, x), file, line));
  } else {
    return simd_xor(x, file, line);
  }
}
#undef MSLSIM_SITE
#undef MSLSIM_SYNC

// ============================================================================ atomics
// Implemented out of line and untraced: the runtime is told about each access (initialises threadgroup
// memory for the race checker, bounds-checks device memory).
template <class T> struct mslsim_atomic { T value; };
template <class T> using atomic = mslsim_atomic<T>;
typedef mslsim_atomic<int> atomic_int;
typedef mslsim_atomic<uint> atomic_uint;
typedef mslsim_atomic<float> atomic_float;
template <class A> using atomic_value_t = std::remove_cv_t<decltype(((A*)nullptr)->value)>;
#define MSLSIM_ATOMIC __attribute__((noinline, no_sanitize("coverage")))
template <class A, class F> MSLSIM_ATOMIC auto atomic_update(A* a, F f) {
  using T = atomic_value_t<A>;
  mslsim::rt::note_atomic((const void*)a, sizeof(T));
  T* p = (T*)&a->value;
  T old, next;
  __atomic_load(p, &old, __ATOMIC_RELAXED);   // the generic builtins: float atomics too
  do next = f(old);
  while (!__atomic_compare_exchange(p, &old, &next, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  return old;
}
// On failure *expected receives the current value (Metal, like C++); weak never fails spuriously here.
template <class A, class U> MSLSIM_ATOMIC bool atomic_compare_exchange_weak_explicit(A* a, atomic_value_t<A>* expected, U desired,
                                                                              memory_order, memory_order) {
  using T = atomic_value_t<A>;
  mslsim::rt::note_atomic((const void*)a, sizeof(T));
  T next = (T)desired;
  return __atomic_compare_exchange((T*)&a->value, expected, &next, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}
template <class A, class U> inline bool atomic_compare_exchange_strong_explicit(A* a, atomic_value_t<A>* expected, U desired,
                                                                         memory_order success, memory_order failure) {
  return atomic_compare_exchange_weak_explicit(a, expected, desired, success, failure);
}
template <class A, class U> inline auto atomic_fetch_add_explicit(A* a, U v, memory_order) { return atomic_update(a, [v](auto o) { return (decltype(o))(o + v); }); }
template <class A, class U> inline auto atomic_fetch_sub_explicit(A* a, U v, memory_order) { return atomic_update(a, [v](auto o) { return (decltype(o))(o - v); }); }
template <class A, class U> inline auto atomic_fetch_max_explicit(A* a, U v, memory_order) { return atomic_update(a, [v](auto o) { return o > (decltype(o))v ? o : (decltype(o))v; }); }
template <class A, class U> inline auto atomic_fetch_min_explicit(A* a, U v, memory_order) { return atomic_update(a, [v](auto o) { return o < (decltype(o))v ? o : (decltype(o))v; }); }
template <class A, class U> inline auto atomic_fetch_or_explicit(A* a, U v, memory_order) { return atomic_update(a, [v](auto o) { return (decltype(o))(o | v); }); }
template <class A, class U> inline auto atomic_fetch_and_explicit(A* a, U v, memory_order) { return atomic_update(a, [v](auto o) { return (decltype(o))(o & v); }); }
template <class A, class U> inline auto atomic_exchange_explicit(A* a, U v, memory_order) { return atomic_update(a, [v](auto o) { return (decltype(o))v; }); }
template <class A> inline auto atomic_load_explicit(A* a, memory_order) { return atomic_update(a, [](auto o) { return o; }); }
template <class A, class U> inline void atomic_store_explicit(A* a, U v, memory_order) { atomic_update(a, [v](auto o) { return (decltype(o))v; }); }
#undef MSLSIM_ATOMIC
}  // namespace metal

// ============================================================================ kernel arguments, constants
namespace mslsim {
struct Index { constexpr int operator[](int i) const { return i; } };
constexpr Index index{};
enum Builtin { TPITG, TIITG, TGPIG, TPIG, TPTG, TGPG, LANE, SGITG, SGPTG, TPSG, TPG };
template <class T> inline T builtin_value(rt::uint3_ u) {
  if constexpr (is_vector_v<T>) {
    T r = {};
    uint32_t a[3] = {u.x, u.y, u.z};
    for (int i = 0; i < vector_traits<T>::size && i < 3; i++) r[i] = (element_t<T>)a[i];
    return r;
  } else {
    return (T)u.x;
  }
}
// Metal accepts built-in attributes (positions, indices, counts) only as uint / ushort and their 2- and
// 3-vectors.
template <class T> constexpr bool is_builtin_type =
    std::is_same_v<T, uint> || std::is_same_v<T, ushort> || std::is_same_v<T, metal::vec<uint, 2>> ||
    std::is_same_v<T, metal::vec<uint, 3>> || std::is_same_v<T, metal::vec<ushort, 2>> || std::is_same_v<T, metal::vec<ushort, 3>>;
struct BuiltinArg {
  int which;
  template <class T> operator T() const {
    static_assert(is_builtin_type<T>, "a built-in attribute ([[thread_position_in_grid]], ...) must be declared as "
                                      "uint, ushort or one of their 2- and 3-vectors");
    const rt::ThreadContext* c = rt::current;
    rt::uint3_ u = {0, 0, 0};
    switch (which) {
      case TPITG: u = c->thread_position_in_threadgroup; break;
      case TIITG: u.x = c->thread_index_in_threadgroup; break;
      case TGPIG: u = c->threadgroup_position_in_grid; break;
      case TPIG: u = c->thread_position_in_grid; break;
      case TPTG: u = c->threads_per_threadgroup; break;
      case TGPG: u = c->threadgroups_per_grid; break;
      case LANE: u.x = c->lane; break;
      case SGITG: u.x = c->simdgroup; break;
      case SGPTG: u.x = c->simdgroups_per_threadgroup; break;
      case TPSG: u.x = MSLSIM_SIMD_WIDTH; break;
      case TPG:
        u = {c->threadgroups_per_grid.x * c->threads_per_threadgroup.x, c->threadgroups_per_grid.y * c->threads_per_threadgroup.y,
             c->threadgroups_per_grid.z * c->threads_per_threadgroup.z};
        break;
    }
    return builtin_value<T>(u);
  }
};
struct BuiltinTable { constexpr BuiltinArg operator[](int w) const { return {w}; } };
constexpr BuiltinTable builtin{};

// A `[[buffer(n)]]` argument; `constant_space`: the parameter is in the `constant` address space (the prepass
// rewrites its attribute), a read-only region whose reads the profile counts as constant-cache loads.
struct BufferArg {
  int i;
  bool constant_space;
  template <class T> static constexpr rt::BufferUse use(bool constant_space) {
    return constant_space ? rt::BUFFER_CONSTANT : std::is_const_v<T> ? rt::BUFFER_READ : rt::BUFFER_WRITE;
  }
#ifdef MSLSIM_CHECK_ADDRESS_SPACES   // a pointer without an address space converts to void*; device/constant ones do not
  template <class T, std::enable_if_t<!std::is_convertible_v<T*, const volatile void*>, int> = 0> operator T*() const { return (T*)rt::bind_buffer(i, 0, false, use<T>(constant_space)); }
  template <class T, std::enable_if_t<!std::is_convertible_v<T*, const volatile void*>, int> = 0> operator T&() const { return *(T*)rt::bind_buffer(i, sizeof(T), true, use<T>(constant_space)); }
#else
  template <class T> operator T*() const { return (T*)rt::bind_buffer(i, 0, false, use<T>(constant_space)); }
  template <class T> operator T&() const { return *(T*)rt::bind_buffer(i, sizeof(T), true, use<T>(constant_space)); }
#endif
};
struct BufferTable {
  bool constant_space;
  constexpr BufferArg operator[](int i) const { return {i, constant_space}; }
};
constexpr BufferTable buffer_arg{false}, constant_buffer_arg{true};
// `[[buffer(n), function_constant(c)]]`: the argument exists only when c is true; otherwise it is null and
// need not be bound (rewritten by the prepass).
struct ConditionalBufferArg {
  BufferArg arg;
  bool exists;
  template <class T> operator T*() const { return exists ? (T*)arg : nullptr; }
  // An absent reference refers to zeros (runtime.h: absent_argument).
  template <class T> operator T&() const { return exists ? (T&)arg : *(T*)rt::absent_argument(); }
};
struct ConditionalBufferTable {
  bool exists, constant_space;
  constexpr ConditionalBufferArg operator[](int i) const { return {{i, constant_space}, exists}; }
};
inline ConditionalBufferTable conditional_buffer_arg(bool exists, bool constant_space) { return {exists, constant_space}; }
struct ThreadgroupArg { int i; template <class T> operator T*() const { return (T*)rt::bind_threadgroup_arg(i); } };
struct ThreadgroupArgTable { constexpr ThreadgroupArg operator[](int i) const { return {i}; } };
constexpr ThreadgroupArgTable threadgroup_arg{};

// Kernel-scope `threadgroup T name[N];` (rewritten by the prepass): one instance per threadgroup.
template <class T> inline T& threadgroup_variable(const void* key, const char* name) {
  return *(T*)rt::threadgroup_variable(key, sizeof(T), alignof(T), name);
}

// `constant T name [[function_constant(i)]];` (rewritten by the prepass). Set per launch; reading one
// that was not set is an error, as creating such a pipeline is on Metal.
template <class T> constexpr int constant_type() {
  if constexpr (std::is_same_v<T, bool>) return MSLSIM_BOOL;
  else if constexpr (std::is_same_v<T, int>) return MSLSIM_INT;
  else if constexpr (std::is_same_v<T, uint>) return MSLSIM_UINT;
  else if constexpr (std::is_same_v<T, float>) return MSLSIM_FLOAT;
  else if constexpr (std::is_same_v<T, half>) return MSLSIM_HALF;
  else if constexpr (std::is_same_v<T, short>) return MSLSIM_SHORT;
  else if constexpr (std::is_same_v<T, ushort>) return MSLSIM_USHORT;
  else if constexpr (std::is_same_v<T, char>) return MSLSIM_CHAR;
  else if constexpr (std::is_same_v<T, uchar>) return MSLSIM_UCHAR;
  else static_assert(sizeof(T) == 0, "unsupported function constant type");
}
template <class T> struct FunctionConstant {
  T value;
  bool defined;
  const char* name;
  FunctionConstant(int index, const char* n) : value(), defined(false), name(n) {
    rt::register_function_constant(index, constant_type<T>(), &value, &defined, n);
  }
  operator T() const {
    if (__builtin_expect(!defined, 0)) rt::function_constant_not_set(name);
    return value;
  }
};
template <class T> inline bool is_defined(const FunctionConstant<T>& c) { return c.defined; }

// `constant T name = <expression using function constants>;` (rewritten by the prepass): evaluated per
// launch (a pipeline's constants), not once when the library loads.
template <class T, class F> struct DerivedConstant {
  F init;
  mutable T value{};
  mutable uint64_t serial = 0;
  explicit DerivedConstant(F f) : init(f) {}
  operator T() const {
    const uint64_t now = rt::launch_serial();
    if (__atomic_load_n(&serial, __ATOMIC_ACQUIRE) != now) {   // workers may race here: same value
      value = init();
      __atomic_store_n(&serial, now, __ATOMIC_RELEASE);
    }
    return value;
  }
};
}  // namespace mslsim

#define MSLSIM_FUNCTION_CONSTANT(T, name, idx) static mslsim::FunctionConstant<T> name((idx), #name)
#define MSLSIM_DERIVED_CONSTANT(T, name, ...) \
  static const mslsim::DerivedConstant<T, T (*)()> name([]() -> T { return (__VA_ARGS__); })
#define MSLSIM_THREADGROUP_VARIABLE(T, name)                                                   \
  static char mslsim_key_##name;                                                               \
  T& name = mslsim::threadgroup_variable<T>(&mslsim_key_##name, #name)
#define MSLSIM_CAT_(a, b) a##b
#define MSLSIM_CAT(a, b) MSLSIM_CAT_(a, b)
#if defined(MSLSIM_GPU_NUMERICS)
#define MSLSIM_NUMERICS 1
#else
#define MSLSIM_NUMERICS 0
#endif
// Appended by the build step after the kernel source.
#define MSLSIM_EXPORT_KERNEL_AS(host_name_, ...) MSLSIM_EXPORT_(host_name_, MSLSIM_CAT(mslsim_entry_, __COUNTER__), __VA_ARGS__)
#define MSLSIM_EXPORT_(host_name_, entry, ...) \
  static void entry() { __VA_ARGS__(); }      \
  static int MSLSIM_CAT(entry, _registered) [[maybe_unused]] = mslsim::rt::register_kernel(host_name_, &entry, MSLSIM_NUMERICS);
// Work-counter hook for kernels (see metal-flash-sdpa/common/work_counters.h): named, summed over the launch.
#define mslsim_work_count(name, amount)                                               \
  do {                                                                                \
    static const int mslsim_counter_ = mslsim::rt::work_counter(name);                \
    mslsim::rt::work_count(mslsim_counter_, (uint64_t)(amount));                      \
  } while (0)

// ============================================================================ MSL keywords (must come last)
using namespace metal;
#define kernel
#ifdef MSLSIM_CHECK_ADDRESS_SPACES   // static pass: Metal address spaces become clang address spaces
#define device __attribute__((address_space(1)))
#define constant const __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#define double mslsim_error_double_is_not_supported_in_MSL
#else
#define device
#define constant
#define threadgroup
#endif
#define thread
#define host_name(x)
#define max_total_threads_per_threadgroup(x)
#define function_constant(n) mslsim_error_function_constant_must_be_declared_at_program_scope_of_the_metal_file
#define is_function_constant_defined(x) (mslsim::is_defined(x))
#define buffer(n) ]] = mslsim::buffer_arg[mslsim::index[n
#define mslsim_threadgroup_arg(n) ]] = mslsim::threadgroup_arg[mslsim::index[n
#define mslsim_constant_buffer(n) ]] = mslsim::constant_buffer_arg[mslsim::index[n
#define mslsim_conditional_buffer(n, c) ]] = mslsim::conditional_buffer_arg(c, false)[mslsim::index[n
#define mslsim_conditional_constant_buffer(n, c) ]] = mslsim::conditional_buffer_arg(c, true)[mslsim::index[n
#define thread_position_in_threadgroup ]] = mslsim::builtin[mslsim::index[mslsim::TPITG
#define thread_index_in_threadgroup ]] = mslsim::builtin[mslsim::index[mslsim::TIITG
#define threadgroup_position_in_grid ]] = mslsim::builtin[mslsim::index[mslsim::TGPIG
#define thread_position_in_grid ]] = mslsim::builtin[mslsim::index[mslsim::TPIG
#define threads_per_threadgroup ]] = mslsim::builtin[mslsim::index[mslsim::TPTG
#define threadgroups_per_grid ]] = mslsim::builtin[mslsim::index[mslsim::TGPG
#define threads_per_grid ]] = mslsim::builtin[mslsim::index[mslsim::TPG
#define thread_index_in_simdgroup ]] = mslsim::builtin[mslsim::index[mslsim::LANE
#define simdgroup_index_in_threadgroup ]] = mslsim::builtin[mslsim::index[mslsim::SGITG
#define simdgroups_per_threadgroup ]] = mslsim::builtin[mslsim::index[mslsim::SGPTG
#define threads_per_simdgroup ]] = mslsim::builtin[mslsim::index[mslsim::TPSG
// Vector construction syntax float4(...): a function-like macro, so plain `float4` stays the type.
#define MSLSIM_CTOR(T, N) mslsim::make_vector<T, N>
#define float2(...) MSLSIM_CTOR(float, 2)(__VA_ARGS__)
#define float3(...) MSLSIM_CTOR(float, 3)(__VA_ARGS__)
#define float4(...) MSLSIM_CTOR(float, 4)(__VA_ARGS__)
#define half2(...) MSLSIM_CTOR(half, 2)(__VA_ARGS__)
#define half3(...) MSLSIM_CTOR(half, 3)(__VA_ARGS__)
#define half4(...) MSLSIM_CTOR(half, 4)(__VA_ARGS__)
#define bfloat2(...) MSLSIM_CTOR(bfloat, 2)(__VA_ARGS__)
#define bfloat3(...) MSLSIM_CTOR(bfloat, 3)(__VA_ARGS__)
#define bfloat4(...) MSLSIM_CTOR(bfloat, 4)(__VA_ARGS__)
#define int2(...) MSLSIM_CTOR(int, 2)(__VA_ARGS__)
#define int3(...) MSLSIM_CTOR(int, 3)(__VA_ARGS__)
#define int4(...) MSLSIM_CTOR(int, 4)(__VA_ARGS__)
#define uint2(...) MSLSIM_CTOR(uint, 2)(__VA_ARGS__)
#define uint3(...) MSLSIM_CTOR(uint, 3)(__VA_ARGS__)
#define uint4(...) MSLSIM_CTOR(uint, 4)(__VA_ARGS__)
#define short2(...) MSLSIM_CTOR(short, 2)(__VA_ARGS__)
#define short3(...) MSLSIM_CTOR(short, 3)(__VA_ARGS__)
#define short4(...) MSLSIM_CTOR(short, 4)(__VA_ARGS__)
#define ushort2(...) MSLSIM_CTOR(ushort, 2)(__VA_ARGS__)
#define ushort3(...) MSLSIM_CTOR(ushort, 3)(__VA_ARGS__)
#define ushort4(...) MSLSIM_CTOR(ushort, 4)(__VA_ARGS__)
#define char2(...) MSLSIM_CTOR(char, 2)(__VA_ARGS__)
#define char3(...) MSLSIM_CTOR(char, 3)(__VA_ARGS__)
#define char4(...) MSLSIM_CTOR(char, 4)(__VA_ARGS__)
#define uchar2(...) MSLSIM_CTOR(uchar, 2)(__VA_ARGS__)
#define uchar3(...) MSLSIM_CTOR(uchar, 3)(__VA_ARGS__)
#define uchar4(...) MSLSIM_CTOR(uchar, 4)(__VA_ARGS__)
#define long2(...) MSLSIM_CTOR(long, 2)(__VA_ARGS__)
#define long3(...) MSLSIM_CTOR(long, 3)(__VA_ARGS__)
#define long4(...) MSLSIM_CTOR(long, 4)(__VA_ARGS__)
#define ulong2(...) MSLSIM_CTOR(ulong, 2)(__VA_ARGS__)
#define ulong3(...) MSLSIM_CTOR(ulong, 3)(__VA_ARGS__)
#define ulong4(...) MSLSIM_CTOR(ulong, 4)(__VA_ARGS__)
