// mslsim: Metal vector constructors (float4(x) splats, float4(a.xy, b, c) concatenates, float4(h4) converts),
// reached through the float4(...) etc. macros at the end of shim.h, which includes this file inside namespace mslsim.
// A header of its own because what its code computes is the kernel's: mslsim/ir_mix.py counts the element
// conversions written here (one `convert` per element, as the scalar cast float(x) in kernel code counts) and
// nothing else of the shim's.
#pragma once
#pragma clang system_header

template <class T, int N, class A> inline void vector_put(metal::vec<T, N>& r, int& k, A a) {
  if constexpr (is_vector_v<A>) {
    for (int i = 0; i < vector_traits<A>::size; i++) r[k++] = (T)a[i];
  } else {
    r[k++] = (T)a;
  }
}
template <class T, int N, class... A> inline metal::vec<T, N> make_vector(A... a) {
  metal::vec<T, N> r = {};
  if constexpr (sizeof...(A) == 0) {
    return r;
  } else if constexpr (sizeof...(A) == 1 && !(is_vector_v<A> || ...)) {
    ((r = metal::vec<T, N>((T)a)), ...);
  } else {
    int k = 0;
    (vector_put<T, N>(r, k, a), ...);
  }
  return r;
}
