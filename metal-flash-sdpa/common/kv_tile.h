// Device -> threadgroup copy of a K or V tile (BK key rows of D elements, tile row stride LD), shared by the
// prefill and decode kernels, and the mapping of a tile's keys to the slots of a paged cache that both use. The caller gives each row's element offset in `src` (negative: the key does not
// exist and its row is zeroed), computed once per row and tile, so the copy itself has no 64-bit multiply and
// no division by a runtime value. With FC_KV_VECTOR (the host saw every K/V row start on a 16-byte boundary
// and a tile span fit 32 bits) each access moves 16 bytes; otherwise one element.
#pragma once
#include <metal_stdlib>

#include "params.h"
#include "strided.h"
using namespace metal;

constant bool kv_vector [[function_constant(FC_KV_VECTOR)]];
// MLA (V = k_cache[..., :DV], the host saw the same storage, offset and strides): a tile's V rows are its K rows'
// first DV elements, already in threadgroup memory, so no V tile is loaded (the keys' bytes are read once).
constant bool v_in_k_tile [[function_constant(FC_V_IN_K_TILE)]];

// Tiles live in `threadgroup uint4 storage[KV_TILE_VECTORS(T, BK, LD)]` (16-byte aligned rows).
#define KV_TILE_VECTORS(T, BK, LD) ((BK) * (LD) * sizeof(T) / sizeof(uint4))

template <typename T, int D, int BK, int LD, typename RowOffset>
METAL_FUNC void copy_kv_tile(threadgroup T* tile, const device T* src, RowOffset row_offset, uint tid, uint threads) {
    static_assert(LD * sizeof(T) % sizeof(uint4) == 0, "tile rows must keep 16-byte alignment");
    if (kv_vector) {
        constexpr uint PER_ROW = D * sizeof(T) / sizeof(uint4);   // D is a multiple of 8: whole vectors
        constexpr uint ROW_VECTORS = LD * sizeof(T) / sizeof(uint4);
        threadgroup uint4* dst = reinterpret_cast<threadgroup uint4*>(tile);
        for (uint i = tid; i < BK * PER_ROW; i += threads) {   // constant divisor: a multiply, not a divide
            const uint row = i / PER_ROW, col = i % PER_ROW;
            const auto offset = row_offset(row);
            dst[row * ROW_VECTORS + col] =
                offset >= 0 ? reinterpret_cast<const device uint4*>(src + offset)[col] : uint4(0);
        }
    } else {
        for (uint i = tid; i < BK * D; i += threads) {
            const uint row = i / D, col = i % D;
            const auto offset = row_offset(row);
            tile[row * LD + col] = offset >= 0 ? src[offset + col] : T(0);
        }
    }
}

// Row offsets for copy_kv_tile of `rows` consecutive tokens `token_stride` elements apart, from the tile's first
// token; rows past them are missing (zeroed).
struct TokenRows {
    int rows;
    int64_t token_stride;
    int64_t operator()(uint row) const {
        if (int(row) >= rows) return -1;
        // kv_vector: the host checked that a tile spans < 2^31 elements, so the product is 32-bit.
        return kv_vector ? int64_t(int(row) * int(token_stride)) : int64_t(row) * token_stride;
    }
};

// Row offsets of a tile's keys, mapped once per tile (map_paged_keys; -1: no key).
struct TableRows {
    const threadgroup int64_t* offset;
    int64_t operator()(uint row) const { return offset[row]; }
};

// The {block, slot} strides of a paged tensor (a cache, or its scales) and whether entry * block + slot * slot fits 32
// bits for every entry < num_blocks and slot < block_size: then a key's offset is a 32-bit product (a 64-bit multiply
// costs several 32-bit ones on Apple GPUs). Checked once per threadgroup.
struct SlotStrides {
    int64_t block, slot;
    bool fits_32;
};

METAL_FUNC SlotStrides slot_strides(int num_blocks, int block_size, int64_t block, int64_t slot) {
    const int64_t largest = int64_t(max(num_blocks, 1) - 1) * block + int64_t(max(block_size, 1) - 1) * slot;
    return {block, slot, largest <= int64_t(0x7FFFFFFF)};
}

// A paged cache [num_blocks, block_size, Hkv, D] (strides {block, slot, head}) as a threadgroup reads it: the
// sequence's block_table row and the layout, in registers (read from the constant params once, not per tile).
struct PagedLayout {
    const device int* table_row;
    FastDivisor block_size;
    int num_blocks;   // entries outside [0, num_blocks) hide their keys
    SlotStrides k, v;
};

// The layout of sequence seq's cache from the params of a paged kernel (DecodeParams, PrefillParams: block_size,
// num_blocks, blocks_per_seq and the caches' {block, slot, head} strides).
template <typename Params>
METAL_FUNC PagedLayout paged_layout(constant Params& p, const device int* block_table, int seq) {
    const FastDivisor block_size{p.block_size.multiplier, p.block_size.shift, p.block_size.divisor, 0};
    return {block_table + int64_t(seq) * p.blocks_per_seq, block_size, p.num_blocks,
            slot_strides(p.num_blocks, block_size.divisor, p.shape.k_strides[STRIDE_BATCH],
                         p.shape.k_strides[STRIDE_TOKEN]),
            slot_strides(p.num_blocks, block_size.divisor, p.shape.v_strides[STRIDE_BATCH],
                         p.shape.v_strides[STRIDE_TOKEN])};
}

// Where the mapping lane's key lives: its block_table entry (as read, maybe invalid) and slot in the block, and
// whether it is a wanted key of the cache.
struct PagedKey {
    int entry, slot;
    bool exists;
    // Its element offset in a paged tensor (-1: no key).
    METAL_FUNC int64_t offset(SlotStrides strides) const {
        if (!exists) return -1;
        if (strides.fits_32) return int64_t(entry * int(strides.block) + slot * int(strides.slot));
        return entry * strides.block + slot * strides.slot;
    }
};

// The key of lane `lane` (< BK <= 32) of the calling simdgroup in the tile at key0: key j of the sequence sits at cache
// position kv_start + j. Keys [lo, hi) are wanted; the table is read only for keys below `count` (the sequence's keys,
// at most the row's capacity), so no lane reads past its row. Consecutive keys share blocks: only the lane starting a
// block (or lane 0) reads the table.
template <int BK>
METAL_FUNC PagedKey paged_key(PagedLayout cache, int kv_start, int key0, int lo, int hi, int count, ushort lane) {
    static_assert(BK <= 32, "one lane per tile key");
    const int key = key0 + int(lane);
    const int position = kv_start + key;
    const bool wanted = int(lane) < BK && key >= lo && key < hi;
    const int block = fast_divide(position, cache.block_size), slot = position - block * cache.block_size.divisor;
    const int first_lane = int(lane) - min(int(lane), slot);
    const bool reads = int(lane) < BK && key < count && first_lane == int(lane);
    const int own_entry = reads ? cache.table_row[block] : -1;
    const int entry = simd_shuffle(own_entry, ushort(first_lane));
    return {entry, slot, wanted && entry >= 0 && entry < cache.num_blocks};
}

// paged_key for a threadgroup's tile: writes each key's element offset in the K and V caches to threadgroup memory
// (-1: none) and *tile_valid (bit r: key key0 + r exists).
template <int BK>
METAL_FUNC PagedKey map_paged_keys(PagedLayout cache, int kv_start, int key0, int lo, int hi, int count,
                                   threadgroup int64_t* k_offset, threadgroup int64_t* v_offset,
                                   threadgroup uint* tile_valid, ushort lane) {
    const PagedKey key = paged_key<BK>(cache, kv_start, key0, lo, hi, count, lane);
    if (int(lane) < BK) {
        k_offset[lane] = key.offset(cache.k);
        v_offset[lane] = key.offset(cache.v);
    }
    const uint valid = simd_or(key.exists ? 1u << lane : 0u);
    if (lane == 0) *tile_valid = valid;
    return key;
}
