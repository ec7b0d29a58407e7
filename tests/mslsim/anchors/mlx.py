"""MLX's attention kernels in the simulator: host-side launch construction for the instantiations beside this
file, following mlx/backend/metal/scaled_dot_product_attention.cpp (sdpa_vector for one query per head,
sdpa_full_self_attention_metal for the tiled "steel" kernel), on row-contiguous [B, H, L, D] tensors.

Shared by the anchor tests and by profiling tools that compare our shaders with MLX's on the same shapes:
each run returns the output and the launch's LaunchStats.
"""
from __future__ import annotations

import struct
from pathlib import Path

import torch

import mslsim
from scripts.fetch_mlx_metal import include_dir

HERE = Path(__file__).resolve().parent
TYPE_NAMES = {torch.float32: "float", torch.float16: "half", torch.bfloat16: "bfloat16_t"}


def library() -> mslsim.Library:
    """Both MLX kernel files as one library (fetches the headers on first use: FetchError without network)."""
    return mslsim.load(HERE / "mlx_sdpa_vector.metal", HERE / "mlx_steel_attention.metal", include_dirs=[include_dir()])


def _check_layout(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4 or not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous [B, H, L, D] tensor, got shape {tuple(t.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} are not a multiple of key/value heads {k.shape[1]}")


def sdpa_vector(lib, q, k, v, scale, causal=False, **dispatch):
    """MLX's sdpa_vector: one threadgroup of 1024 threads per (batch x head, query)."""
    _check_layout(q, k, v)
    B, H, qL, D = q.shape
    Hkv, kL = k.shape[1], k.shape[2]
    out = torch.empty_like(q)
    buffers = {0: q, 1: k, 2: v, 3: out, 4: struct.pack("<i", H // Hkv), 5: struct.pack("<i", kL),
               6: struct.pack("<Q", kL * D), 7: struct.pack("<Q", D), 8: struct.pack("<Q", kL * D),
               9: struct.pack("<Q", D), 10: struct.pack("<f", scale)}
    constants = {20: False, 21: False, 22: causal, 23: False, 24: False, 25: False}
    stats = lib.dispatch(f"sdpa_vector_{TYPE_NAMES[q.dtype]}_{D}_{D}", (B * H, qL, 1), 1024, buffers, constants,
                         **dispatch)
    return out, stats


def two_pass_blocks(gqa_factor, q_len, n_keys, arch_letter="s"):
    """Key blocks of MLX's 2-pass decode, as sdpa_vector_2pass in scaled_dot_product_attention.cpp picks them
    (ml-explore/mlx; the same rule as mlx-metal 0.32.4's headers): by the GPU architecture's last letter
    ('s' = Max chips, e.g. M3 Max applegpu_g15s, per mlx#4022; 'd' = Ultra) and the simdgroups per threadgroup."""
    n_simds = gqa_factor * q_len
    if arch_letter == "s":
        if n_keys > 1024 and n_simds > 4:
            return 128 if n_keys <= 8192 else 256 if n_keys <= 32768 else 512 if n_keys <= 65536 else 1024
        return 64
    if arch_letter == "d":
        if n_simds <= 2 and n_keys > 8192:
            return 256
        if n_simds >= 6 and n_keys >= 16384:
            return 512 if n_keys < 65536 else 1024
        return 128
    return 64 if n_simds >= 4 else 32


def uses_two_pass(heads, kv_heads, n_keys, arch_letter="s"):
    """MLX's routing of single-query attention (ScaledDotProductAttention::eval_gpu): 2-pass on Max/Ultra chips
    from 1024 keys, or with GQA from 4096 keys."""
    return (arch_letter in "ds" and n_keys >= 1024) or (kv_heads < heads and n_keys >= 4096)


# MLX's instantiations of sdpa_vector_2pass_1_gqa: (head dim, G) -> HPT (query heads per simdgroup).
GQA_PASS1_HPT = {(64, 8): 8, (128, 8): 4, (128, 12): 4, (128, 16): 2}
# ... of which mlx_sdpa_vector.metal instantiates these (dtype, head dim, G).
GQA_PASS1_BUILT = {(torch.float16, 128, 8), (torch.float32, 64, 8)}
GQA_PASS1_MIN_KEYS = 8192


def uses_gqa_pass1(heads, kv_heads, q_len, n_keys, head_dim, value_dim=None, mask=False, sinks=False):
    """MLX's choice of the duplication-free pass 1 `sdpa_vector_2pass_1_gqa_<G>` inside sdpa_vector_2pass
    (ml-explore/mlx, mlx/backend/metal/scaled_dot_product_attention.cpp, the version matching the mlx-metal 0.32.4
    headers, whose sdpa_vector.h holds the <T, D, V, G, HPT> kernel): no mask, no sinks, one query, H == G x Hkv,
    equal QK and V head dims, G = 8 with D in {64, 128} or G in {12, 16} with D = 128, and >= 8192 keys.
    Read at ml-explore/mlx commit 00703ea6cc2d (its gqa_dims test); ml-explore/mlx#4077 (fa0d4463e, in 0.32.2)
    first routed G = 8 only, to a kernel named without the G. The 0.32.4 headers' kernel takes any G (HPT | G)."""
    G = heads // kv_heads
    value_dim = head_dim if value_dim is None else value_dim
    return (not mask and not sinks and q_len == 1 and heads == G * kv_heads and head_dim == value_dim
            and (head_dim, G) in GQA_PASS1_HPT and n_keys >= GQA_PASS1_MIN_KEYS)


def sdpa_vector_2pass(lib, q, k, v, scale, arch_letter="s", gqa=None, **dispatch):
    """MLX's 2-pass decode: pass 1 grid (Hkv, B, blocks) of (32, G, qL) threads, key i in block i % blocks;
    pass 2 merges the blocks, one threadgroup of 1024 threads per (batch x head, query). Returns the output and
    both launches' LaunchStats. Pass 1 is the duplication-free `sdpa_vector_2pass_1_gqa_<G>` (grid (Hkv, B,
    blocks) of (32, G, 1) threads, each block a contiguous key chunk split among HPT sub-chunks) when MLX picks it
    (uses_gqa_pass1; gqa=True/False forces the choice, e.g. to test it on few keys), else the generic one."""
    _check_layout(q, k, v)
    B, H, qL, D = q.shape
    Hkv, kL = k.shape[1], k.shape[2]
    G = H // Hkv
    if gqa is None:
        gqa = uses_gqa_pass1(H, Hkv, qL, kL, D, v.shape[3])
    if gqa and qL != 1:
        raise ValueError(f"sdpa_vector_2pass_1_gqa takes one query per head, got {qL}")
    if gqa and (q.dtype, D, G) not in GQA_PASS1_BUILT:
        raise NotImplementedError(f"sdpa_vector_2pass_1_gqa for {q.dtype}, D {D}, G {G} is not instantiated in "
                                  f"mlx_sdpa_vector.metal (built: {sorted(map(str, GQA_PASS1_BUILT))})")
    blocks = two_pass_blocks(G, qL, kL, arch_letter)
    partials = torch.empty(B, H, qL, blocks, D, dtype=q.dtype)
    sums, maxs = (torch.empty(B, H, qL, blocks) for _ in range(2))
    out = torch.empty_like(q)
    buffers = {0: q, 1: k, 2: v, 3: partials, 4: sums, 5: maxs, 7: struct.pack("<i", kL),
               8: struct.pack("<Q", kL * D), 9: struct.pack("<Q", D), 10: struct.pack("<Q", kL * D),
               11: struct.pack("<Q", D), 12: struct.pack("<f", scale)}
    constants = {20: False, 21: False, 22: False, 23: False, 24: False, 25: False, 26: blocks}
    name = TYPE_NAMES[q.dtype]
    pass1 = f"sdpa_vector_2pass_1_gqa_{G}_{name}_{D}_{D}" if gqa else f"sdpa_vector_2pass_1_{name}_{D}_{D}"
    first = lib.dispatch(pass1, (Hkv, B, blocks), (32, G, 1 if gqa else qL), buffers, constants, **dispatch)
    second = lib.dispatch(f"sdpa_vector_2pass_2_{name}_{D}", (B * H, qL, 1), 1024,
                          {0: partials, 1: sums, 2: maxs, 3: out, 4: struct.pack("<i", blocks)},
                          {20: False, 21: False, 22: False, 23: False, 24: False, 25: False, 26: blocks}, **dispatch)
    return out, [first, second]


def steel_tiles(head_dim):
    """(BQ, BK) of MLX's steel attention: 32 queries per threadgroup, 32 keys per tile (16 for D >= 128)."""
    return 32, 32 if head_dim < 128 else 16


def steel_attention(lib, q, k, v, scale, causal=False, mask=None, sinks=None, **dispatch):
    """MLX's tiled attention: threadgroups of 4 simdgroups over steel_tiles(D) query rows x keys.
    mask: an optional boolean [qL, kL] mask (True = attend), shared by all batches and heads, as MLX takes a
    window; sinks: optional [H] attention-sink logits."""
    _check_layout(q, k, v)
    B, H, qL, D = q.shape
    Hkv, kL = k.shape[1], k.shape[2]
    bq, bk = steel_tiles(D)
    nq, nk = -(-qL // bq), -(-kL // bk)
    out = torch.empty_like(q)
    strides = lambda t: t.stride()[:3]   # noqa: E731  (B, H, L; D is contiguous)
    params = struct.pack("<6if7i12q", B, H, D, qL, kL, H // Hkv, scale, nq, nk, qL // bq, kL // bk,
                         qL - qL // bq * bq, kL - kL // bk * bk, kL - qL,
                         *strides(q), *strides(k), *strides(v), *strides(out))
    constants = {200: qL % bq == 0, 201: kL % bk == 0, 300: mask is not None, 301: causal, 302: sinks is not None,
                 303: False}
    buffers = {0: q, 1: k, 2: v, 3: out, 4: params}
    if mask is not None:
        buffers[5], buffers[6] = struct.pack("<3q", 0, 0, kL), mask.contiguous()
    if sinks is not None:
        buffers[7] = sinks.to(q.dtype).contiguous()
    mask_type = "bool" if mask is not None else TYPE_NAMES[q.dtype]
    name = f"steel_attention_{TYPE_NAMES[q.dtype]}_bq{bq}_bk{bk}_bd{D}_wm4_wn1_mask{mask_type}"
    stats = lib.dispatch(name, (nq, H, B), (32, 4, 1), buffers, constants, **dispatch)
    return out, stats
