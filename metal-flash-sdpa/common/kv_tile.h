// Device -> threadgroup copy of a K or V tile (BK key rows of D elements, tile row stride LD), shared by the
// prefill and decode kernels. The caller gives each row's element offset in `src` (negative: the key does not
// exist and its row is zeroed), computed once per row and tile, so the copy itself has no 64-bit multiply and
// no division by a runtime value. With FC_KV_VECTOR (the host saw every K/V row start on a 16-byte boundary
// and a tile span fit 32 bits) each access moves 16 bytes; otherwise one element.
#pragma once
#include <metal_stdlib>

#include "params.h"
using namespace metal;

constant bool kv_vector [[function_constant(FC_KV_VECTOR)]];

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
