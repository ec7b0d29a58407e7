"""Third-party MSL known to run on Apple GPUs: MLX's attention kernels build and compute attention correctly in
the simulator (flash-attn's tolerance rule against the float64 reference), with every check on."""
import math

import pytest
import torch

from tests.mslsim.anchors import mlx
from tests.reference import attention_reference


@pytest.fixture(scope="module")
def lib():
    """The headers are fetched by scripts/setup.sh (the README's commands need PyPI anyway): missing ones fail
    the anchors, never skip them."""
    return mlx.library()


def errors(out, q, k, v, scale, causal, **reference):
    """(max |out - float64 reference|, the same for plain attention in q's dtype) for out [B, H, qL, D];
    `reference`: attention_reference's window / sinks."""
    B, H, qL, D = q.shape
    kL = k.shape[2]
    varlen = lambda t: t.transpose(1, 2).reshape(-1, t.shape[1], D)   # noqa: E731  [B*L, H, D]
    cu_q, cu_k = (torch.arange(B + 1, dtype=torch.int32) * n for n in (qL, kL))
    kw = dict(scale=scale, causal=causal, **reference)
    ref, _ = attention_reference(varlen(q), varlen(k), varlen(v), cu_q, cu_k, **kw)
    plain, _ = attention_reference(varlen(q), varlen(k), varlen(v), cu_q, cu_k, dtype=q.dtype, **kw)
    return (varlen(out).double() - ref).abs().max().item(), (plain.double() - ref).abs().max().item()


def check(out, q, k, v, scale, causal, **reference):
    """Within 2x (+1e-5) of plain attention in q's dtype (flash-attn's tolerance rule)."""
    err, baseline = errors(out, q, k, v, scale, causal, **reference)
    assert err <= 2 * baseline + 1e-5, f"MLX kernel error {err:.3g} vs plain PyTorch {baseline:.3g}"


def inputs(B, H, Hkv, qL, kL, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, qL, D, generator=g).to(dtype), torch.randn(B, Hkv, kL, D, generator=g).to(dtype),
            torch.randn(B, Hkv, kL, D, generator=g).to(dtype))


@pytest.mark.parametrize("dtype, D", [(torch.float32, 64), (torch.float16, 128), (torch.bfloat16, 64)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_vector(lib, dtype, D, causal):
    q, k, v = inputs(2, 4, 2, 1, 77, D, dtype)
    out, stats = mlx.sdpa_vector(lib, q, k, v, 1 / math.sqrt(D), causal)
    check(out, q, k, v, 1 / math.sqrt(D), causal)
    assert stats.device_bytes_read[1] == 2 * k.numel() * k.element_size()   # each key once per query head (GQA 2)


@pytest.mark.parametrize("dtype, D", [(torch.float32, 64), (torch.float16, 128), (torch.bfloat16, 64)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("qL, kL", [(64, 64), (45, 70)], ids=["aligned", "ragged"])
def test_steel_attention(lib, dtype, D, causal, qL, kL):
    q, k, v = inputs(1, 4, 2, qL, kL, D, dtype, seed=qL)
    out, _ = mlx.steel_attention(lib, q, k, v, 1 / math.sqrt(D), causal)
    check(out, q, k, v, 1 / math.sqrt(D), causal)


@pytest.mark.parametrize("dtype, D", [(torch.float32, 64), (torch.float16, 128)], ids=str)
@pytest.mark.parametrize("kL", [77, 1100])
def test_sdpa_vector_2pass(lib, dtype, D, kL):
    q, k, v = inputs(2, 8, 2, 1, kL, D, dtype, seed=kL)
    out, (first, second) = mlx.sdpa_vector_2pass(lib, q, k, v, 1 / math.sqrt(D))
    check(out, q, k, v, 1 / math.sqrt(D), False)
    assert first.threadgroups == 2 * 2 * mlx.two_pass_blocks(4, 1, kL) and second.threadgroups == 2 * 8


@pytest.mark.parametrize("dtype, D", [(torch.float32, 64), (torch.float16, 128)], ids=str)
@pytest.mark.parametrize("kL", [77, 1500])
def test_sdpa_vector_2pass_gqa(lib, dtype, D, kL):
    """MLX's duplication-free pass 1 (G = 8), forced on few keys (MLX takes it from 8192): ragged key chunks and
    sub-chunks; each K/V byte read G / HPT times (once per simdgroup handling HPT heads), not G times."""
    q, k, v = inputs(2, 16, 2, 1, kL, D, dtype, seed=kL + 1)
    out, (first, second) = mlx.sdpa_vector_2pass(lib, q, k, v, 1 / math.sqrt(D), gqa=True)
    check(out, q, k, v, 1 / math.sqrt(D), False)
    blocks = mlx.two_pass_blocks(8, 1, kL)
    assert first.threadgroups == 2 * 2 * blocks and second.threadgroups == 2 * 16
    hpt = mlx.GQA_PASS1_HPT[D, 8]
    assert first.device_bytes_read[1] == 8 // hpt * k.numel() * k.element_size()


def test_gqa_pass1_routing():
    """MLX's condition (scaled_dot_product_attention.cpp, sdpa_vector_2pass): one query, no mask/sinks, G 8 with
    D 64/128 or G 12/16 with D 128, equal QK/V dims, >= 8192 keys."""
    use = mlx.uses_gqa_pass1
    assert use(32, 4, 1, 8192, 128) and use(32, 4, 1, 32768, 128) and use(16, 2, 1, 8192, 64)
    assert use(48, 4, 1, 8192, 128) and use(32, 2, 1, 8192, 128)
    assert not use(32, 4, 1, 8191, 128)                        # too few keys
    assert not use(32, 4, 2, 8192, 128)                        # two queries
    assert not use(32, 4, 1, 8192, 128, mask=True) and not use(32, 4, 1, 8192, 128, sinks=True)
    assert not use(32, 8, 1, 8192, 128)                        # G = 4
    assert not use(48, 4, 1, 8192, 64) and not use(32, 2, 1, 8192, 64)   # G 12/16 only for D 128
    assert not use(32, 4, 1, 8192, 96) and not use(32, 4, 1, 8192, 128, value_dim=64)


def test_sdpa_vector_2pass_routes_gqa(lib):
    """At MLX's threshold (8192 keys, G = 8, fp32 D 64) sdpa_vector_2pass launches the gqa pass 1 by itself:
    K bytes read once per simdgroup of HPT = 8 heads, i.e. once."""
    q, k, v = inputs(1, 8, 1, 1, 8192, 64, torch.float32, seed=5)
    out, (first, _) = mlx.sdpa_vector_2pass(lib, q, k, v, 0.125)
    check(out, q, k, v, 0.125, False)
    assert first.device_bytes_read[1] == k.numel() * k.element_size()


def test_steel_attention_window_mask_and_sinks(lib):
    qL = kL = 96
    q, k, v = inputs(1, 4, 4, qL, kL, 64, torch.float16, seed=3)
    pos = torch.arange(qL)
    mask = (pos[:, None] >= pos[None, :]) & (pos[:, None] - pos[None, :] < 16)   # causal window of 16 keys
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(1))
    out, _ = mlx.steel_attention(lib, q, k, v, 0.125, mask=mask, sinks=sinks)
    check(out, q, k, v, 0.125, True, window=(15, 0), sinks=sinks.half().float())
