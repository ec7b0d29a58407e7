"""Prefill parity through the public wrappers (kernel loaded with `kernels`) against the float64 reference,
with flash-attn's tolerance rule; plus the band proof from the simulator's work counters."""
import pytest
import torch

from tests.helpers import DEVICE, DTYPES, HEAD_DIMS, KERNEL
from tests.reference import assert_matches_reference, visible_keys


def make_varlen(seqlens_q, seqlens_k, H, Hkv, D, dtype, seed=0, q_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor([0, *torch.tensor(seqlens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(seqlens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = (torch.randn(int(cu_q[-1]), H, D, generator=g) * q_scale).to(dtype)
    k = torch.randn(int(cu_k[-1]), Hkv, D, generator=g).to(dtype)
    v = torch.randn(int(cu_k[-1]), Hkv, D, generator=g).to(dtype)
    return q, k, v, cu_q, cu_k


def run_varlen(fa, q, k, v, cu_q, cu_k, **kw):
    """flash_attn_varlen_func on DEVICE with the true max lengths; returns (out, lse) on the CPU."""
    to = lambda t: None if t is None else t.to(DEVICE)   # noqa: E731
    kw = {name: to(val) if isinstance(val, torch.Tensor) else val for name, val in kw.items()}
    max_q = int((cu_q[1:] - cu_q[:-1]).max()) if len(cu_q) > 1 else 0
    max_k = int((cu_k[1:] - cu_k[:-1]).max()) if len(cu_k) > 1 else 0
    out, lse, probs = fa.flash_attn_varlen_func(to(q), to(k), to(v), to(cu_q), to(cu_k), max_q, max_k,
                                                return_attn_probs=True, **kw)
    assert probs is None
    return out.cpu(), lse.cpu()


def reference_kwargs(kw):
    """Wrapper kwargs -> reference kwargs (flash-attn's causal is the window's right edge at 0)."""
    return dict(scale=kw.get("softmax_scale"), causal=kw.get("causal", False), window=kw.get("window_size", (-1, -1)),
                softcap=kw.get("softcap", 0.0), sinks=kw.get("s_aux"), alibi_slopes=kw.get("alibi_slopes"))


def check_varlen(fa, seqlens_q, seqlens_k, H, Hkv, D, dtype, seed=0, q_scale=1.0, **kw):
    q, k, v, cu_q, cu_k = make_varlen(seqlens_q, seqlens_k, H, Hkv, D, dtype, seed, q_scale)
    out, lse = run_varlen(fa, q, k, v, cu_q, cu_k, **kw)
    return assert_matches_reference(out, lse, q, k, v, cu_q, cu_k, **reference_kwargs(kw))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_dtypes_and_head_dims(fa, dtype, D):
    check_varlen(fa, [40, 7], [40, 19], 2, 1, D, dtype, seed=D, causal=True)


@pytest.mark.parametrize("D", [64, 256])
@pytest.mark.parametrize("seqlens_k", [[64, 32, 96, 0], [48, 96, 16, 16]], ids=["k%32", "k%16"])
def test_block_aligned_lengths(fa, D, seqlens_k):
    """Lengths that are multiples of the tile sizes take the specialisation without bounds checks
    (align_q / align_k function constants; K tiles are 32 keys for D <= 128, 16 above)."""
    check_varlen(fa, [32, 64, 0, 96], seqlens_k, 4, 2, D, torch.bfloat16, seed=12, causal=True, window_size=(40, 0),
                 s_aux=torch.randn(4))


RAGGED_Q = [0, 1, 7, 128, 513, 70]   # includes seqlen_q < seqlen_k and seqlen_q > seqlen_k
RAGGED_K = [0, 1, 7, 128, 300, 150]

MASKS = [  # (causal, window_size)
    (False, (-1, -1)), (True, (-1, -1)), (False, (0, 0)), (False, (64, 64)), (True, (127, 0)),
    (False, (50, -1)), (False, (-1, 50)), (True, (1000, 0)), (False, (1000, 1000))]


@pytest.mark.parametrize("causal, window", MASKS, ids=lambda m: str(m).replace(" ", ""))
def test_masks_on_a_ragged_batch(fa, causal, window):
    check_varlen(fa, RAGGED_Q, RAGGED_K, 4, 2, 64, torch.float16, seed=1, causal=causal, window_size=window)


@pytest.mark.parametrize("causal, window", [(False, (-1, -1)), (True, (127, 0)), (False, (64, 64)), (False, (20, -1))],
                         ids=lambda m: str(m).replace(" ", ""))
@pytest.mark.parametrize("feature", ["sinks", "softcap", "sinks+softcap"])
def test_sinks_and_softcap(fa, causal, window, feature):
    kw = dict(causal=causal, window_size=window, softmax_scale=0.125)
    if "sinks" in feature:   # transformers hands the sinks over in the query dtype
        kw["s_aux"] = (torch.randn(4, generator=torch.Generator().manual_seed(5)) * 2).to(torch.float16)
    if "softcap" in feature:
        kw["softcap"] = 20.0
    check_varlen(fa, [0, 1, 7, 130, 70], [0, 1, 7, 130, 150], 4, 2, 64, torch.float16, seed=2, q_scale=3.0, **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [64, 256])
def test_query_fragments_in_the_input_type(fa, dtype, D):
    """Q fragments stay in the 16-bit input type and the scale is applied to the scores instead: softcap bends the
    scaled scores (q_scale 3 makes them large), sinks and the window as elsewhere."""
    check_varlen(fa, [70, 9], [130, 9], 4, 2, D, dtype, seed=6, q_scale=3.0, causal=True, window_size=(50, 0),
                 softmax_scale=0.125, softcap=20.0, s_aux=torch.randn(4))


@pytest.mark.parametrize("slopes_shape", ["per_head", "per_sequence"])
def test_alibi(fa, slopes_shape):
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    if slopes_shape == "per_sequence":
        slopes = torch.stack([slopes, slopes * 0.7])
    check_varlen(fa, [50, 9], [20, 33], 4, 4, 64, torch.float32, seed=3, causal=True, alibi_slopes=slopes)


@pytest.mark.parametrize("H, Hkv", [(8, 2), (14, 2), (8, 1)], ids=["gqa-8/2", "gqa-14/2", "mqa-8/1"])
def test_gqa_and_mqa(fa, H, Hkv):
    check_varlen(fa, [33, 64], [33, 100], H, Hkv, 64, torch.bfloat16, seed=4, causal=True, window_size=(40, 0),
                 s_aux=torch.randn(H))


# The six cases of the seed PR's parity table (fp16; 256 tokens, H=8 unless stated).
SEED_CASES = {
    "full attention": dict(H=8, Hkv=8, kw={}),
    "sliding window (64,64)": dict(H=8, Hkv=8, kw=dict(window_size=(64, 64))),
    "attention sink only": dict(H=8, Hkv=8, kw=dict(sinks=True)),
    "window + sink": dict(H=8, Hkv=8, kw=dict(window_size=(64, 64), sinks=True)),
    "+ GQA (H=8,Hkv=2)": dict(H=8, Hkv=2, kw=dict(window_size=(64, 64), sinks=True)),
    "H=14,Hkv=2,win=127,sink": dict(H=14, Hkv=2, kw=dict(causal=True, window_size=(127, 0), sinks=True)),
}


@pytest.mark.parametrize("case", SEED_CASES, ids=lambda c: c.replace(" ", "_"))
def test_seed_parity_table(fa, case):
    spec = SEED_CASES[case]
    kw = dict(spec["kw"])
    if kw.pop("sinks", False):
        kw["s_aux"] = torch.randn(spec["H"], generator=torch.Generator().manual_seed(6))
    q, k, v, cu_q, cu_k = make_varlen([256], [256], spec["H"], spec["Hkv"], 64, torch.float16, seed=7)
    out, lse = run_varlen(fa, q, k, v, cu_q, cu_k, **kw)
    assert_matches_reference(out, lse, q, k, v, cu_q, cu_k, **reference_kwargs(kw))
    from tests.reference import attention_reference
    ref, _ = attention_reference(q, k, v, cu_q, cu_k, **reference_kwargs(kw))
    cos = torch.nn.functional.cosine_similarity(out.double().flatten(), ref.flatten(), dim=0).item()
    assert cos > 0.99999   # the seed reports cos 1.000000 / max-abs 1e-4 for each case


def test_sinks_change_the_answer(fa):
    """The tolerance check has teeth: sinks off by 0.5 fail it."""
    q, k, v, cu_q, cu_k = make_varlen([64], [64], 4, 2, 64, torch.float16, seed=8)
    sinks = torch.randn(4)
    out, lse = run_varlen(fa, q, k, v, cu_q, cu_k, causal=True, s_aux=sinks)
    with pytest.raises(AssertionError):
        assert_matches_reference(out, lse, q, k, v, cu_q, cu_k, causal=True, sinks=sinks + 0.5)


def test_rows_without_keys_are_zero_with_lse_minus_inf(fa):
    q, k, v, cu_q, cu_k = make_varlen([50], [20], 2, 2, 32, torch.float32, seed=9)
    out, lse = run_varlen(fa, q, k, v, cu_q, cu_k, causal=True)
    assert (out[:30] == 0).all() and torch.isneginf(lse[:, :30]).all()
    assert torch.isfinite(lse[:, 30:]).all()
    # With sinks the row is still zero (the sink has no value); its LSE is the sink's own logit.
    sinks = torch.tensor([0.5, -2.0])
    out, lse = run_varlen(fa, q, k, v, cu_q, cu_k, causal=True, s_aux=sinks)
    assert (out[:30] == 0).all() and torch.equal(lse[:, :30], sinks[:, None].expand(2, 30))


def test_empty_batch_and_no_tokens(fa):
    q, k, v, cu_q, cu_k = make_varlen([0, 0], [0, 5], 2, 1, 64, torch.float16)
    out, lse = run_varlen(fa, q, k, v, cu_q, cu_k)
    assert out.shape == (0, 2, 64) and lse.shape == (2, 0)
    empty = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    out = fa.flash_attn_varlen_func(*(torch.zeros(0, 2, 64, device=DEVICE),) * 3, empty, empty, 0, 0)
    assert out.shape == (0, 2, 64)


def test_max_seqlen_may_be_a_0d_tensor(fa):
    q, k, v, cu_q, cu_k = make_varlen([20, 45], [20, 45], 2, 2, 64, torch.float32, seed=10)
    dev = lambda t: t.to(DEVICE)   # noqa: E731
    out = fa.flash_attn_varlen_func(dev(q), dev(k), dev(v), dev(cu_q), dev(cu_k), torch.tensor(45), torch.tensor(45),
                                    causal=True)
    ref = fa.flash_attn_varlen_func(dev(q), dev(k), dev(v), dev(cu_q), dev(cu_k), 45, 45, causal=True)
    assert torch.equal(out, ref)


# ---------------------------------------------------------------------------------------- flash_attn_func
def batched_as_varlen(q, k, v):
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    cu_q = torch.arange(B + 1, dtype=torch.int32) * Sq
    cu_k = torch.arange(B + 1, dtype=torch.int32) * Sk
    return q.reshape(B * Sq, H, D), k.reshape(B * Sk, *k.shape[2:]), v.reshape(B * Sk, *v.shape[2:]), cu_q, cu_k


@pytest.mark.parametrize("Sq, Sk", [(37, 37), (1, 77), (5, 77), (77, 20)], ids=lambda s: str(s))
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "transposed_view"])
def test_flash_attn_func(fa, Sq, Sk, strided):
    B, H, Hkv, D = 3, 4, 2, 64
    g = torch.Generator().manual_seed(Sq * 100 + Sk)
    if strided:   # transformers: [B, H, S, D] tensors handed over as .transpose(1, 2) views
        q = torch.randn(B, H, Sq, D, generator=g).half().to(DEVICE).transpose(1, 2)
        k = torch.randn(B, Hkv, Sk, D, generator=g).half().to(DEVICE).transpose(1, 2)
        v = torch.randn(B, Hkv, Sk, D, generator=g).half().to(DEVICE).transpose(1, 2)
        assert not k.is_contiguous()
    else:
        q, k, v = (torch.randn(B, S, h, D, generator=g).half().to(DEVICE) for S, h in ((Sq, H), (Sk, Hkv), (Sk, Hkv)))
    sinks = torch.randn(H, generator=g)
    out, lse, _ = fa.flash_attn_func(q, k, v, causal=True, window_size=(31, 31), s_aux=sinks.to(DEVICE),
                                     return_attn_probs=True)
    assert out.shape == (B, Sq, H, D) and lse.shape == (B, H, Sq)
    vq, vk, vv, cu_q, cu_k = batched_as_varlen(q.cpu().contiguous(), k.cpu().contiguous(), v.cpu().contiguous())
    assert_matches_reference(out.cpu().reshape(B * Sq, H, D), lse.cpu().permute(1, 0, 2).reshape(H, B * Sq),
                             vq, vk, vv, cu_q, cu_k, causal=True, window=(31, 31), sinks=sinks)


def test_flash_attn_func_reads_views_in_place(fa, counters):
    """A transposed view is read through its strides: q is bound as is and read exactly once."""
    B, S, H, D = 2, 64, 4, 64
    q, k, v = (torch.randn(B, H, S, D).transpose(1, 2) for _ in range(3))
    out = fa.flash_attn_func(q, k, v)
    c = counters()
    assert c["launches"] == 1 and c["device_bytes_read[0]"] == q.numel() * 4
    assert torch.equal(out, fa.flash_attn_func(q.contiguous(), k.contiguous(), v.contiguous()))


@pytest.mark.parametrize("Sq", [1, KERNEL.DECODE_MAX_NEW_TOKENS])
def test_flash_attn_func_decode_steps_read_kv_once(fa, counters, Sq):
    """generate() decodes through flash_attn_func with Sq = 1 < Sk: those calls run the decode kernel, so all
    query heads of a KV head share one read of each K/V byte (GQA 8/2 here), split into the partitions the
    decode heuristic picks (decode_split); those wholly before the window are skipped."""
    B, Sk, H, Hkv, D = 2, 700, 8, 2, 64
    g = torch.Generator().manual_seed(Sq)
    q = torch.randn(B, H, Sq, D, generator=g).half().transpose(1, 2)
    k, v = (torch.randn(B, Hkv, Sk, D, generator=g).half().transpose(1, 2) for _ in range(2))
    sinks = torch.randn(H, generator=g)
    out, lse, _ = fa.flash_attn_func(q, k, v, causal=True, window_size=(299, 299), s_aux=sinks, return_attn_probs=True)
    c = counters()
    partitions, size, _ = fa._ops.ops.decode_split(B, H, Hkv, Sq, D, 2, Sk, 299, 0, 0)
    computed = (Sk - 1) // size - (Sk - Sq - 299) // size + 1   # partitions holding keys Sk - Sq - 299 .. Sk - 1
    assert partitions > 1 and c["partitions_computed"] == B * Hkv * computed
    assert c["partitions_skipped"] == B * Hkv * (partitions - computed)
    assert c["device_bytes_read[1]"] == c["device_bytes_read[2]"] == B * Hkv * (299 + Sq) * D * 2
    vq, vk, vv, cu_q, cu_k = batched_as_varlen(q.contiguous(), k.contiguous(), v.contiguous())
    assert_matches_reference(out.reshape(B * Sq, H, D), lse.permute(1, 0, 2).reshape(H, B * Sq), vq, vk, vv, cu_q,
                             cu_k, causal=True, window=(299, 299), sinks=sinks)


# ---------------------------------------------------------------------------------------- band proof
def tiles_with_a_visible_key(n, causal, window, block_q, block_k):
    """Ideal K-tile count from the explicit mask: tiles holding a visible key for some row of the block."""
    visible, _ = visible_keys(n, n, causal, window)
    blocks = visible.reshape(n // block_q, block_q, n // block_k, block_k).any(3).any(1)
    return int(blocks.sum())


@pytest.mark.parametrize("causal, window", [
    (True, (127, 0)), (False, (64, 64)),
    pytest.param(False, (-1, 200), marks=pytest.mark.slow), pytest.param(True, (-1, -1), marks=pytest.mark.slow)],
    ids=lambda m: str(m).replace(" ", ""))
def test_band_limited_k_loop_at_4096(fa, counters, causal, window):
    n, D = 4096, 32
    q, k, v, cu_q, cu_k = make_varlen([n], [n], 1, 1, D, torch.float16, seed=11)
    out, lse = run_varlen(fa, q, k, v, cu_q, cu_k, causal=causal, window_size=window)
    c = counters()
    block_q, block_k = fa.PREFILL_BLOCK_Q, fa.KV_TILE_KEYS[D]
    ideal = tiles_with_a_visible_key(n, causal, window, block_q, block_k)
    assert c["k_tiles_loaded"] == c["v_tiles_loaded"] == ideal   # ratio 1.00
    if window[0] >= 0:
        assert ideal < (n // block_q) * (n // block_k) / 8    # O(n * window), far from the n^2 tiles of a full pass
    assert_matches_reference(out, lse, q, k, v, cu_q, cu_k, causal=causal, window=window)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kv_rows_off_16_byte_boundaries(fa, dtype):
    """K/V views whose rows do not start on 16-byte boundaries (storage offset of one element) take the
    element-wise tile copy (FC_KV_VECTOR off) and give exactly what the aligned vector copy gives, for the
    prefill and decode kernels."""
    B, S, H, Hkv, D = 2, 77, 4, 2, 72
    g = torch.Generator().manual_seed(3)
    q, qd = torch.randn(B, S, H, D, generator=g).to(dtype), torch.randn(B, 1, H, D, generator=g).to(dtype)
    k, v = (torch.randn(B * S * Hkv * D + 1, generator=g).to(dtype).to(DEVICE)[1:].view(B, S, Hkv, D) for _ in range(2))
    assert k.storage_offset() == 1
    lens = torch.tensor([50, 77], dtype=torch.int32, device=DEVICE)
    for run in (lambda k_, v_: fa.flash_attn_func(q.to(DEVICE), k_, v_, causal=True),
                lambda k_, v_: fa.flash_attn_with_kvcache(qd.to(DEVICE), k_, v_, cache_seqlens=lens)):
        assert torch.equal(run(k, v).cpu(), run(k.contiguous(), v.contiguous()).cpu())
