"""Flash attention for Apple Silicon GPUs (Metal), with flash-attn 2 compatible entry points.

    from kernels import get_kernel
    fa = get_kernel("kernels-community/metal-flash-sdpa", version=2)
    out = fa.flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    causal=True, window_size=(127, 0), s_aux=sinks)

Semantics follow flash-attn >= 2.1: causal and window masks are bottom-right aligned, window_size is
(left, right) with -1 unbounded, softcap 0 means off. `s_aux` adds one sink logit per query head to the
softmax denominator (gpt-oss). The CPU build of this package runs the same Metal shaders in a simulator.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ._ops import ops

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "kv_cache_write",
           "SUPPORTED_HEAD_DIMS", "PREFILL_BLOCK_Q", "KV_TILE_KEYS", "DECODE_PARTITION_SIZE"]

_constants = ops.kernel_constants()
SUPPORTED_HEAD_DIMS: tuple[int, ...] = tuple(_constants["head_dims"])   # head dims with a kernel
PREFILL_BLOCK_Q: int = _constants["prefill_block_q"][0]                 # query rows per prefill threadgroup
KV_TILE_KEYS: dict[int, int] = dict(zip(SUPPORTED_HEAD_DIMS, _constants["kv_tile_keys"]))   # keys per K/V tile
DECODE_PARTITION_SIZE: int = _constants["decode_partition_size"][0]     # keys per split-K partition (num_splits=0)

IntOrTensor = Union[int, torch.Tensor]


def _to_int(value: IntOrTensor, name: str) -> int:
    """ints, or 0-d tensors as transformers passes them; -1 when traced (the op then uses the real lengths)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point():
            raise TypeError(f"{name} must be an int or a 0-d integer tensor, got a {value.dtype} tensor of shape "
                            f"{tuple(value.shape)}")
        if torch.compiler.is_compiling():
            return -1
        return int(value.item())
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or a 0-d integer tensor, got {type(value).__name__}")
    return value


def _window(window_size: Sequence[IntOrTensor]) -> tuple[int, int]:
    if window_size is None:
        return -1, -1
    if len(window_size) != 2:
        raise ValueError(f"window_size must be (left, right), got {window_size!r}")
    left, right = (_to_int(w, "window_size") for w in window_size)
    return left, right   # the ops check the values (>= -1), also when traced


def _softmax_scale(q: torch.Tensor, dropout_p: float, softmax_scale: Optional[float]) -> float:
    """Checks only the wrappers can make (q's type, dropout); the ops check everything else."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if dropout_p != 0.0:
        raise NotImplementedError(f"dropout_p={dropout_p}: metal-flash-sdpa is inference-only; pass dropout_p=0.0")
    return q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: IntOrTensor,
    max_seqlen_k: IntOrTensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Sequence[IntOrTensor] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Optional[torch.Tensor] = None,
    s_aux: Optional[torch.Tensor] = None,
):
    """Attention over a packed batch of variable-length sequences (flash-attn 2 `flash_attn_varlen_func`).

    q: [total_q, H, D]; k, v: [total_k, Hkv, D] with H % Hkv == 0; cu_seqlens_q/k: int32 [B + 1] prefix sums
    of the sequence lengths; max_seqlen_q/k: the longest lengths (ints or 0-d tensors). s_aux: [H] sink
    logits. D in SUPPORTED_HEAD_DIMS; fp16, bf16 or fp32.

    Returns out [total_q, H, D], or (out, softmax_lse [H, total_q] fp32, None) with return_attn_probs.
    `deterministic` is accepted for compatibility (the kernel is always deterministic).
    """
    scale = _softmax_scale(q, dropout_p, softmax_scale)
    if block_table is not None:
        raise NotImplementedError("block_table (paged KV) is not supported by flash_attn_varlen_func; "
                                  "use flash_attn_with_kvcache for paged caches")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name} must be an int32 torch.Tensor [batch + 1], got {type(cu).__name__}")
    left, right = _window(window_size)
    out, lse = ops.flash_attn_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, _to_int(max_seqlen_q, "max_seqlen_q"),
        _to_int(max_seqlen_k, "max_seqlen_k"), scale, bool(causal), left, right, float(softcap or 0.0),
        alibi_slopes, s_aux)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Sequence[IntOrTensor] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Optional[torch.Tensor] = None,
    s_aux: Optional[torch.Tensor] = None,
):
    """Attention over a batch of equal-length sequences (flash-attn 2 `flash_attn_func`).

    q: [B, Sq, H, D]; k, v: [B, Sk, Hkv, D]; Sq may differ from Sk (masks are bottom-right aligned, so
    decoding with Sq = 1 < Sk works). Strided views (e.g. `x.transpose(1, 2)`) are read in place.
    Accepts the same optional arguments as flash_attn_varlen_func. Returns out [B, Sq, H, D], or
    (out, softmax_lse [B, H, Sq] fp32, None) with return_attn_probs.
    """
    scale = _softmax_scale(q, dropout_p, softmax_scale)
    if block_table is not None:
        raise NotImplementedError("block_table (paged KV) is not supported by flash_attn_func; "
                                  "use flash_attn_with_kvcache for paged caches")
    left, right = _window(window_size)
    out, lse = ops.flash_attn_varlen(
        q, k, v, None, None, -1, -1, scale, bool(causal), left, right, float(softcap or 0.0), alibi_slopes, s_aux)
    return (out, lse, None) if return_attn_probs else out


def _per_sequence(value, batch: int, device, name: str) -> torch.Tensor:
    """An int32 [batch] tensor from an int or a tensor (flash-attn accepts both for cache_seqlens)."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.expand(batch)
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or an int32 tensor [batch], got {type(value).__name__}")
    return torch.full((batch,), value, dtype=torch.int32, device=device)


def kv_cache_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   block_table: torch.Tensor, cache_seqlens) -> None:
    """Write new keys/values k, v [B, n, Hkv, D] into a paged cache [num_blocks, block_size, Hkv, D] in place,
    token i of sequence b at position cache_seqlens[b] + i through block_table [B, max_blocks] (int32), in one
    dispatch. Positions beyond the table or blocks outside the cache raise ValueError; nothing is written."""
    ops.kv_cache_write(k, v, k_cache, v_cache, block_table, _per_sequence(cache_seqlens, k.shape[0], k.device,
                                                                           "cache_seqlens"))


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
    rotary_cos: Optional[torch.Tensor] = None,
    rotary_sin: Optional[torch.Tensor] = None,
    cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
    cache_batch_idx: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Sequence[IntOrTensor] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: Optional[torch.Tensor] = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    s_aux: Optional[torch.Tensor] = None,
):
    """Attention of new queries against a KV cache (flash-attn 2 `flash_attn_with_kvcache`), Flash-Decoding.

    q [B, Sq, H, D]. Cache: paged [num_blocks, block_size, Hkv, D] with block_table int32 [B, max_blocks], or
    contiguous [B_cache, S_max, Hkv, D] (rows picked by cache_batch_idx, default 0..B-1). New k, v
    [B, Sq_new, Hkv, D], if given, are written into the cache in place at cache_seqlens (tokens already
    cached, int or int32 [B]; default: the whole cache) before attending; queries are bottom-right aligned to
    the keys. cache_leftpad (contiguous caches): first valid key per sequence. num_splits: 0 = heuristic
    (DECODE_PARTITION_SIZE-key partitions), 1 = no split, n = n partitions. Returns out [B, Sq, H, D], or (out, lse [B, H, Sq])
    with return_softmax_lse. Rotary embedding is not applied here: pass rotated q/k.
    """
    scale = _softmax_scale(q, 0.0, softmax_scale)
    if rotary_cos is not None or rotary_sin is not None:
        raise NotImplementedError("rotary_cos/rotary_sin are not supported: apply the rotary embedding to q and k "
                                  "before calling flash_attn_with_kvcache")
    if not isinstance(k_cache, torch.Tensor) or k_cache.dim() != 4:
        raise ValueError("k_cache must be a 4-D tensor: [num_blocks, block_size, kv_heads, head_dim] (with "
                         "block_table) or [batch, seqlen, kv_heads, head_dim]")
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, seqlen_q, heads, head_dim], got shape {tuple(q.shape)}")
    batch = q.shape[0]
    if block_table is None:   # a contiguous cache is a paged one with one block of S_max slots per sequence
        rows = cache_batch_idx if cache_batch_idx is not None else torch.arange(batch, dtype=torch.int32,
                                                                                device=q.device)
        if rows.dtype != torch.int32 or tuple(rows.shape) != (batch,):
            raise TypeError(f"cache_batch_idx must be an int32 tensor [batch] = [{batch}], got {rows.dtype} "
                            f"{tuple(rows.shape)}")
        table = rows.view(batch, 1)
    else:
        if cache_batch_idx is not None:
            raise NotImplementedError("cache_batch_idx with a paged cache: index block_table instead")
        if cache_leftpad is not None:
            raise NotImplementedError("cache_leftpad with a paged cache: start block_table at the first block instead")
        table = block_table
    capacity = (table.shape[1] if table.dim() == 2 else 0) * k_cache.shape[1]
    cached = _per_sequence(capacity if cache_seqlens is None else cache_seqlens, batch, q.device, "cache_seqlens")
    left, right = _window(window_size)
    # One op appends k/v and attends: it checks everything first, so a rejected call writes nothing.
    out, lse = ops.flash_attn_decode(q, k_cache, v_cache, k, v, table, cached, cache_leftpad, int(num_splits), scale,
                                     bool(causal), left, right, float(softcap or 0.0), alibi_slopes, s_aux)
    return (out, lse) if return_softmax_lse else out



def simulator_counters(reset: bool = False) -> dict:
    """Simulator build only (not public API): work done by the simulated shaders since the last reset, for the
    tests, the demo and the benchmarks: launches, threadgroups, device bytes read/written (total and per
    buffer index) and the shaders' WORK_COUNT counters such as k_tiles_loaded."""
    if not hasattr(ops, "simulator_counters"):
        raise RuntimeError("simulator_counters() exists only in the CPU (simulator) build of metal-flash-sdpa")
    return dict(ops.simulator_counters(reset))
