// Quantized K/V caches (params.h: CacheFormat): the quantization rules, shared by the KV write (quantizes rows on
// the way in) and the decode kernel, which dequantizes either whole tiles while copying them into threadgroup memory
// (fp8: the attention math after the copy is the unquantized kernel's) or computes with the exact affine values
// x = scale * code + bias in fp32: MMAs on the raw codes (exact in every T: at most 255), from a threadgroup tile of
// codes (the tile path) or registers (row_codes, the decode kernel's direct path), and the affine map folded out of
// the MMAs per key and group (fold_scores, scale_probabilities).
#pragma once
#include <metal_stdlib>

#include "attention_tile.h"
#include "kv_tile.h"
#include "params.h"
using namespace metal;

constant bool kv_quantized [[function_constant(FC_KV_QUANTIZED)]];

// A cache's format in registers (plain unless FC_KV_QUANTIZED: the params are then not read).
METAL_FUNC CacheFormat cache_format(constant const CacheFormat& format) {
    CacheFormat thread_copy{};
    if (kv_quantized) thread_copy = format;
    return thread_copy;
}

constant constexpr int64_t PACKED_WORD_BYTES = 4;   // an affine cache's element: a uint32 of packed codes

// Bytes of one cache element (the unit of the cache's strides): T, a uint32 word of packed groups, an fp8 byte.
template <typename T>
METAL_FUNC int64_t cache_element_bytes(int kind) {
    return kind == KV_AFFINE ? PACKED_WORD_BYTES : kind == KV_FP8_E4M3 ? 1 : int64_t(sizeof(T));
}

// log2 of an affine group size (32, 64 or 128: the host checks), so that the decode prologue shifts instead of dividing.
METAL_FUNC int group_size_log2(int group_size) { return group_size == 32 ? 5 : group_size == 64 ? 6 : 7; }

// ---------------------------------------------------------------------------------------------------- affine
struct AffineGroup {
    float scale, bias;
};

// mlx.core.quantize's affine rule (mode "affine"), in fp32 with IEEE division (precise::divide: fast math's `/` can be
// an ulp off, and a code or scale would then differ from MLX's, whose kernels build with -fno-fast-math): the step
// covers [min, max] in 2^bits - 1 bins, its sign is chosen so the edge of larger magnitude sits on a whole number of steps q0, and when
// q0 != 0 the step is refined to edge / q0 with the bias at that edge, so that edge is represented exactly
// (otherwise, as for a group of zeros, bias 0). A constant group gets the 1e-7 step floor.
METAL_FUNC AffineGroup affine_group(float lo, float hi, float bins) {
    const bool low_edge = fabs(lo) > fabs(hi);
    const float step = max(precise::divide(hi - lo, bins), 1e-7f);
    const float scale = low_edge ? step : -step;
    const float edge = low_edge ? lo : hi;
    const float q0 = rint(precise::divide(edge, scale));
    return q0 != 0.0f ? AffineGroup{precise::divide(edge, q0), edge} : AffineGroup{scale, 0.0f};
}

// One row of head_dim elements (a multiple of 32) quantized by one simdgroup: lane l holds element 32 i + l of
// each 32-element stripe, a group's min / max is a simdgroup reduction, and the lanes of one word OR their
// shifted codes together (butterfly), its first lane storing the word. Groups span whole stripes (group_size >= 32).
template <typename T>
METAL_FUNC void quantize_row(const device T* src, device uint* words, device T* scales, device T* biases,
                             int head_dim, int bits, int group_size, ushort lane) {
    constexpr int MAX_GROUP_STRIPES = 128 / 32;
    const float bins = float((1 << bits) - 1);
    const int per_word = 32 / bits;
    for (int g0 = 0, group = 0; g0 < head_dim; g0 += group_size, ++group) {
        float x[MAX_GROUP_STRIPES];
        float lo = FLT_MAX, hi = -FLT_MAX;
        for (int s = 0; s < group_size / 32; ++s) {
            x[s] = float(src[g0 + s * 32 + lane]);
            lo = min(lo, x[s]);
            hi = max(hi, x[s]);
        }
        const AffineGroup a = affine_group(simd_min(lo), simd_max(hi), bins);
        for (int s = 0; s < group_size / 32; ++s) {
            const uint code = uint(clamp(rint(precise::divide(x[s] - a.bias, a.scale)), 0.0f, bins));
            uint word = code << ((lane % per_word) * bits);
            for (ushort m = 1; m < ushort(per_word); m <<= 1) word |= simd_shuffle_xor(word, m);
            if (lane % per_word == 0) words[(g0 + s * 32 + lane) / per_word] = word;
        }
        if (lane == 0) {
            scales[group] = T(a.scale);
            biases[group] = T(a.bias);
        }
    }
}

// ------------------------------------------------------------------------------------------------- fp8 e4m3
// e4m3fn (no infinities, 0x7F / 0xFF NaN, largest finite 448) -> float, through half's bit layout: the 4 exponent
// and 3 mantissa bits shifted into a half give the value times 2^-8 (subnormals included).
METAL_FUNC float e4m3_to_float(uint byte) {
    const float magnitude = float(as_type<half>(ushort((byte & 0x7Fu) << 7))) * 256.0f;
    const float value = (byte & 0x80u) ? -magnitude : magnitude;
    return (byte & 0x7Fu) == 0x7Fu ? NAN : value;
}

// float -> e4m3fn, round to nearest even, as torch's .to(torch.float8_e4m3fn): magnitudes past 448 (infinities
// included) saturate to +-448, NaN stays NaN (tested on its bits: fast math may assume no NaN).
METAL_FUNC uchar float_to_e4m3(float x) {
    const uint bits = as_type<uint>(x);
    const uint sign = (bits >> 24) & 0x80u;
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return uchar(sign | 0x7Fu);
    const float magnitude = fabs(x);
    uint code;
    if (magnitude >= 0.015625f) {   // normal (>= 2^-6): keep 3 mantissa bits, ties to even
        const uint rounded = (bits & 0x7FFFFFFFu) + 0x7FFFFu + ((bits >> 20) & 1u);
        code = min((((rounded >> 23) - 120u) << 3) | ((rounded >> 20) & 7u), 0x7Eu);
    } else {                        // subnormal: multiples of 2^-9 (2^-6 itself rounds to the smallest normal)
        code = uint(rint(magnitude * 512.0f));
    }
    return uchar(sign | code);
}

// ------------------------------------------------------------------------------------------ tile dequantization
// One cache (K or V) as a decode threadgroup reads it: at its KV head, with the tile's row offsets (cache elements)
// and, for affine caches, the row offsets of the scales and biases (the tile and direct paths: the vector path's
// simdgroups map their keys themselves, decode.metal's vector_keys).
template <typename T>
struct CacheTile {
    const device uchar* head;              // the cache at this KV head
    const device T* scales;                // affine: at this KV head
    const device T* biases;
    const threadgroup int64_t* offset;     // per tile row (-1: no key)
    const threadgroup int64_t* scale_offset;
    int kind, bits, group_size;
    float descale;                         // fp8
};

// A cache as the decode threadgroup of (seq, kv_head) reads it; head_stride in cache elements. Lane 0 of each
// simdgroup reads the fp8 descale (uniform) and broadcasts it.
template <typename T>
METAL_FUNC CacheTile<T> cache_tile(const device uchar* cache, const device T* scales, const device T* biases,
                                   const threadgroup int64_t* offset, const threadgroup int64_t* scale_offset,
                                   CacheFormat format, int64_t head_stride, int seq, int kv_head, ushort lane) {
    const bool fp8 = format.kind == KV_FP8_E4M3;
    const float descale = simd_broadcast(
        fp8 && lane == 0 ? reinterpret_cast<const device float*>(scales)[int64_t(seq) * format.descale_seq_stride + kv_head]
                         : 1.0f, 0);
    const int64_t scale_head = kv_head * format.scale_strides[STRIDE_HEAD];
    return {cache + kv_head * head_stride * cache_element_bytes<T>(format.kind), scales + scale_head,
            biases + scale_head, offset, scale_offset, format.kind, format.bits, format.group_size, descale};
}

// Where tile row `row` keeps the (scale, bias) of its quantization group `group`, in T (exact: the cache stores
// them in T): the first pairs in the row's padding columns [D, LD), the others after the tile (params.h:
// KV_TILE_EXTRA_GROUPS).
template <typename T, int D, int BK, int LD>
METAL_FUNC threadgroup T* affine_pair(threadgroup T* tile, int row, int group) {
    constexpr int PADDED = (LD - D) / 2, EXTRA = KV_TILE_EXTRA_GROUPS(D);
    return group < PADDED ? tile + row * LD + D + 2 * group : tile + BK * LD + 2 * (row * EXTRA + group - PADDED);
}

// Affine: the raw codes as T (exact) and each row's (scale, bias) per group (affine_pair); one work item per (row,
// group), so each packed byte, scale and bias is read once per key; the group's packed words arrive 16 bytes at a
// time (aligned rows, FC_KV_VECTOR) or a word at a time. A row with no key gets codes 0 and (0, 0).
template <typename T, int D, int BK, int LD, int BITS>
METAL_FUNC void affine_codes_tile(threadgroup T* tile, CacheTile<T> src, uint tid, uint threads) {
    constexpr int PER_WORD = 32 / BITS;
    constexpr uint MASK = (1u << BITS) - 1u;
    const int group_size = src.group_size, groups = D / group_size, group_words = group_size / PER_WORD;
    const device uint* words = reinterpret_cast<const device uint*>(src.head);
    for (uint i = tid; i < uint(BK * groups); i += threads) {
        const uint row = i / uint(groups), group = i % uint(groups);
        const int64_t offset = src.offset[row];
        threadgroup T* out = tile + row * LD + group * group_size;
        threadgroup T* pair = affine_pair<T, D, BK, LD>(tile, row, group);
        if (offset < 0) {
            for (int e = 0; e < group_size; e += 4) *reinterpret_cast<threadgroup vec<T, 4>*>(out + e) = vec<T, 4>(0);
            pair[0] = pair[1] = T(0);
            continue;
        }
        const int64_t scale_at = src.scale_offset[row] + group;
        pair[0] = src.scales[scale_at];
        pair[1] = src.biases[scale_at];
        const device uint* packed = words + offset + group * group_words;
        // Four elements per threadgroup store (rows and groups start on multiples of 4 elements).
        threadgroup vec<T, 4>* out4 = reinterpret_cast<threadgroup vec<T, 4>*>(out);
        for (int w = 0; w < group_words; w += 4) {
            const uint4 four = kv_vector ? *reinterpret_cast<const device uint4*>(packed + w)
                                         : uint4(packed[w], packed[w + 1], packed[w + 2], packed[w + 3]);
            for (int c = 0; c < 4; ++c) {
                for (int e = 0; e < PER_WORD; e += 4) {
                    vec<T, 4> codes;
                    for (int i = 0; i < 4; ++i) codes[i] = T((four[c] >> ((e + i) * BITS)) & MASK);
                    out4[((w + c) * PER_WORD + e) / 4] = codes;
                }
            }
        }
    }
}

// fp8: one work item per 8 elements of a row (8 bytes, one load when the rows are aligned).
template <typename T, int D, int BK, int LD>
METAL_FUNC void dequantize_fp8_tile(threadgroup T* tile, CacheTile<T> src, uint tid, uint threads) {
    constexpr int CHUNKS = D / 8;
    for (uint i = tid; i < uint(BK * CHUNKS); i += threads) {
        const uint row = i / CHUNKS, chunk = i % CHUNKS;
        const int64_t offset = src.offset[row];
        threadgroup vec<T, 4>* out4 = reinterpret_cast<threadgroup vec<T, 4>*>(tile + row * LD + chunk * 8);
        const device uchar* bytes = src.head + offset + chunk * 8;
        uint2 eight = uint2(0);
        if (offset >= 0 && kv_vector) {
            eight = *reinterpret_cast<const device uint2*>(bytes);
        } else if (offset >= 0) {
            for (int e = 0; e < 8; ++e) eight[e / 4] |= uint(bytes[e]) << ((e % 4) * 8);
        }
        for (int half_chunk = 0; half_chunk < 2; ++half_chunk) {
            vec<T, 4> values;
            for (int i = 0; i < 4; ++i) values[i] = T(e4m3_to_float((eight[half_chunk] >> (i * 8)) & 0xFFu) * src.descale);
            out4[half_chunk] = values;
        }
    }
}

// A K or V tile into threadgroup memory as T: the values (plain, fp8) or the codes and their (scale, bias) (affine).
template <typename T, int D, int BK, int LD>
METAL_FUNC void load_cache_tile(threadgroup T* tile, CacheTile<T> src, uint tid, uint threads) {
    if (!kv_quantized || src.kind == KV_PLAIN)
        copy_kv_tile<T, D, BK, LD>(tile, reinterpret_cast<const device T*>(src.head), TableRows{src.offset}, tid, threads);
    else if (src.kind == KV_FP8_E4M3)
        dequantize_fp8_tile<T, D, BK, LD>(tile, src, tid, threads);
    else if (src.bits == 4)
        affine_codes_tile<T, D, BK, LD, 4>(tile, src, tid, threads);
    else
        affine_codes_tile<T, D, BK, LD, 8>(tile, src, tid, threads);
}

// ------------------------------------------------------------------------------------ the affine map, folded
// Attention on affine K and V from MMAs on the raw codes, for KF fragments of 8 keys and the dot products split in
// GROUPS parts, each inside one quantization group (group g of key j: affine(g, j), its (scale, bias)):
// - S[r, j] = sum_g scale[j, g] dots_g[r, j] + bias[j, g] q_sum[r, g], dots_g = Q_g . code_j,g, q_sum the sums of Q's
//   row over each part;
// - O[r, :] += sum_j (P[r, j] scale[j, g]) code_j,g + sum_j P[r, j] bias[j, g]: P scaled per key for each part times
//   the codes, and per lane a running sum of P bias per part (value_bias, rescaled with O, added to O once).
template <int KF, int GROUPS, typename Affine>
METAL_FUNC void fold_scores(thread Fragments<KF>& s, thread const Fragments<KF>* dots, thread const float* q_sum,
                            Affine affine, FragmentCoord fc) {
    UNROLL_FRAGMENTS
    for (int j = 0; j < KF; ++j) {
        UNROLL_FRAGMENTS
        for (int e = 0; e < 2; ++e) {
            float score = 0.0f;
            UNROLL_FRAGMENTS
            for (int g = 0; g < GROUPS; ++g) {
                const float2 a = affine(g, j * 8 + fc.col + e);
                score += a.x * dots[g].frag[j].thread_elements()[e] + a.y * q_sum[g];
            }
            s.frag[j].thread_elements()[e] = score;
        }
    }
}

template <int KF, int GROUPS, typename Affine>
METAL_FUNC void scale_probabilities(thread Fragments<KF>* scaled_p, thread float* value_bias,
                                    thread const Fragments<KF>& p, Affine affine, FragmentCoord fc) {
    UNROLL_FRAGMENTS
    for (int g = 0; g < GROUPS; ++g) {
        float bias = value_bias[g];
        UNROLL_FRAGMENTS
        for (int j = 0; j < KF; ++j) {
            UNROLL_FRAGMENTS
            for (int e = 0; e < 2; ++e) {
                const float2 a = affine(g, j * 8 + fc.col + e);
                const float prob = p.frag[j].thread_elements()[e];
                scaled_p[g].frag[j].thread_elements()[e] = prob * a.x;
                bias += prob * a.y;
            }
        }
        value_bias[g] = bias;
    }
}

// O += value_bias per part (value_bias: the lane's share, summed over the row's four lanes), O in head-dim order.
template <int D, int GROUPS>
METAL_FUNC void add_value_bias(thread Fragments<D / 8>& o, thread const float* value_bias) {
    constexpr int FRAGS = D / 8 / GROUPS;
    UNROLL_FRAGMENTS
    for (int g = 0; g < GROUPS; ++g) {
        const float bias = row_sum(value_bias[g]);
        UNROLL_FRAGMENTS
        for (int d = g * FRAGS; d < (g + 1) * FRAGS; ++d) o.frag[d].thread_elements() += bias;
    }
}

// The tile path's parts are the head dim's blocks of 32 elements (KV_AFFINE_BLOCKS; each lies in one group: groups are
// 32 to 128 elements), so one instantiation serves every group size; part b reads the pair of group b / (group_size /
// 32) of its key from the tile (affine_pair).
constant constexpr int KV_AFFINE_BLOCK = 32;
template <int D>
constexpr int kv_affine_blocks() { return D / KV_AFFINE_BLOCK; }

template <typename T, int D, int BK, int LD>
struct TileAffine {
    threadgroup T* tile;
    int first_row, group_shift;   // the slice's first tile row; log2(group_size / 32)
    METAL_FUNC float2 operator()(int block, int key) const {
        const threadgroup T* pair = affine_pair<T, D, BK, LD>(tile, first_row + key, block >> group_shift);
        return float2(float(pair[0]), float(pair[1]));
    }
};

template <typename T, int D, int BK, int LD>
METAL_FUNC TileAffine<T, D, BK, LD> tile_affine(threadgroup T* tile, int first_row, CacheTile<T> src) {
    return {tile, first_row, group_size_log2(src.group_size) - group_size_log2(KV_AFFINE_BLOCK)};
}

// The sums of each block of Q's row (the lane's row; Q as the tile path holds it, in head-dim order).
template <int D>
METAL_FUNC void block_sums(thread float* sums, thread const Fragments<D / 8>& q) {
    UNROLL_FRAGMENTS
    for (int b = 0; b < kv_affine_blocks<D>(); ++b) {
        float sum = 0.0f;
        UNROLL_FRAGMENTS
        for (int d = 4 * b; d < 4 * b + 4; ++d) sum += q.frag[d].thread_elements()[0] + q.frag[d].thread_elements()[1];
        sums[b] = row_sum(sum);
    }
}

// S = Q K^T for 8 rows and the KEYS keys of an affine code tile from tile row `first_row`: one MMA chain per block.
template <typename T, int D, int BK, int KEYS, int LD>
METAL_FUNC void affine_qk_tile(thread Fragments<KEYS / 8>& s, thread const Fragments<D / 8>& q,
                               thread const float* q_block_sum, threadgroup T* tile, int first_row, CacheTile<T> src,
                               FragmentCoord fc) {
    constexpr int BLOCKS = kv_affine_blocks<D>();
    Fragments<KEYS / 8> dots[BLOCKS];
    UNROLL_FRAGMENTS
    for (int b = 0; b < BLOCKS; ++b) {
        Fragments<4> q_block;
        UNROLL_FRAGMENTS
        for (int d = 0; d < 4; ++d) q_block.frag[d] = q.frag[4 * b + d];
        qk_tile<T, KV_AFFINE_BLOCK, KEYS, LD>(dots[b], q_block, tile + first_row * LD + KV_AFFINE_BLOCK * b);
    }
    fold_scores<KEYS / 8, BLOCKS>(s, dots, q_block_sum, tile_affine<T, D, BK, LD>(tile, first_row, src), fc);
}

// O += P V for the KEYS keys of an affine code tile from tile row `first_row` (value_bias: per block).
template <typename T, int D, int BK, int KEYS, int LD>
METAL_FUNC void affine_pv_tile(thread Fragments<D / 8>& o, thread float* value_bias, thread const Fragments<KEYS / 8>& p,
                               threadgroup T* tile, int first_row, CacheTile<T> src, FragmentCoord fc) {
    constexpr int BLOCKS = kv_affine_blocks<D>();
    Fragments<KEYS / 8> scaled_p[BLOCKS];
    scale_probabilities<KEYS / 8, BLOCKS>(scaled_p, value_bias, p, tile_affine<T, D, BK, LD>(tile, first_row, src), fc);
    UNROLL_FRAGMENTS
    for (int b = 0; b < BLOCKS; ++b) {
        Fragments<4> o_block;
        UNROLL_FRAGMENTS
        for (int d = 0; d < 4; ++d) o_block.frag[d] = o.frag[4 * b + d];
        pv_tile<T, KV_AFFINE_BLOCK, KEYS, LD>(o_block, scaled_p[b], tile + first_row * LD + KV_AFFINE_BLOCK * b);
        UNROLL_FRAGMENTS
        for (int d = 0; d < 4; ++d) o.frag[4 * b + d] = o_block.frag[d];
    }
}

// ------------------------------------------------------------------------------------- affine codes in registers
// The decode kernel's direct path reads, per lane, runs of N = 4 or 8 consecutive codes of one affine row (the run
// starts at a multiple of N elements, so its N * BITS / 8 bytes are aligned to their size) and multiplies the raw codes
// (exact in every T: at most 255) in MMAs; the affine map is applied outside the inner loop (decode.metal). Its vector
// path reads runs of 8 as fp32 for per-lane multiply-adds. Every loop is unrolled: the arrays stay in registers.
#define UNROLL_RUN _Pragma("clang loop unroll(full)")

// A word's 4 bytes as 4 codes of type C (one vector conversion, as the GPU converts: an instruction per element).
METAL_FUNC void widen(thread uint4& codes, uchar4 bytes) { codes = uint4(bytes); }
METAL_FUNC void widen(thread float4& codes, uchar4 bytes) { codes = float4(bytes); }

// Codes [first, first + N) of the row at `at` = the row's byte `first * BITS / 8`, as C (uint for the MMAs, float for
// the vector path). A byte is a code as it is (uchar4); a 4-bit byte holds elements 2 i (low nibble) and 2 i + 1 (high).
// HIGH_X16: a high nibble is left in place, 16 x its code (one shift fewer per word; the caller weighs odd elements
// 1/16).
template <int BITS, int N, typename C = uint, bool HIGH_X16 = false>
METAL_FUNC void load_codes(thread C* codes, const device uchar* at) {
    constexpr int BYTES = N * BITS / 8;   // 2, 4 or 8
    uint2 w = uint2(0u);
    if (BYTES == 2) w.x = *reinterpret_cast<const device ushort*>(at);
    else if (BYTES == 4) w.x = *reinterpret_cast<const device uint*>(at);
    else w = *reinterpret_cast<const device uint2*>(at);
    UNROLL_RUN
    for (int i = 0; i < (BYTES + 3) / 4; ++i) {
        if (BITS == 8) {
            vec<C, 4> c;
            widen(c, as_type<uchar4>(w[i]));
            UNROLL_RUN
            for (int j = 0; j < 4; ++j) codes[4 * i + j] = c[j];
        } else {
            vec<C, 4> low, high;
            widen(low, as_type<uchar4>(w[i] & 0x0F0F0F0Fu));
            widen(high, as_type<uchar4>(HIGH_X16 ? w[i] & 0xF0F0F0F0u : (w[i] >> 4) & 0x0F0F0F0Fu));
            UNROLL_RUN
            for (int j = 0; j < min(4, N / 2); ++j) {
                codes[8 * i + 2 * j] = low[j];
                codes[8 * i + 2 * j + 1] = high[j];
            }
        }
    }
}

template <int BITS, int N, int RUNS, int STRIDE>
METAL_FUNC void load_runs(thread uint (*codes)[N], const device uchar* row, int first) {
    const device uchar* at = row + first * BITS / 8;   // one address per row: the runs sit at constant distances
    UNROLL_RUN
    for (int r = 0; r < RUNS; ++r) load_codes<BITS, N>(codes[r], at + r * STRIDE * BITS / 8);
}

// RUNS runs of N codes of the affine row at `offset` (cache words; negative: no key, zeros), run r at element
// first + r * STRIDE.
template <typename T, int N, int RUNS, int STRIDE>
METAL_FUNC void row_codes(thread uint (*codes)[N], CacheTile<T> src, int64_t offset, int first) {
    if (offset < 0) {
        UNROLL_RUN
        for (int r = 0; r < RUNS; ++r) {
            UNROLL_RUN
            for (int i = 0; i < N; ++i) codes[r][i] = 0u;
        }
        return;
    }
    const device uchar* row = src.head + offset * PACKED_WORD_BYTES;
    if (src.bits == 4) load_runs<4, N, RUNS, STRIDE>(codes, row, first);
    else load_runs<8, N, RUNS, STRIDE>(codes, row, first);
}

// The (scale, bias) of group `group` of a key whose scales and biases start at `scale_offset` ((0, 0) when there is no
// key or the group does not exist).
template <typename T>
METAL_FUNC float2 affine_group_at(CacheTile<T> src, bool key, int64_t scale_offset, int group, bool exists) {
    if (!exists || !key) return float2(0.0f);
    const int64_t at = scale_offset + group;
    return float2(float(src.scales[at]), float(src.biases[at]));
}
