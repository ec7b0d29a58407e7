// The paged KV write: appends new K/V tokens to a paged cache [num_blocks, block_size, Hkv, D] (a contiguous
// cache is one block per sequence) at cache_seqlens[b] + i through block_table, in one dispatch.
#include <metal_stdlib>

#include "common/params.h"
#include "common/strided.h"
using namespace metal;

// Write new token i of sequence b at cache position cache_seqlens[b] + i: grid (Sq_new, Hkv, B). cache_seqlens
// and block_table are data (unchecked when the host checks are off): a position outside the table or a block
// outside the cache is dropped, never written. Positions in 64-bit: cache_seqlens[b] + i can pass 2^31.
template <typename T>
[[kernel]] void kv_cache_write(
    const device T* k [[buffer(KV_WRITE_BUFFER_K)]],
    const device T* v [[buffer(KV_WRITE_BUFFER_V)]],
    device T* k_cache [[buffer(KV_WRITE_BUFFER_K_CACHE)]],
    device T* v_cache [[buffer(KV_WRITE_BUFFER_V_CACHE)]],
    const device int* block_table [[buffer(KV_WRITE_BUFFER_BLOCK_TABLE)]],
    const device int* cache_seqlens [[buffer(KV_WRITE_BUFFER_CACHE_SEQLENS)]],
    constant KvWriteParams& p [[buffer(KV_WRITE_BUFFER_PARAMS)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]]) {
    const int token = int(tgid.x), kv_head = int(tgid.y), seq = int(tgid.z);
    const int64_t position = int64_t(cache_seqlens[seq]) + token;
    if (position < 0 || position >= int64_t(p.blocks_per_seq) * p.block_size) return;
    const int block = block_table[int64_t(seq) * p.blocks_per_seq + position / p.block_size];
    if (block < 0 || block >= p.num_blocks) return;
    const int slot = int(position % p.block_size);
    const device T* k_src = k + element_offset(p.k_strides, seq, token, kv_head);
    const device T* v_src = v + element_offset(p.v_strides, seq, token, kv_head);
    device T* k_dst = k_cache + element_offset(p.k_cache_strides, block, slot, kv_head);
    device T* v_dst = v_cache + element_offset(p.v_cache_strides, block, slot, kv_head);
    for (int d = int(tid); d < p.head_dim; d += KV_WRITE_THREADS) {
        k_dst[d] = k_src[d];
        v_dst[d] = v_src[d];
    }
}

#define INSTANTIATE_KV_CACHE_WRITE(type) \
    template [[host_name("kv_cache_write_" #type)]] [[kernel]] decltype(kv_cache_write<type>) kv_cache_write<type>;
INSTANTIATE_KV_CACHE_WRITE(float)
INSTANTIATE_KV_CACHE_WRITE(half)
INSTANTIATE_KV_CACHE_WRITE(bfloat)
