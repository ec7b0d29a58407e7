"""The prefill shader run directly through mslsim (the torch ops and wrappers come on top of it),
against the float64 reference with flash-attn's tolerance rule."""
import math
import struct
from pathlib import Path

import pytest
import torch

import mslsim
from tests.reference import attention_reference, visible_keys

SHADERS = Path(__file__).resolve().parents[1] / "metal-flash-sdpa"
TYPE_NAMES = {torch.float32: "float", torch.float16: "half", torch.bfloat16: "bfloat"}


@pytest.fixture(scope="module")
def prefill():
    return mslsim.load(SHADERS / "prefill.metal", include_dirs=[SHADERS])


def run_prefill(lib, q, k, v, cu_q, cu_k, scale, causal=False, window=(-1, -1), softcap=0.0, sinks=None, alibi=None):
    total_q, H, D = q.shape
    Hkv = k.shape[1]
    B = len(cu_q) - 1
    max_q = int((cu_q[1:] - cu_q[:-1]).max()) if B else 0
    out = torch.zeros_like(q)
    lse = torch.zeros(H, total_q, dtype=torch.float32)
    qs, ks = [0, H * D, D], [0, Hkv * D, D]
    params = struct.pack("<15q8i2f6i", *qs, *ks, *ks, *qs, 0, total_q, 1, B, H, Hkv, D, total_q, k.shape[0], -1, -1,
                         scale, softcap, window[0], window[1], H if alibi is not None and alibi.dim() == 2 else 0, 0, 0, 0)
    has_window = window != (-1, -1)
    stats = lib.dispatch(
        f"attention_prefill_{TYPE_NAMES[q.dtype]}_{D}", (max(math.ceil(max_q / 32), 1), H, B), 128,
        {0: q, 1: k, 2: v, 3: out, 4: cu_q, 5: cu_k, 6: params,
         7: sinks if sinks is not None else torch.zeros(1), 8: alibi if alibi is not None else torch.zeros(1), 9: lse},
        constants={301: causal, 302: has_window, 303: sinks is not None, 304: softcap > 0, 305: alibi is not None})
    return out, lse, stats


def check_against_reference(out, lse, q, k, v, cu_q, cu_k, **kw):
    ref, ref_lse = attention_reference(q, k, v, cu_q, cu_k, **kw)
    plain, _ = attention_reference(q, k, v, cu_q, cu_k, dtype=q.dtype, **kw)
    err = (out.double() - ref).abs().max().item()
    baseline = (plain.double() - ref).abs().max().item()
    assert err <= 2 * baseline + 1e-5, f"kernel error {err:.3g} vs plain PyTorch {baseline:.3g}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    if finite.any():
        assert (lse.double()[finite] - ref_lse[finite]).abs().max().item() < 1e-4
    assert not torch.isnan(out).any()


def make_inputs(seqlens_q, seqlens_k, H, Hkv, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor([0] + list(torch.tensor(seqlens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(seqlens_k).cumsum(0)), dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), H, D, generator=g).to(dtype)
    k = torch.randn(int(cu_k[-1]), Hkv, D, generator=g).to(dtype)
    v = torch.randn(int(cu_k[-1]), Hkv, D, generator=g).to(dtype)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [32, 64, 72, 80, 96, 128, 192, 256])
def test_dtypes_and_head_dims(prefill, dtype, D):
    q, k, v, cu_q, cu_k = make_inputs([40, 7], [40, 19], 2, 1, D, dtype, seed=D)
    out, lse, _ = run_prefill(prefill, q, k, v, cu_q, cu_k, D ** -0.5, causal=True)
    check_against_reference(out, lse, q, k, v, cu_q, cu_k, causal=True)


@pytest.mark.parametrize("causal, window", [(False, (-1, -1)), (True, (-1, -1)), (False, (0, 0)), (False, (64, 64)),
                                            (True, (127, 0)), (False, (20, -1)), (False, (-1, 20)), (True, (500, 0))])
@pytest.mark.parametrize("sinks, softcap", [(False, 0.0), (True, 0.0), (False, 30.0)])
def test_masks_sinks_softcap(prefill, causal, window, sinks, softcap):
    q, k, v, cu_q, cu_k = make_inputs([0, 1, 7, 130, 70], [0, 1, 7, 130, 150], 4, 2, 64, torch.float16, seed=1)
    s = torch.randn(4) if sinks else None
    q = q * 3 if softcap else q
    out, lse, _ = run_prefill(prefill, q, k, v, cu_q, cu_k, 0.125, causal, window, softcap, s)
    check_against_reference(out, lse, q, k, v, cu_q, cu_k, scale=0.125, causal=causal, window=window,
                            softcap=softcap, sinks=s)


def test_alibi_and_query_longer_than_keys(prefill):
    q, k, v, cu_q, cu_k = make_inputs([50, 9], [20, 33], 4, 4, 64, torch.float32, seed=2)
    slopes = torch.tensor([[0.5, 0.25, 0.125, 0.0625], [0.3, 0.2, 0.1, 0.05]])
    out, lse, _ = run_prefill(prefill, q, k, v, cu_q, cu_k, 0.125, causal=True, alibi=slopes)
    check_against_reference(out, lse, q, k, v, cu_q, cu_k, scale=0.125, causal=True, alibi_slopes=slopes)
    assert (out[:30] == 0).all() and torch.isinf(lse[:, :30]).all()   # rows that see no key


def tiles_with_a_visible_key(n, causal, window, block_q=32, block_k=32):
    """Ideal K-tile count from the explicit mask: tiles holding a visible key for some row of the block."""
    visible, _ = visible_keys(n, n, causal, window)
    blocks = visible.reshape(n // block_q, block_q, n // block_k, block_k).any(3).any(1)
    return int(blocks.sum())


@pytest.mark.parametrize("causal, window", [(True, (127, 0)), (False, (64, 64)), (False, (-1, 200))])
def test_band_limited_k_loop_at_4096(prefill, causal, window):
    n = 4096
    q, k, v, cu_q, cu_k = make_inputs([n], [n], 1, 1, 32, torch.float16, seed=3)
    out, lse, stats = run_prefill(prefill, q, k, v, cu_q, cu_k, 32 ** -0.5, causal=causal, window=window)
    check_against_reference(out, lse, q, k, v, cu_q, cu_k, causal=causal, window=window)
    ideal = tiles_with_a_visible_key(n, causal, window)
    assert stats.counters["k_tiles_loaded"] == stats.counters["v_tiles_loaded"] == ideal   # ratio 1.00
    if window[0] >= 0:
        assert ideal < (n // 32) ** 2 / 8    # O(n * window), far from the n^2 tiles of a full pass
