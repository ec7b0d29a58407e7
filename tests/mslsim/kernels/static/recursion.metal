#include <metal_stdlib>
using namespace metal;
static uint is_odd(uint n);
static uint is_even(uint n) { return n == 0 ? 1 : is_odd(n - 1); }
static uint is_odd(uint n) { return n == 0 ? 0 : is_even(n - 1); }
kernel void k(device uint* x [[buffer(0)]]) { x[0] = is_even(x[0]); }
