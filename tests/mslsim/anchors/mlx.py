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


def steel_attention(lib, q, k, v, scale, causal=False, **dispatch):
    """MLX's tiled attention: BQ = 32 queries per threadgroup of 4 simdgroups, BK = 32 keys (16 for D >= 128)."""
    _check_layout(q, k, v)
    B, H, qL, D = q.shape
    Hkv, kL = k.shape[1], k.shape[2]
    bq, bk = 32, 32 if D < 128 else 16
    nq, nk = -(-qL // bq), -(-kL // bk)
    out = torch.empty_like(q)
    strides = lambda t: t.stride()[:3]   # noqa: E731  (B, H, L; D is contiguous)
    params = struct.pack("<6if7i12q", B, H, D, qL, kL, H // Hkv, scale, nq, nk, qL // bq, kL // bk,
                         qL - qL // bq * bq, kL - kL // bk * bk, kL - qL,
                         *strides(q), *strides(k), *strides(v), *strides(out))
    constants = {200: qL % bq == 0, 201: kL % bk == 0, 300: False, 301: causal, 302: False, 303: False}
    name = f"steel_attention_{TYPE_NAMES[q.dtype]}_bq{bq}_bk{bk}_bd{D}_wm4_wn1_mask{TYPE_NAMES[q.dtype]}"
    stats = lib.dispatch(name, (nq, H, B), (32, 4, 1), {0: q, 1: k, 2: v, 3: out, 4: params}, constants, **dispatch)
    return out, stats
