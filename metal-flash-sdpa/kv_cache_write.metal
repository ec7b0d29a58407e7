// The paged KV write: appends new K/V tokens to a paged cache [num_blocks, block_size, Hkv, D] (a contiguous
// cache is one block per sequence) at cache_seqlens[b] + i through block_table, in one dispatch, quantizing them
// on the way into a quantized cache (common/kv_quant.h). quantize_kv runs it too, on a tensor viewed as a cache.
#include <metal_stdlib>

#include "common/kv_quant.h"
#include "common/params.h"
#include "common/strided.h"
using namespace metal;

// One row into a cache of any format (KvQuantParams): copied, quantized to fp8 or to affine groups (one simdgroup).
// cache / scales / biases are at the row's slot; offsets in elements of each.
template <typename T>
METAL_FUNC void write_row(const device T* src, device uchar* cache, device T* scales, device T* biases,
                          CacheFormat format, float descale, int head_dim, uint tid) {
    if (kv_quantized && format.kind == KV_AFFINE) {
        quantize_row<T>(src, reinterpret_cast<device uint*>(cache), scales, biases, head_dim, format.bits,
                        format.group_size, ushort(tid));
    } else if (kv_quantized && format.kind == KV_FP8_E4M3) {
        for (int d = int(tid); d < head_dim; d += KV_WRITE_THREADS) cache[d] = float_to_e4m3(precise::divide(float(src[d]), descale));
    } else {
        device T* dst = reinterpret_cast<device T*>(cache);
        for (int d = int(tid); d < head_dim; d += KV_WRITE_THREADS) dst[d] = src[d];
    }
}

// Write new token i of sequence b at cache position cache_seqlens[b] + i: grid (Sq_new, Hkv, B), one simdgroup.
// cache_seqlens and block_table are data (unchecked when the host checks are off): a position outside the table
// or a block outside the cache is dropped, never written. Positions in 64-bit: cache_seqlens[b] + i can pass 2^31.
template <typename T>
[[kernel]] void kv_cache_write(
    const device T* k [[buffer(KV_WRITE_BUFFER_K)]],
    const device T* v [[buffer(KV_WRITE_BUFFER_V)]],
    device uchar* k_cache [[buffer(KV_WRITE_BUFFER_K_CACHE)]],
    device uchar* v_cache [[buffer(KV_WRITE_BUFFER_V_CACHE)]],
    const device int* block_table [[buffer(KV_WRITE_BUFFER_BLOCK_TABLE)]],
    const device int* cache_seqlens [[buffer(KV_WRITE_BUFFER_CACHE_SEQLENS)]],
    constant KvWriteParams& p [[buffer(KV_WRITE_BUFFER_PARAMS)]],
    device T* k_scales [[buffer(KV_WRITE_BUFFER_K_SCALES)]],
    device T* k_biases [[buffer(KV_WRITE_BUFFER_K_BIASES)]],
    device T* v_scales [[buffer(KV_WRITE_BUFFER_V_SCALES)]],
    device T* v_biases [[buffer(KV_WRITE_BUFFER_V_BIASES)]],
    constant KvQuantParams& quant [[buffer(KV_WRITE_BUFFER_KV_QUANT)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]]) {
    const int token = int(tgid.x), kv_head = int(tgid.y), seq = int(tgid.z);
    const int64_t position = int64_t(cache_seqlens[seq]) + token;
    if (position < 0 || position >= int64_t(p.blocks_per_seq) * p.block_size) return;
    const int block = block_table[int64_t(seq) * p.blocks_per_seq + position / p.block_size];
    if (block < 0 || block >= p.num_blocks) return;
    const int slot = int(position % p.block_size);
    const CacheFormat k_format = cache_format(quant.k), v_format = cache_format(quant.v);
    // fp8 descales [B, Hkv] live in the scales slot; affine scales and biases at the row's (block, slot, head).
    const auto scale_offset = [&](CacheFormat f) {
        return f.kind == KV_AFFINE ? block * f.scale_strides[STRIDE_BATCH] + slot * f.scale_strides[STRIDE_TOKEN] +
                                         kv_head * f.scale_strides[STRIDE_HEAD]
                                   : int64_t(0);
    };
    const auto descale = [&](CacheFormat f, const device T* scales) {
        return f.kind == KV_FP8_E4M3 ? reinterpret_cast<const device float*>(scales)[seq * f.descale_seq_stride + kv_head]
                                     : 1.0f;
    };
    write_row<T>(k + element_offset(p.k_strides, seq, token, kv_head),
                 k_cache + element_offset(p.k_cache_strides, block, slot, kv_head) * cache_element_bytes<T>(k_format.kind),
                 k_scales + scale_offset(k_format), k_biases + scale_offset(k_format), k_format,
                 descale(k_format, k_scales), p.head_dim, tid);
    if (!p.write_v) return;
    write_row<T>(v + element_offset(p.v_strides, seq, token, kv_head),
                 v_cache + element_offset(p.v_cache_strides, block, slot, kv_head) * cache_element_bytes<T>(v_format.kind),
                 v_scales + scale_offset(v_format), v_biases + scale_offset(v_format), v_format,
                 descale(v_format, v_scales), p.head_dim, tid);
}

#define INSTANTIATE_KV_CACHE_WRITE(type) \
    template [[host_name("kv_cache_write_" #type)]] [[kernel]] decltype(kv_cache_write<type>) kv_cache_write<type>;
INSTANTIATE_KV_CACHE_WRITE(float)
INSTANTIATE_KV_CACHE_WRITE(half)
INSTANTIATE_KV_CACHE_WRITE(bfloat)
