"""The input contract (README "Input contract", issue 11), one section per class of input a caller can get
wrong or make odd: index tensors that are views, extreme windows and lengths, num_splits, non-finite scalars,
autograd, error messages, and the split-K scratch bound. Each holds with the host data checks on and off."""
import math

import pytest
import torch

from tests.helpers import DEVICE, REPO, SIMULATED, PagedCache, queries, strided
from tests.reference import assert_matches_reference

INT32_MAX = 2**31 - 1


@pytest.fixture
def check_data(request, monkeypatch):
    monkeypatch.setenv("METAL_FLASH_SDPA_CHECK_DATA", request.param)
    return request.param


def varlen(seqlens_q, seqlens_k, H=4, Hkv=2, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(seqlens_q), H, D, generator=g).to(DEVICE)
    k = torch.randn(sum(seqlens_k), Hkv, D, generator=g).to(DEVICE)
    v = torch.randn(sum(seqlens_k), Hkv, D, generator=g).to(DEVICE)
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return q, k, v, cu(seqlens_q), cu(seqlens_k)


def contiguous_cache(B=3, S=40, Hkv=2, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, S, Hkv, D, generator=g).to(DEVICE), torch.randn(B, S, Hkv, D, generator=g).to(DEVICE))


# ------------------------------------------------------------------ 1. index tensors that are views

@pytest.mark.parametrize("check_data", ["1", "0"], indirect=True)
def test_cu_seqlens_views(fa, check_data):
    q, k, v, cu_q, cu_k = varlen([5, 0, 9], [7, 3, 12])
    out, lse, _ = fa.flash_attn_varlen_func(q, k, v, strided(cu_q), strided(cu_k), 9, 12, causal=True,
                                            return_attn_probs=True)
    assert_matches_reference(out, lse, q.cpu(), k.cpu(), v.cpu(), cu_q.cpu(), cu_k.cpu(), causal=True)


def paged_views(table):
    wide = torch.cat([table, torch.full_like(table, 99)], 1)
    return {"column slice": wide[:, :table.shape[1]], "transposed": table.t().contiguous().t(),
            "strided rows": strided(table)}


@pytest.mark.parametrize("check_data", ["1", "0"], indirect=True)
def test_block_table_and_cache_seqlens_views_with_append(fa, check_data):
    """Views of block_table and cache_seqlens attend and append exactly as their contiguous copies."""
    cache = PagedCache([20, 40, 3], 2, 64, 16, torch.float32, seed=3, max_blocks=4)
    q = queries(3, 2, 4, 64, torch.float32).to(DEVICE)
    new = torch.randn(3, 2, 2, 64).to(DEVICE)
    kc, vc, table = cache.on_device()
    seqlens = cache.seqlens.to(DEVICE) - 2
    expected = fa.flash_attn_with_kvcache(q, kc, vc, k=new, v=-new, cache_seqlens=seqlens, block_table=table,
                                          causal=True)
    for name, view in paged_views(table).items():
        k_cache, v_cache = cache.on_device()[:2]
        out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k=new, v=-new, cache_seqlens=strided(seqlens),
                                         block_table=view, causal=True)
        assert torch.equal(out, expected), name
        assert torch.equal(k_cache, kc) and torch.equal(v_cache, vc), name   # the same slots written
        k_cache, v_cache = cache.on_device()[:2]
        fa.kv_cache_write(new, -new, k_cache, v_cache, view, strided(seqlens))
        assert torch.equal(k_cache, kc) and torch.equal(v_cache, vc), name


@pytest.mark.parametrize("check_data", ["1", "0"], indirect=True)
def test_per_sequence_index_views(fa, check_data):
    """Strided cache_seqlens / cache_batch_idx / cache_leftpad, a 0-d cache_seqlens and an expand()ed one."""
    k_cache, v_cache = contiguous_cache()
    q = queries(2, 1, 4, 64, torch.float32).to(DEVICE)
    rows = torch.tensor([2, 0], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([30, 30], dtype=torch.int32, device=DEVICE)
    pad = torch.tensor([4, 0], dtype=torch.int32, device=DEVICE)
    call = lambda **kw: fa.flash_attn_with_kvcache(q, k_cache, v_cache, causal=True, **kw)
    expected = call(cache_seqlens=lens, cache_batch_idx=rows, cache_leftpad=pad)
    got = call(cache_seqlens=strided(lens), cache_batch_idx=strided(rows), cache_leftpad=strided(pad))
    assert torch.equal(got, expected)
    expected = call(cache_seqlens=lens, cache_batch_idx=rows)
    for same in (torch.tensor(30, dtype=torch.int32, device=DEVICE), lens[:1].expand(2), 30):
        assert torch.equal(call(cache_seqlens=same, cache_batch_idx=rows), expected)


# ------------------------------------------------------------------ 2. extreme windows and lengths

EXTREME_WINDOWS = [(-1, INT32_MAX), (INT32_MAX, 0), (2**32 + 3, -1), (3, 2**40), (2**63 - 1, 2**63 - 1), (0, 2**31)]


@pytest.mark.parametrize("check_data", ["1", "0"], indirect=True)
@pytest.mark.parametrize("window", EXTREME_WINDOWS, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_extreme_windows(fa, check_data, window, causal):
    """Windows wider than any sequence are unbounded (flash-attn clamps them), never narrowed to 32 bits."""
    q, k, v, cu_q, cu_k = varlen([40, 3, 9], [10, 2, 9])   # seqlen_q > seqlen_k rows included
    out, lse, _ = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 40, 10, causal=causal, window_size=window,
                                            return_attn_probs=True)
    assert_matches_reference(out, lse, q.cpu(), k.cpu(), v.cpu(), cu_q.cpu(), cu_k.cpu(), causal=causal, window=window)
    for Sq, Sk in [(fa.DECODE_MAX_NEW_TOKENS - 1, 2), (40, 10)]:   # flash_attn_func: the decode kernel and the prefill one
        qb, kb, vb, cu_q, cu_k = varlen([Sq, Sq], [Sk, Sk], seed=Sq)
        qb, kb, vb = (t.unflatten(0, (2, -1)) for t in (qb, kb, vb))
        out, lse, _ = fa.flash_attn_func(qb, kb, vb, causal=causal, window_size=window, return_attn_probs=True)
        assert_matches_reference(out.cpu().flatten(0, 1), lse.cpu().permute(1, 0, 2).flatten(1),
                                 *(t.cpu().flatten(0, 1) for t in (qb, kb, vb)), cu_q.cpu(), cu_k.cpu(),
                                 causal=causal, window=window)


@pytest.mark.parametrize("window", EXTREME_WINDOWS[:3], ids=str)
def test_extreme_windows_decode(fa, window):
    k_cache, v_cache = contiguous_cache(B=2, S=12)
    q = queries(2, 5, 4, 64, torch.float32).to(DEVICE)   # 5 new queries against 3 and 12 keys
    lens = torch.tensor([3, 12], dtype=torch.int32, device=DEVICE)
    out, lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, window_size=window,
                                         return_softmax_lse=True)
    keys = torch.cat([k_cache[0, :3], k_cache[1]]).cpu()
    values = torch.cat([v_cache[0, :3], v_cache[1]]).cpu()
    cu_k = torch.tensor([0, 3, 15], dtype=torch.int32)
    assert_matches_reference(out.cpu().flatten(0, 1), lse.cpu().permute(1, 0, 2).flatten(1), q.cpu().flatten(0, 1),
                             keys, values, torch.tensor([0, 5, 10], dtype=torch.int32), cu_k, window=window)


@pytest.mark.skipif(not SIMULATED, reason="counts threadgroups in the simulator")
def test_overstated_max_seqlen_unchecked(fa, counters, monkeypatch):
    """With data checks off max_seqlen_q is clamped to the tokens: 2**40 neither truncates the grid to nothing
    (uninitialised output) nor costs threadgroups beyond what total_q needs."""
    monkeypatch.setenv("METAL_FLASH_SDPA_CHECK_DATA", "0")
    q, k, v, cu_q, cu_k = varlen([33, 31], [20, 40])
    ref = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 64, 40, causal=True)
    baseline = counters(reset=True)["threadgroups"]
    for max_q in (2**40, 2**62, 10**6):
        assert torch.equal(fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, 2**40, causal=True), ref)
        assert counters(reset=True)["threadgroups"] == baseline


@pytest.mark.parametrize("cu_q", [[2, 5, 7], [0, 4, 10], [9, 3, 12]], ids=["gaps", "exact", "backwards"])
def test_unchecked_outputs_written_once_by_the_kernel(fa, monkeypatch, counters, cu_q):
    """Unchecked cu_seqlens_q that leave tokens in no sequence: those rows are 0 with LSE -inf (what a row without
    keys gets), never uninitialised memory (the fuzz suite found NaN there). The kernel writes every byte of out and
    lse exactly once, those rows included: no fill pass over the outputs before it (issue 15)."""
    monkeypatch.setenv("METAL_FLASH_SDPA_CHECK_DATA", "0")
    q, k, v, _, cu_k = varlen([4, 6], [5, 5])
    cu = torch.tensor(cu_q, dtype=torch.int32, device=DEVICE)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as trace:
        out, lse, _ = fa.flash_attn_varlen_func(q, k, v, cu, cu_k, 10, 5, return_attn_probs=True)
    assert not {e.name for e in trace.events()} & {"aten::zero_", "aten::fill_", "aten::full"}
    c = counters()
    assert c["device_bytes_written[3]"] == out.numel() * out.element_size()   # PREFILL_BUFFER_OUT
    assert c["device_bytes_written[9]"] == lse.numel() * lse.element_size()   # PREFILL_BUFFER_LSE
    clamped = [min(max(x, 0), q.shape[0]) for x in cu_q]
    owned = {t for a, b in zip(clamped, clamped[1:]) for t in range(a, b)}
    outside = torch.tensor(sorted(set(range(q.shape[0])) - owned), dtype=torch.long)
    assert torch.equal(out[outside], torch.zeros_like(out[outside]))
    assert torch.equal(lse[:, outside], torch.full_like(lse[:, outside], -math.inf))
    for b, (start, end) in enumerate(zip(clamped, clamped[1:])):   # owned rows: their sequence's attention
        if end > start:
            one = lambda n: torch.tensor([0, n], dtype=torch.int32)   # noqa: E731
            assert_matches_reference(out[start:end], lse[:, start:end], q[start:end].cpu(), k[5 * b:5 * b + 5].cpu(),
                                     v[5 * b:5 * b + 5].cpu(), one(end - start), one(5))


def test_size_limits(fa):
    """Sizes the shaders' int32 rows cannot hold are refused up front (meta tensors: shapes only, no memory)."""
    ops = fa._ops.ops
    cu = torch.empty(2, dtype=torch.int32, device="meta")
    varlen_op = lambda t: ops.flash_attn_varlen(t, t, t, cu, cu, -1, -1, None, False, -1, -1, 0.0, None, None)
    tokens = torch.empty(2**31 - 32, 1, 32, device="meta")
    with pytest.raises(NotImplementedError, match=r"2\^31 - 33 tokens"):
        varlen_op(tokens)
    varlen_op(tokens[1:])
    decode_op = lambda cache: ops.flash_attn_decode(torch.empty(1, 1, 1, cache.shape[-1], device="meta"), cache, cache, None, None, None, None, None, None, 0, None,
                                                    False, -1, -1, 0.0, None, None)
    for D in (32, 256):   # a K tile past the last slot stays within int32: 2^31 - 1 - KV_TILE_KEYS[D] slots
        max_slots = 2**31 - 1 - fa.KV_TILE_KEYS[D]
        cache = torch.empty(1, max_slots + 1, 1, D, device="meta")
        with pytest.raises(NotImplementedError, match=f"more than {max_slots} slots per sequence"):
            decode_op(cache)
        decode_op(cache[:, 1:])
    rows = torch.empty(1, 2**28, 8, 32, device="meta")   # 8 heads x 2^28 new tokens = 2^31 query rows
    cache = torch.empty(1, 16, 8, 32, device="meta")
    with pytest.raises(NotImplementedError, match="query rows"):
        ops.flash_attn_decode(rows, cache, cache, None, None, None, None, None, None, 0, None, False, -1, -1, 0.0,
                              None, None)


@pytest.mark.parametrize("check_data", ["1", "0"], indirect=True)
def test_cache_without_slots(fa, check_data):
    """A [B, 0, Hkv, D] cache (0 slots per block) is valid: no keys, zeros out, LSE -inf, no division by 0."""
    k_cache = torch.zeros(3, 0, 2, 64, device=DEVICE)
    out, lse = fa.flash_attn_with_kvcache(queries(2, 1, 4, 64, torch.float32).to(DEVICE), k_cache, k_cache,
                                         cache_seqlens=0, return_softmax_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(lse, torch.full_like(lse, -math.inf))


def test_negative_max_seqlen_rejected(fa):
    q, k, v, cu_q, cu_k = varlen([3], [3])
    with pytest.raises(ValueError, match="max_seqlen_q"):
        fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, -5, 3)


# ------------------------------------------------------------------ 3. num_splits

@pytest.mark.parametrize("num_splits", [2**63 - 1, 2**31, 10**6, 3])
def test_huge_num_splits(fa, num_splits):
    """An overflowing ceil-division once made the partition size 0 (SIGFPE); num_splits is a bounded hint."""
    k_cache, v_cache = contiguous_cache(B=2, S=300)
    q = queries(2, 1, 4, 64, torch.float32).to(DEVICE)
    lens = torch.tensor([300, 77], dtype=torch.int32, device=DEVICE)
    expected = fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, num_splits=1)
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, num_splits=num_splits)
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ 4. non-finite scalars

NON_FINITE = [("softcap", math.inf), ("softcap", math.nan), ("softcap", 1e39), ("softcap", -1.0),
              ("softmax_scale", math.inf), ("softmax_scale", -math.inf), ("softmax_scale", math.nan),
              ("softmax_scale", 1e39)]


@pytest.mark.parametrize("name, value", NON_FINITE, ids=str)
def test_non_finite_scalars_rejected(fa, name, value):
    q, k, v, cu_q, cu_k = varlen([5], [5])
    with pytest.raises(ValueError, match=name):
        fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 5, **{name: value})
    k_cache, v_cache = contiguous_cache()
    before = k_cache.clone(), v_cache.clone()
    new = torch.ones(3, 1, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match=name):
        fa.flash_attn_with_kvcache(queries(3, 1, 4, 64, torch.float32).to(DEVICE), k_cache, v_cache, k=new, v=new,
                                   cache_seqlens=4, **{name: value})
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])   # nothing appended


# ------------------------------------------------------------------ 5. autograd

def test_backward_flows_through_prefill_and_raises_for_decode(fa):
    """The prefill op is differentiable (values: tests/test_backward.py); the decode op has no backward, and
    backward() through it raises instead of silently dropping the gradient."""
    q, k, v, cu_q, cu_k = varlen([5, 7], [6, 7])
    q.requires_grad_(True)
    out = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 7, 7)
    assert out.requires_grad
    with torch.no_grad():
        assert torch.equal(out, fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 7, 7))
    out.sum().backward()
    assert q.grad.shape == q.shape and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    qb = torch.randn(2, 1, 4, 64, device=DEVICE, requires_grad=True)   # Sq = 1: the decode kernel's forward
    fa.flash_attn_func(qb, qb[:, :, :2], qb[:, :, :2]).sum().backward()
    assert qb.grad.shape == qb.shape and torch.isfinite(qb.grad).all()
    k_cache, v_cache = contiguous_cache()
    new = torch.randn(3, 1, 2, 64, device=DEVICE, requires_grad=True)
    out = fa.flash_attn_with_kvcache(queries(3, 1, 4, 64, torch.float32).to(DEVICE), k_cache, v_cache, k=new,
                                     v=new, cache_seqlens=4)
    assert torch.equal(k_cache[:, 4], new[:, 0].detach())   # the append happened
    with pytest.raises(NotImplementedError, match="flash_attn_decode has no backward"):
        out.sum().backward()


# ------------------------------------------------------------------ 6. clear errors

def test_unclear_errors_are_clear_now(fa):
    q, k, v, cu_q, cu_k = varlen([5], [5])
    with pytest.raises(NotImplementedError, match="head_dim 0"):
        fa.flash_attn_varlen_func(q[..., :0], k[..., :0], v[..., :0], cu_q, cu_k, 5, 5)
    with pytest.raises(ValueError, match=r"q must be \[total_tokens"):
        fa.flash_attn_varlen_func(q[0, 0, 0], k, v, cu_q, cu_k, 5, 5)
    k_cache, v_cache = contiguous_cache()
    q4 = queries(2, 1, 4, 64, torch.float32).to(DEVICE)
    with pytest.raises(ValueError, match=r"q must be \[batch, seqlen_q"):
        fa.flash_attn_with_kvcache(q4[0, 0, 0], k_cache, v_cache)
    with pytest.raises(TypeError, match="block_table must be a torch.Tensor"):
        fa.flash_attn_with_kvcache(q4, k_cache, v_cache, block_table=[[0], [1]])
    with pytest.raises(TypeError, match="block_table must be a torch.Tensor"):
        fa.kv_cache_write(q4[:, :, :2], q4[:, :, :2], k_cache, v_cache, [[0], [1]], 0)
    with pytest.raises(ValueError, match="cache_seqlens = 8589934592"):
        fa.flash_attn_with_kvcache(q4, k_cache, v_cache, cache_seqlens=2**33)
    with pytest.raises(ValueError, match=r"cache_batch_idx\[1\] = 9 is not a row of k_cache"):
        fa.flash_attn_with_kvcache(q4, k_cache, v_cache, cache_seqlens=3,
                                   cache_batch_idx=torch.tensor([0, 9], dtype=torch.int32, device=DEVICE))
    with pytest.raises(TypeError, match="cache_batch_idx must be torch.int32"):
        fa.flash_attn_with_kvcache(q4, k_cache, v_cache, cache_batch_idx=torch.tensor([0, 1], device=DEVICE))
    with pytest.raises(ValueError, match=r"cache_batch_idx must be \[batch\] = \[2\]"):
        fa.flash_attn_with_kvcache(q4, k_cache, v_cache, cache_batch_idx=torch.zeros(3, dtype=torch.int32,
                                                                                     device=DEVICE))
    with pytest.raises(ValueError, match="k_cache has 3 rows"):
        fa.flash_attn_with_kvcache(queries(4, 1, 4, 64, torch.float32).to(DEVICE), k_cache, v_cache)
    with pytest.raises(ValueError, match="window_size = .* does not fit"):
        fa.flash_attn_func(q4, q4[:, :, :2], q4[:, :, :2], window_size=(2**64, 0))


# ------------------------------------------------------------------ 7. split-K scratch

def test_scratch_is_bounded(fa):
    """The issue's case (B=64, H=64, D=128, 131k keys) asked 1 GiB per decode call; now at most 64 MiB, and the
    partition count at most DECODE_MAX_PARTITIONS, whatever num_splits or the (unread) lengths say."""
    def scratch(batch, heads, keys, splits, cores=0):   # fp32, D=128, one new token, no window, MHA
        return fa._ops.ops.decode_split(batch, heads, heads, 1, 128, 4, keys, -1, splits, cores)[2]
    budget = fa.DECODE_SCRATCH_BYTES
    assert budget == 64 << 20 and fa.DECODE_MAX_PARTITIONS == 64
    per_partition = 64 * 64 * 1 * (128 + 2) * 4
    for keys, splits in [(131072, 0), (131072, 10**9), (2**31 - 1, 0), (2**31 - 1, 2**63 - 1)]:
        used = scratch(64, 64, keys, splits)
        assert 0 < used <= budget and used % per_partition == 0
    assert scratch(64, 64, 131072, 10**9) == 31 * per_partition == 66_027_520   # 63.0 MiB (was 1 GiB)
    assert "66,027,520 bytes" in (REPO / "README.md").read_text()   # the figure the README states
    for cores in (8, 40, 80, 10**6):                                    # small batch: the partition cap binds
        assert scratch(1, 32, 131072, 10**9, cores) == 64 * 32 * 130 * 4
        assert scratch(1, 32, 131072, 0, cores) <= 64 * 32 * 130 * 4
    assert scratch(1, 32, 32, 0) == 0                                   # one K tile: no split, no scratch


@pytest.mark.skipif(not SIMULATED, reason="reads the simulator's per-buffer byte counters")
def test_scratch_is_what_the_launch_writes(fa, counters, monkeypatch):
    """The partials a launch writes (buffers 11-13) are exactly decode_split's scratch, with lengths unread."""
    monkeypatch.setenv("METAL_FLASH_SDPA_CHECK_DATA", "0")
    k_cache, v_cache = contiguous_cache(B=2, S=700)
    q = queries(2, 1, 4, 64, torch.float32).to(DEVICE)
    for splits in (0, 5, 2**40):
        counters(reset=True)
        fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([700, 9], dtype=torch.int32, device=DEVICE),
                                   num_splits=splits)
        c = counters()
        written = sum(c.get(f"device_bytes_written[{i}]", 0) for i in (11, 12, 13))
        assert written == fa._ops.ops.decode_split(2, 4, 4, 1, 64, 4, 700, -1, splits, 0)[2] > 0
