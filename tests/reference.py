"""Independent attention reference in PyTorch float64 (explicit masks, sinks, softcap, ALiBi). Never
shares code with the kernels; run in a low precision it also gives the baseline error of plain
PyTorch attention for flash-attn's tolerance rule."""
import math

import torch


def affine_values(packed, scales, biases, bits, group_size):
    """The exact values an affine quantized cache holds (README "Quantized KV caches"), in float64: scale * code +
    bias from the stored scales and biases; `packed` holds the codes little-endian in uint32 words."""
    words = packed.cpu().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    codes = ((words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2).double()
    expand = lambda t: t.cpu().double().repeat_interleave(group_size, dim=-1)   # noqa: E731
    return expand(scales) * codes + expand(biases)


def visible_keys(seqlen_q, seqlen_k, causal=False, window=(-1, -1)):
    """[seqlen_q, seqlen_k] bool: which keys each query row may attend to (bottom-right aligned), and the
    signed distances q_pos - k_pos."""
    distance = (torch.arange(seqlen_q)[:, None] + seqlen_k - seqlen_q) - torch.arange(seqlen_k)[None, :]
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
    if causal:
        visible &= distance >= 0
    if window[0] >= 0:
        visible &= distance <= window[0]
    if window[1] >= 0:
        visible &= -distance <= window[1]
    return visible, distance


def attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=None, causal=False, window=(-1, -1),
                        softcap=0.0, sinks=None, alibi_slopes=None, dtype=torch.float64):
    """q [total_q, H, D], k [total_k, Hkv, D], v [total_k, Hkv, DV] -> (out [total_q, H, DV], lse [H, total_q]) in
    `dtype`; scale defaults to 1/sqrt(D)."""
    H, D = q.shape[1], q.shape[2]
    group = H // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(*q.shape[:2], v.shape[2], dtype=dtype)   # V's head dim (it may differ from q's and k's)
    lse = torch.full((H, q.shape[0]), -math.inf, dtype=torch.float64)
    for b in range(len(cu_seqlens_q) - 1):
        q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        k0, k1 = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        sq, sk = q1 - q0, k1 - k0
        if sq == 0:
            continue
        qb = q[q0:q1].to(dtype).transpose(0, 1)                                   # [H, sq, D]
        kb = k[k0:k1].to(dtype).repeat_interleave(group, dim=1).transpose(0, 1)   # [H, sk, D]
        vb = v[k0:k1].to(dtype).repeat_interleave(group, dim=1).transpose(0, 1)
        s = (qb @ kb.transpose(1, 2)) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        visible, distance = visible_keys(sq, sk, causal, window)
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
            s = s - slopes.to(dtype)[:, None, None] * distance.abs().to(dtype)
        s = s.masked_fill(~visible, -math.inf)
        m = s.amax(-1, keepdim=True) if sk else torch.full((*s.shape[:-1], 1), -math.inf, dtype=dtype)
        if sinks is not None:
            m = torch.maximum(m, sinks.to(dtype)[:, None, None])
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(s - m)
        denom = e.sum(-1, keepdim=True)
        if sinks is not None:
            denom = denom + torch.exp(sinks.to(dtype)[:, None, None] - m)
        o = (e / torch.where(denom > 0, denom, torch.ones_like(denom))) @ vb
        out[q0:q1] = o.transpose(0, 1)
        lse[:, q0:q1] = torch.where(denom[..., 0] > 0, (m[..., 0] + torch.log(denom[..., 0])).double(),
                                    torch.full_like(denom[..., 0], -math.inf).double())
    return out, lse


def assert_matches_reference(out, lse, q, k, v, cu_seqlens_q, cu_seqlens_k, **kw):
    """flash-attn's tolerance rule: the kernel's error against the float64 reference is within 2x (+ eps)
    of the error of plain PyTorch attention run in the inputs' dtype. out/lse in the varlen layout."""
    out, lse = out.cpu(), lse.cpu()
    ref, ref_lse = attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, **kw)
    plain, _ = attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, dtype=q.dtype, **kw)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
    baseline = (plain.double() - ref).abs().max().item() if out.numel() else 0.0
    assert err <= 2 * baseline + 1e-5, f"kernel error {err:.3g} vs plain PyTorch {baseline:.3g}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "rows with no visible key must have LSE -inf, others finite"
    if finite.any():
        assert (lse.double()[finite] - ref_lse[finite]).abs().max().item() < 1e-4
    return err, baseline
