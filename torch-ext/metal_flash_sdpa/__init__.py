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

from ._ops import add_op_namespace_prefix, ops

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "kv_cache_write", "quantize_kv",
           "dequantize_kv",
           "SUPPORTED_HEAD_DIMS", "FORWARD_HEAD_DIMS", "PREFILL_BLOCK_Q", "HEAD_PARTS", "KV_TILE_KEYS", "DECODE_MAX_PARTITIONS",
           "DECODE_SCRATCH_BYTES", "DECODE_MAX_NEW_TOKENS", "BACKWARD_BLOCK_Q", "BACKWARD_BLOCK_K",
           "BACKWARD_TILE_QUERIES"]

_constants = ops.kernel_constants()
SUPPORTED_HEAD_DIMS: tuple[int, ...] = tuple(_constants["head_dims"])   # head dims with a kernel (every op)
# (q/k head dim, v head dim) pairs of the forward ops (prefill, decode; no backward): SUPPORTED_HEAD_DIMS as (D, D),
# wider heads, and V narrower than K (flash-attn 3's headdim_v; out has V's head dim)
FORWARD_HEAD_DIMS: tuple[tuple[int, int], ...] = (
    tuple((d, d) for d in SUPPORTED_HEAD_DIMS + tuple(_constants["forward_only_head_dims"]))
    + tuple(zip(_constants["head_dim_pairs"][::2], _constants["head_dim_pairs"][1::2])))
PREFILL_BLOCK_Q: int = _constants["prefill_block_q"][0]                 # query rows per prefill threadgroup
KV_TILE_KEYS: dict[int, int] = dict(zip(_constants["forward_head_dims"], _constants["kv_tile_keys"]))   # per q/k head dim
HEAD_PARTS: dict[int, int] = dict(zip(SUPPORTED_HEAD_DIMS + tuple(_constants["forward_only_head_dims"]),
                                     _constants["head_parts"]))   # simdgroups sharing 8 query rows, per v head dim
DECODE_MAX_PARTITIONS: int = _constants["decode_max_partitions"][0]     # split-K partitions per sequence, at most
DECODE_SCRATCH_BYTES: int = _constants["decode_scratch_bytes"][0]       # split-K scratch per decode call, at most
DECODE_MAX_NEW_TOKENS: int = _constants["decode_max_new_tokens"][0]     # flash_attn_func runs the decode kernel up to this Sq
BACKWARD_BLOCK_Q: int = _constants["backward_block_q"][0]               # query rows per delta / dQ-reduce threadgroup
BACKWARD_BLOCK_K: int = _constants["backward_block_k"][0]               # keys per block of the fused kernel
BACKWARD_TILE_QUERIES: dict[torch.dtype, dict[int, int]] = {            # query rows per fused-kernel tile
    dtype: dict(zip(SUPPORTED_HEAD_DIMS, _constants[f"backward_tile_queries_{bits}bit"]))
    for dtype, bits in [(torch.float32, 32), (torch.float16, 16), (torch.bfloat16, 16)]}

IntOrTensor = Union[int, torch.Tensor]
_INT64 = range(-2**63, 2**63)
_INT32 = range(-2**31, 2**31)


def _to_int(value: IntOrTensor, name: str, read_device: bool = False) -> int:
    """ints, or 0-d integer tensors as transformers passes them. A tensor whose value would need a device->host
    sync (not on the CPU, or traced) gives -1, "unknown" (the ops then bound lengths by the token totals), unless
    read_device: window edges define the mask, so a device tensor there costs one sync (pass ints to avoid it)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.is_complex():
            raise TypeError(f"{name} must be an int or a 0-d integer tensor, got a {value.dtype} tensor of shape "
                            f"{tuple(value.shape)}")
        if torch.compiler.is_compiling() or (value.device.type != "cpu" and not read_device):
            return -1
        value = int(value.item())
    elif isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or a 0-d integer tensor, got {type(value).__name__}")
    if value not in _INT64:
        raise ValueError(f"{name} = {value} does not fit a 64-bit integer")
    return value


def _window(window_size: Sequence[IntOrTensor]) -> tuple[int, int]:
    if window_size is None:
        return -1, -1
    if isinstance(window_size, torch.Tensor) or len(window_size) != 2:
        raise ValueError(f"window_size must be (left, right), got {window_size!r}")
    left, right = (_to_int(w, "window_size", read_device=True) for w in window_size)
    return left, right   # the ops check the values (>= -1) and clamp windows wider than the sequences


def _check_tensors(**tensors) -> None:
    """Tensor arguments are tensors (None where optional): a TypeError naming the argument, not an AttributeError."""
    for name, value in tensors.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _softmax_scale(q: torch.Tensor, dropout_p: float, softmax_scale: Optional[float]) -> Optional[float]:
    """Checks only the wrappers can make (q's type, dropout); the ops check everything else and default the
    scale to 1/sqrt(head_dim) once they know q's shape is valid."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if dropout_p != 0.0:
        raise NotImplementedError(f"dropout_p={dropout_p}: metal-flash-sdpa has no dropout; pass dropout_p=0.0")
    return None if softmax_scale is None else float(softmax_scale)


def _seqlens(value: Union[int, torch.Tensor], device) -> torch.Tensor:
    """cache_seqlens as the ops take it: an int32 tensor [batch] or 0-d (one value for every sequence)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"cache_seqlens must be an int or an int32 tensor [batch], got {type(value).__name__}")
    if value not in _INT32:
        raise ValueError(f"cache_seqlens = {value} does not fit int32 (the cache positions are int32)")
    return torch.full((), value, dtype=torch.int32, device=device)   # filled on the device: no host->device copy


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
    seqused_k: Optional[torch.Tensor] = None,
):
    """Attention over a packed batch of variable-length sequences (flash-attn 2 `flash_attn_varlen_func`).

    q: [total_q, H, D]; k, v: [total_k, Hkv, D] with H % Hkv == 0; cu_seqlens_q/k: int32 [B + 1] prefix sums
    of the sequence lengths; max_seqlen_q/k: the longest lengths (ints or 0-d tensors). s_aux: [H] sink
    logits. D in SUPPORTED_HEAD_DIMS; fp16, bf16 or fp32.

    Paged KV (chunked prefill, prefix caching; flash-attn 2 semantics): with block_table int32 [B, max_blocks], k and
    v are paged caches [num_blocks, block_size, Hkv, D] (strided views welcome) read in place, and sequence b's keys
    are its first cu_seqlens_k[b + 1] - cu_seqlens_k[b] cache positions -- or seqused_k[b] (int32 [B], flash-attn 3 /
    vLLM style; cu_seqlens_k may then be None). Its queries are the last ones of those keys (bottom-right aligned),
    so one call mixes one-token decode rows with long chunks. seqused_k without block_table: sequence b uses the
    first seqused_k[b] keys of its cu_seqlens_k span. Neither has a backward (backward() raises).

    Returns out [total_q, H, D], or (out, softmax_lse [H, total_q] fp32, None) with return_attn_probs.
    `deterministic` is accepted for compatibility (the kernel is always deterministic).
    """
    scale = _softmax_scale(q, dropout_p, softmax_scale)
    _check_tensors(k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, alibi_slopes=alibi_slopes,
                   s_aux=s_aux, block_table=block_table, seqused_k=seqused_k)
    if cu_seqlens_q is None or (cu_seqlens_k is None and (block_table is None or seqused_k is None)):
        raise TypeError("cu_seqlens_q and cu_seqlens_k must be int32 tensors [batch + 1] (cu_seqlens_k may be None "
                        "only with block_table and seqused_k)")
    left, right = _window(window_size)
    out, lse = ops.flash_attn_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, _to_int(max_seqlen_q, "max_seqlen_q"),
        _to_int(max_seqlen_k, "max_seqlen_k"), scale, bool(causal), left, right, float(softcap or 0.0),
        alibi_slopes, s_aux, block_table, seqused_k)
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
    seqused_k: Optional[torch.Tensor] = None,
):
    """Attention over a batch of equal-length sequences (flash-attn 2 `flash_attn_func`).

    q: [B, Sq, H, D]; k, v: [B, Sk, Hkv, D]; Sq may differ from Sk (masks are bottom-right aligned, so
    decoding with Sq = 1 < Sk works). Strided views (e.g. `x.transpose(1, 2)`) are read in place.
    Accepts the same optional arguments as flash_attn_varlen_func (block_table and seqused_k need the varlen
    layout). Returns out [B, Sq, H, D], or (out, softmax_lse [B, H, Sq] fp32, None) with return_attn_probs.
    """
    scale = _softmax_scale(q, dropout_p, softmax_scale)
    for name, value in (("block_table", block_table), ("seqused_k", seqused_k)):
        if value is not None:
            raise NotImplementedError(f"{name} is not supported by flash_attn_func (batched layout): use "
                                      "flash_attn_varlen_func (paged prefill) or flash_attn_with_kvcache")
    _check_tensors(k=k, v=v, alibi_slopes=alibi_slopes, s_aux=s_aux)
    left, right = _window(window_size)
    out, lse = ops.flash_attn_varlen(
        q, k, v, None, None, -1, -1, scale, bool(causal), left, right, float(softcap or 0.0), alibi_slopes, s_aux)
    return (out, lse, None) if return_attn_probs else out


def quantize_kv(x: torch.Tensor, bits: int = 4, group_size: int = 64):
    """Affine group quantization of x [..., D] (fp16, bf16, fp32) over groups of group_size (32, 64, 128) elements
    of the last dim, bits 4 or 8: returns (packed uint32 [..., D * bits / 32], scales, biases [..., D / group_size]
    in x's dtype), bit for bit what `mlx.core.quantize(x, group_size, bits)` (mode "affine") returns. Runs the
    KV write kernel (the one that quantizes appended tokens), so it is the cache format exactly."""
    _check_tensors(x=x)
    return ops.quantize_kv(x, _to_int(bits, "bits"), _to_int(group_size, "group_size"))


def dequantize_kv(packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int = 4,
                  group_size: int = 64) -> torch.Tensor:
    """The inverse of quantize_kv: code * scale + bias in the scales' dtype, rounded after the product and after
    the sum, bit for bit `mlx.core.dequantize` (mode "affine") on its CPU stream. Plain torch ops (a utility and
    the tests' reference: the decode kernel dequantizes inside its K/V tile loads)."""
    _check_tensors(packed=packed, scales=scales, biases=biases)
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if packed.dtype != torch.uint32:
        raise TypeError(f"packed must be torch.uint32 words (from quantize_kv), got {packed.dtype}")
    dim = packed.shape[-1] * 32 // bits if packed.dim() else 0
    expected = (*packed.shape[:-1], dim // group_size) if group_size and dim % group_size == 0 else None
    for name, t in (("scales", scales), ("biases", biases)):
        if expected is None or tuple(t.shape) != expected or not t.is_floating_point():
            raise ValueError(f"{name} must be a float tensor of shape [..., D / group_size] = {expected} for packed of "
                             f"shape {tuple(packed.shape)}, bits={bits}, group_size={group_size}; got {t.dtype} "
                             f"{tuple(t.shape)}")
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    codes = (packed.view(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    groups = codes.flatten(-2).to(scales.dtype).unflatten(-1, (dim // group_size, group_size))
    return (groups * scales.unsqueeze(-1) + biases.unsqueeze(-1)).flatten(-2)


def _kv_quant_args(k_scales, k_biases, v_scales, v_biases, kv_bits, kv_group_size, k_descale, v_descale) -> tuple:
    """The quantized-cache arguments as the ops take them: kv_bits is one int for K and V or (k_bits, v_bits)."""
    _check_tensors(k_scales=k_scales, k_biases=k_biases, v_scales=v_scales, v_biases=v_biases, k_descale=k_descale,
                   v_descale=v_descale)
    if kv_bits is None:
        k_bits = v_bits = 0
    elif isinstance(kv_bits, (tuple, list)) and len(kv_bits) == 2:
        k_bits, v_bits = (_to_int(b, "kv_bits") for b in kv_bits)
    else:
        k_bits = v_bits = _to_int(kv_bits, "kv_bits")
    return (k_scales, k_biases, v_scales, v_biases, k_bits, v_bits, _to_int(kv_group_size, "kv_group_size"),
            k_descale, v_descale)


def kv_cache_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   block_table: torch.Tensor, cache_seqlens, *, k_scales: Optional[torch.Tensor] = None,
                   k_biases: Optional[torch.Tensor] = None, v_scales: Optional[torch.Tensor] = None,
                   v_biases: Optional[torch.Tensor] = None, kv_bits=None, kv_group_size: int = 64,
                   k_descale: Optional[torch.Tensor] = None, v_descale: Optional[torch.Tensor] = None) -> None:
    """Write new keys/values k, v [B, n, Hkv, D] into a paged cache [num_blocks, block_size, Hkv, D] in place,
    token i of sequence b at position cache_seqlens[b] + i through block_table [B, max_blocks] (int32), in one
    dispatch. With data checks on (see the README's input contract), positions beyond the table or blocks outside
    the cache raise ValueError and nothing is written; with them off, such tokens are dropped.

    Quantized caches (see flash_attn_with_kvcache) take the same keyword arguments; the rows are quantized on write
    (each affine group's scale and bias written beside it, exactly as quantize_kv would make them)."""
    _check_tensors(k=k, v=v, k_cache=k_cache, v_cache=v_cache, block_table=block_table)
    ops.kv_cache_write(k, v, k_cache, v_cache, block_table, _seqlens(cache_seqlens, k.device),
                       *_kv_quant_args(k_scales, k_biases, v_scales, v_biases, kv_bits, kv_group_size, k_descale,
                                       v_descale))


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
    k_scales: Optional[torch.Tensor] = None,
    k_biases: Optional[torch.Tensor] = None,
    v_scales: Optional[torch.Tensor] = None,
    v_biases: Optional[torch.Tensor] = None,
    kv_bits=None,
    kv_group_size: int = 64,
    k_descale: Optional[torch.Tensor] = None,
    v_descale: Optional[torch.Tensor] = None,
):
    """Attention of new queries against a KV cache (flash-attn 2 `flash_attn_with_kvcache`), Flash-Decoding.

    q [B, Sq, H, D]. Cache: paged [num_blocks, block_size, Hkv, D] with block_table int32 [B, max_blocks], or
    contiguous [B_cache, S_max, Hkv, D] (rows picked by cache_batch_idx, default 0..B-1). New k, v
    [B, Sq_new, Hkv, D], if given, are written into the cache in place at cache_seqlens (tokens already
    cached, int or int32 [B]; default: the whole cache) before attending; queries are bottom-right aligned to
    the keys. cache_leftpad (contiguous caches): first valid key per sequence. num_splits: 0 = heuristic
    (enough partitions to fill the GPU's cores; see README "Decode"), 1 = no split, n = n partitions; at most DECODE_MAX_PARTITIONS and
    DECODE_SCRATCH_BYTES of scratch either way. Returns out [B, Sq, H, D], or (out, lse [B, H, Sq])
    with return_softmax_lse. Rotary embedding is not applied here: pass rotated q/k.

    Quantized caches, dequantized inside the kernel (k and v independently): torch.uint32 words [..., Hkv,
    D * bits / 32] with kv_bits (4 or 8; an int or (k_bits, v_bits)), kv_group_size (32, 64, 128) and
    k_scales / k_biases (v_...) [..., Hkv, D / kv_group_size] in q's dtype -- the layout of quantize_kv and of
    mlx.core.quantize; or fp8 e4m3 (torch.float8_e4m3fn, or a uint8 view) with k_descale / v_descale fp32
    [B, Hkv] (flash-attn 3: the cache holds x / descale). New k, v (q's dtype) are quantized as they are appended.
    """
    scale = _softmax_scale(q, 0.0, softmax_scale)
    if rotary_cos is not None or rotary_sin is not None:
        raise NotImplementedError("rotary_cos/rotary_sin are not supported: apply the rotary embedding to q and k "
                                  "before calling flash_attn_with_kvcache")
    _check_tensors(k_cache=k_cache, v_cache=v_cache, k=k, v=v, cache_batch_idx=cache_batch_idx,
                   cache_leftpad=cache_leftpad, block_table=block_table, alibi_slopes=alibi_slopes, s_aux=s_aux)
    if k_cache is None or v_cache is None:
        raise TypeError("k_cache and v_cache must be tensors")
    cached = None if cache_seqlens is None else _seqlens(cache_seqlens, q.device)
    left, right = _window(window_size)
    # One op appends k/v and attends: it checks everything first, so a rejected call writes nothing.
    out, lse = ops.flash_attn_decode(q, k_cache, v_cache, k, v, block_table, cache_batch_idx, cached, cache_leftpad,
                                     _to_int(num_splits, "num_splits"), scale, bool(causal), left, right,
                                     float(softcap or 0.0), alibi_slopes, s_aux,
                                     *_kv_quant_args(k_scales, k_biases, v_scales, v_biases, kv_bits, kv_group_size,
                                                     k_descale, v_descale))
    return (out, lse) if return_softmax_lse else out


def _no_backward_error(op_name: str) -> NotImplementedError:
    return NotImplementedError(
        f"metal-flash-sdpa's {op_name} has no backward pass (KV-cache inference only): run it under "
        "torch.no_grad() / torch.inference_mode(), or detach its inputs; for training call flash_attn_varlen_func "
        "or flash_attn_func, which have a backward")


def _varlen_setup_context(ctx, inputs, output):
    """Runs only when some input requires grad: saves what the backward reads (no n^2 tensor: the LSE stands in for P)."""
    q, k, v, cu_seqlens_q, cu_seqlens_k, *options, alibi_slopes, s_aux, block_table, seqused_k = inputs
    ctx.no_backward = "block_table" if block_table is not None else "seqused_k" if seqused_k is not None else None
    ctx.save_for_backward(q, k, v, *output, cu_seqlens_q, cu_seqlens_k, alibi_slopes, s_aux)
    ctx.options = options   # max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap
    ctx.set_materialize_grads(False)   # an unused LSE gives None, not a zero tensor the kernel would read


def _varlen_backward(ctx, dout, dlse):
    if ctx.no_backward:
        raise NotImplementedError(
            f"flash_attn_varlen_func with {ctx.no_backward} (paged KV / seqused_k: inference only) has no backward: "
            "run it under torch.no_grad() / torch.inference_mode(), or detach its inputs; for training pass "
            "contiguous k/v [total_k, Hkv, D] with cu_seqlens_k")
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, s_aux = ctx.saved_tensors
    none = (None,) * 10   # cu_seqlens, max_seqlen, scale, causal, window, softcap, alibi_slopes: no gradient
    if dout is None and dlse is None:
        return None, None, None, *none, None, None, None
    dout = torch.zeros_like(out) if dout is None else dout
    # Only the gradients of inputs that require grad are computed (output_mask; s_aux's needs delta only).
    wanted = [bool(x) for x in ctx.needs_input_grad[:3]]
    sinks = s_aux if ctx.needs_input_grad[13] else None   # input 13: s_aux
    dq, dk, dv, ds_aux = ops.flash_attn_varlen_backward(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k,
                                                        *ctx.options, alibi_slopes, sinks, 0, wanted)
    dq, dk, dv = (grad if w else None for grad, w in zip((dq, dk, dv), wanted))
    return dq, dk, dv, *none, (ds_aux if sinks is not None else None), None, None


class _DecodeNoBackward(torch.autograd.Function):
    """Connects the decode op's outputs to the inputs that require grad, with a backward that raises."""

    @staticmethod
    def forward(ctx, out, lse, *inputs):
        return out.view_as(out), lse.view_as(lse)

    @staticmethod
    def backward(ctx, *grads):
        raise _no_backward_error("flash_attn_decode")


def _decode_autograd(*args):
    with torch._C._AutoDispatchBelowAutograd():
        out, lse = ops.flash_attn_decode(*args)
    needs_grad = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if torch.is_grad_enabled() and needs_grad:
        out, lse = _DecodeNoBackward.apply(out, lse, *needs_grad)
    return out, lse


# The prefill op (flash_attn_varlen_func, flash_attn_func) has a fused backward (backward.metal). The decode op
# has none: the forward works (as transformers sometimes runs inference with grad enabled) and backward() raises
# rather than silently drop attention's gradient. register_autograd takes functional ops only; the decode op
# mutates the caches, so it gets an Autograd kernel. Registered once per process (the compat sub-folder executes
# this module a second time).
if not torch._C._dispatch_has_kernel_for_dispatch_key(add_op_namespace_prefix("flash_attn_decode"), "Autograd"):
    torch.library.register_autograd(add_op_namespace_prefix("flash_attn_varlen"), _varlen_backward,
                                    setup_context=_varlen_setup_context)
    _autograd_lib = torch.library.Library(add_op_namespace_prefix("x").split("::")[0], "IMPL")
    _autograd_lib.impl("flash_attn_decode", _decode_autograd, "Autograd")


def simulator_counters(reset: bool = False) -> dict:
    """Simulator build only (not public API): work done by the simulated shaders since the last reset, for the
    tests, the demo and the benchmarks: launches, threadgroups, device bytes read/written (total and per
    buffer index) and the shaders' WORK_COUNT counters such as k_tiles_loaded."""
    if not hasattr(ops, "simulator_counters"):
        raise RuntimeError("simulator_counters() exists only in the CPU (simulator) build of metal-flash-sdpa")
    return dict(ops.simulator_counters(reset))
