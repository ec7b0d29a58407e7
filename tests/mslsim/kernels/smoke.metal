#include <metal_stdlib>
using namespace metal;

constant bool  do_scale [[function_constant(10)]];
constant float scale_v  [[function_constant(11)]];

struct P { uint n; float bias; };

kernel void smoke(device const float* in  [[buffer(0)]],
                  device float4*      out [[buffer(1)]],
                  constant P&         p   [[buffer(2)]],
                  uint3  tpitg [[thread_position_in_threadgroup]],
                  uint   tgid  [[threadgroup_position_in_grid]],
                  ushort lane  [[thread_index_in_simdgroup]],
                  ushort sg    [[simdgroup_index_in_threadgroup]],
                  uint   ntg   [[threads_per_threadgroup]])
{
    threadgroup float buf[128];
    threadgroup float sgsum[4];
    const uint t = tpitg.x;
    const uint gi = tgid * ntg + t;
    buf[t] = in[gi];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float r = buf[ntg - 1 - t];
    float s = simd_sum(r);
    if (lane == 0) sgsum[sg] = s;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float tot = 0.0f;
    for (uint i = 0; i < ntg / 32; ++i) tot += sgsum[i];
    float4 o = float4(r, p.bias, tot, float(half(r) * 2.0h));
    if (do_scale) o *= scale_v;
    out[gi] = o;
}
