"""Paged prefill (issue 17, item 1): flash_attn_varlen_func with block_table reads K/V in place from a paged cache
[num_blocks, block_size, Hkv, D], flash-attn 2 semantics (sequence b's keys are its first cu_seqlens_k[b + 1] -
cu_seqlens_k[b] cache positions, or seqused_k[b]; masks bottom-right aligned). Parity against the float64
reference on keys gathered through the table in the test; chunked prefill against a cached prefix, a prefix shared
by several sequences, -1 padded tables, mixed decode rows and chunks; band-limited tiles and in-place byte counts;
flash-attn's own paged cases (test_flash_attn_varlen_causal); bad inputs."""
import itertools
import math
import random

import pytest
import torch

from tests.helpers import DEVICE, DTYPES, HEAD_DIMS, SIMULATED, PagedCache
from tests.reference import assert_matches_reference, visible_keys


def cu(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


class PagedBatch:
    """Queries [total_q, H, D] for sequences whose keys sit in a paged cache: sequence b has query_lens[b] new
    tokens, the last of its key_lens[b] keys (the rest a cached prefix)."""

    def __init__(self, query_lens, key_lens, H, Hkv, D, block_size, dtype, seed=0, cache=None, max_blocks=None):
        self.query_lens, self.key_lens = list(query_lens), list(key_lens)
        self.cache = cache or PagedCache(key_lens, Hkv, D, block_size, dtype, seed=seed, max_blocks=max_blocks)
        g = torch.Generator().manual_seed(seed + 1)
        self.q = torch.randn(sum(query_lens), H, D, generator=g).to(dtype)
        self.cu_q, self.cu_k = cu(query_lens), cu(key_lens)

    def gathered(self):
        """The keys and values of every sequence, packed [total_k, Hkv, D]: the reference's input."""
        parts = [self.cache.gather(b, n) for b, n in enumerate(self.key_lens)]
        return torch.cat([k for k, _ in parts]), torch.cat([v for _, v in parts])

    def run(self, fa, k_cache=None, v_cache=None, table=None, **kw):
        k, v, t = self.cache.on_device()
        out, lse, _ = fa.flash_attn_varlen_func(
            self.q.to(DEVICE), k if k_cache is None else k_cache, v if v_cache is None else v_cache,
            self.cu_q.to(DEVICE), self.cu_k.to(DEVICE), max(self.query_lens), max(self.key_lens),
            block_table=t if table is None else table, return_attn_probs=True, **kw)
        return out, lse

    def check(self, fa, reference_kw=None, **kw):
        out, lse = self.run(fa, **kw)
        k, v = self.gathered()
        assert_matches_reference(out, lse, self.q, k, v, self.cu_q, self.cu_k, **(reference_kw or {}))
        return out, lse


# A decode row, a chunk against a cached prefix, a fresh prompt, a sequence with no new token, an empty one.
MIXED = ([1, 45, 70, 0, 0], [300, 173, 70, 12, 0])


@pytest.mark.parametrize("block_size", [16, 32, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_batch_parity(fa, block_size, dtype):
    PagedBatch(*MIXED, 4, 2, 64, block_size, dtype).check(fa, causal=True, reference_kw=dict(causal=True))


@pytest.mark.parametrize("options", [
    dict(causal=True, window=(40, 0)), dict(causal=False, window=(30, 17)), dict(causal=False),
    dict(causal=True, sinks=True), dict(causal=True, softcap=30.0), dict(causal=True, window=(63, 0), alibi=True),
], ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()).replace(" ", ""))
def test_masks_sinks_softcap_alibi(fa, options):
    H, Hkv = 6, 2
    batch = PagedBatch(*MIXED, H, Hkv, 64, 16, torch.float16, seed=3)
    g = torch.Generator().manual_seed(5)
    sinks = torch.randn(H, generator=g) if options.get("sinks") else None
    slopes = torch.rand(H, generator=g) * 0.3 if options.get("alibi") else None
    ref = dict(causal=options["causal"], window=options.get("window", (-1, -1)), softcap=options.get("softcap", 0.0),
               sinks=sinks, alibi_slopes=slopes)
    batch.check(fa, reference_kw=ref, causal=ref["causal"], window_size=ref["window"], softcap=ref["softcap"],
                s_aux=None if sinks is None else sinks.to(DEVICE),
                alibi_slopes=None if slopes is None else slopes.to(DEVICE))


@pytest.mark.parametrize("H, Hkv", [(8, 1), (8, 8)])
@pytest.mark.parametrize("D", [d for d in (32, 128, 256) if d in HEAD_DIMS])
def test_gqa_and_head_dims(fa, H, Hkv, D):
    PagedBatch([1, 20], [90, 53], H, Hkv, D, 32, torch.bfloat16, seed=D).check(
        fa, causal=True, reference_kw=dict(causal=True))


def test_matches_the_contiguous_call_bit_for_bit(fa):
    """Same tiles, same order, same math: reading the keys through the table changes no bit of the result."""
    batch = PagedBatch(*MIXED, 4, 2, 64, 16, torch.float16, seed=7)
    paged, paged_lse = batch.run(fa, causal=True, window_size=(90, 0))
    k, v = batch.gathered()
    out, lse, _ = fa.flash_attn_varlen_func(batch.q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), batch.cu_q.to(DEVICE),
                                            batch.cu_k.to(DEVICE), 70, 300, causal=True, window_size=(90, 0),
                                            return_attn_probs=True)
    assert torch.equal(paged, out) and torch.equal(paged_lse, lse)


def test_prefix_shared_through_the_same_blocks(fa):
    """Prefix caching: three sequences share a 64-token prompt (the same 4 blocks of 16 in their table rows) and
    each prefills its own chunk after it; a fourth decodes one token after the shared prefix."""
    block_size, prefix_blocks = 16, 4
    own = [37, 16, 5, 1]
    key_lens = [prefix_blocks * block_size + n for n in own]
    cache = PagedCache([prefix_blocks * block_size] + own, 2, 64, block_size, torch.float16, seed=9, max_blocks=4)
    table = torch.full((len(own), prefix_blocks + 3), -1, dtype=torch.int32)
    for b, n in enumerate(own):
        table[b, :prefix_blocks] = cache.table[0]
        table[b, prefix_blocks:prefix_blocks + math.ceil(n / block_size)] = cache.table[b + 1, :math.ceil(n / block_size)]
    cache.table, cache.seqlens = table, torch.tensor(key_lens, dtype=torch.int32)
    batch = PagedBatch(own, key_lens, 4, 2, 64, block_size, torch.float16, seed=9, cache=cache)
    batch.check(fa, causal=True, reference_kw=dict(causal=True))


def test_seqused_k(fa):
    """seqused_k (flash-attn 3 / vLLM) instead of cu_seqlens_k: the same keys, the same result; without a table it
    keeps the first seqused_k[b] keys of each cu_seqlens_k span."""
    batch = PagedBatch(*MIXED, 4, 2, 64, 16, torch.float32, seed=2)
    k, v, t = batch.cache.on_device()
    seqused = torch.tensor(batch.key_lens, dtype=torch.int32, device=DEVICE)
    expected = batch.run(fa, causal=True)
    for cu_k in (batch.cu_k.to(DEVICE), None):
        out, lse, _ = fa.flash_attn_varlen_func(batch.q.to(DEVICE), k, v, batch.cu_q.to(DEVICE), cu_k, 70, 300,
                                                causal=True, block_table=t, seqused_k=seqused, return_attn_probs=True)
        assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1])
    kp, vp = batch.gathered()
    spans = [(int(s), n) for s, n in zip(batch.cu_k[:-1], batch.key_lens)]
    unused = lambda x: torch.cat([torch.cat([x[s:s + n], torch.randn(5, *x.shape[1:]).to(x.dtype)]) for s, n in spans])
    out, lse, _ = fa.flash_attn_varlen_func(batch.q.to(DEVICE), unused(kp).to(DEVICE), unused(vp).to(DEVICE),
                                            batch.cu_q.to(DEVICE), cu([n + 5 for n in batch.key_lens]).to(DEVICE), 70,
                                            305, causal=True, seqused_k=seqused, return_attn_probs=True)
    assert_matches_reference(out, lse, batch.q, kp, vp, batch.cu_q, batch.cu_k, causal=True)


def test_strided_caches_aliasing_one_storage(fa):
    """transformers' layout: K and V are views of one storage with V shifted by a block, and the head dim of a
    wider row (strided slots)."""
    Hkv, D, block_size = 2, 64, 16
    batch = PagedBatch([3, 40], [50, 40], 4, Hkv, D, block_size, torch.float16, seed=4)
    num_blocks = batch.cache.k.shape[0]
    storage = torch.randn(num_blocks + 1, block_size, Hkv, D + 8, generator=torch.Generator().manual_seed(6)).half()
    batch.cache.k, batch.cache.v = storage[:-1, ..., :D], storage[1:, ..., :D]
    k, v = storage.to(DEVICE)[:-1, ..., :D], storage.to(DEVICE)[1:, ..., :D]
    out, lse = batch.run(fa, k_cache=k, v_cache=v, causal=True)
    kg, vg = batch.gathered()
    assert_matches_reference(out, lse, batch.q, kg, vg, batch.cu_q, batch.cu_k, causal=True)


def test_unchecked_table_entries_hide_their_keys(fa, monkeypatch):
    """Checks off (the MPS default): block ids outside the cache read nothing (the simulator fails any out-of-bounds
    access) and hide their keys, as -1 padding does; the other keys keep their positions."""
    monkeypatch.setenv("METAL_FLASH_SDPA_CHECK_DATA", "0")
    batch = PagedBatch([4, 8], [64, 40], 2, 2, 64, 16, torch.float32, seed=8)
    table = batch.cache.table.clone()
    table[0, 1], table[1, 2] = 10 ** 6, -5
    out, _ = batch.run(fa, table=table.to(DEVICE), causal=True)
    k, v = batch.gathered()   # through the valid table; the hidden blocks' keys are masked below
    for b, (n_q, n_k) in enumerate(zip(batch.query_lens, batch.key_lens)):
        q0, k0 = int(batch.cu_q[b]), int(batch.cu_k[b])
        visible, _ = visible_keys(n_q, n_k, causal=True)
        in_cache = torch.tensor([0 <= int(table[b, p // 16]) < batch.cache.k.shape[0] for p in range(n_k)])
        scores = torch.einsum("qhd,khd->hqk", batch.q[q0:q0 + n_q].double(), k[k0:k0 + n_k].double()) / 8
        probs = scores.masked_fill(~(visible & in_cache), -math.inf).softmax(-1)
        expected = torch.einsum("hqk,khd->qhd", probs, v[k0:k0 + n_k].double())
        assert (out[q0:q0 + n_q].cpu().double() - expected).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------- band and bytes
def band_keys(n_q, n_k, causal, window, block_q):
    """Per query block, the keys [lo, hi) some row of it can see (the explicit mask's hull)."""
    visible, _ = visible_keys(n_q, n_k, causal, window)
    bands = []
    for r0 in range(0, n_q, block_q):
        cols = visible[r0:r0 + block_q].any(0).nonzero()
        bands.append((int(cols.min()), int(cols.max()) + 1) if len(cols) else (0, 0))
    return bands


@pytest.mark.parametrize("window", [(-1, -1), (50, 0)])
def test_band_limited_and_read_in_place(fa, counters, window):
    """k_tiles_loaded are the band's tiles (as the contiguous prefill), and the K / V bytes read are exactly the
    band's key rows: no gather copy, no key outside a query block's band."""
    H, Hkv, D, block_q = 4, 2, 64, fa.PREFILL_BLOCK_Q
    batch = PagedBatch([1, 45, 100], [300, 173, 100], H, Hkv, D, 16, torch.float16, seed=12)
    out, lse = batch.run(fa, causal=True, window_size=window)
    c = counters()
    tile = fa.KV_TILE_KEYS[D]
    tiles = rows = 0
    for n_q, n_k in zip(batch.query_lens, batch.key_lens):
        for lo, hi in band_keys(n_q, n_k, True, window, block_q):
            tiles += (math.ceil(hi / tile) - lo // tile) if hi > lo else 0
            rows += hi - lo
    assert c["launches"] == 1
    assert c["k_tiles_loaded"] == c["v_tiles_loaded"] == tiles * H
    assert c["device_bytes_read[1]"] == c["device_bytes_read[2]"] == rows * H * D * 2
    k, v = batch.gathered()
    assert_matches_reference(out, lse, batch.q, k, v, batch.cu_q, batch.cu_k, causal=True, window=window)


# ----------------------------------------------------------------------------- flash-attn's own cases
# Source: Dao-AILab/flash-attention, tests/test_flash_attn.py (read at commit 0251105a), test_flash_attn_varlen_causal
# with paged_kv_block_size 256 / 512: batch 8, 9 heads (MHA), causal, `local` draws window_size from [0, seqlen_k)
# (two values), seqlen pairs below (and swapped), query and key lengths padded at random to [max(1, s - 20), s], the
# caches [ceil(seqlen_k / block) * 8 * 3, block, 9, d] with a table that is a random permutation of every block
# (3x the blocks a sequence needs), fp16 / bf16; forward asserted by
#     (out - out_ref).abs().max() <= 2 * (out_pt - out_ref).abs().max() + 1e-5
# (assert_matches_reference applies this rule with our float64 reference as "ref" and it in the inputs' dtype as
# "pt"). Left out: head dims we do not have (40, 59, 111, 160, 224), the backward (flash-attn skips it when paged).
FA_PAIRS = [(1, 239), (3, 799), (127, 512), (127, 513), (113, 203), (128, 217), (113, 211), (108, 256), (256, 512),
            (1023, 1024)]
FA_CASES = [(sq, sk, swap, d, local, block, dtype)
            for (sq, sk), swap, d, local, block, dtype in itertools.product(
                FA_PAIRS, [False, True], [d for d in (32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 224, 256)
                                          if d in HEAD_DIMS],
                [False, True], [256, 512], [torch.float16, torch.bfloat16])]
FA_CI = [(1, 239, False, 64, True, 256, torch.float16), (3, 799, True, 32, False, 512, torch.bfloat16),
         (113, 203, False, 32, True, 256, torch.bfloat16)]


def fa_case_id(case):
    sq, sk, swap, d, local, block, dtype = case
    return f"{sq}x{sk}{'-swap' if swap else ''}-d{d}{'-local' if local else ''}-block{block}-{str(dtype)[6:]}"


def run_flash_attn_case(fa, seqlen_q, seqlen_k, swap, d, local, block, dtype):
    if swap:
        seqlen_q, seqlen_k = seqlen_k, seqlen_q
    batch_size, heads = 8, 9
    g = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    window = (rng.randrange(seqlen_k), rng.randrange(seqlen_k)) if local else (-1, -1)
    num_blocks = math.ceil(seqlen_k / block) * batch_size * 3
    cache = PagedCache([0] * batch_size, heads, d, block, dtype, seed=1, spare_blocks=num_blocks)
    cache.table = torch.randperm(num_blocks, generator=g).int().view(batch_size, -1)
    query_lens = [rng.randint(max(1, seqlen_q - 20), seqlen_q) for _ in range(batch_size)]
    key_lens = [rng.randint(max(1, seqlen_k - 20), seqlen_k) for _ in range(batch_size)]
    batch = PagedBatch(query_lens, key_lens, heads, heads, d, block, dtype, seed=2, cache=cache)
    batch.check(fa, causal=True, window_size=window, reference_kw=dict(causal=True, window=window))


@pytest.mark.parametrize("case", FA_CI, ids=fa_case_id)
def test_flash_attn_varlen_causal_paged_sample(fa, case):
    run_flash_attn_case(fa, *case)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in FA_CASES if c not in FA_CI], ids=fa_case_id)
def test_flash_attn_varlen_causal_paged(fa, case):
    run_flash_attn_case(fa, *case)


# ---------------------------------------------------------------------------------------- bad inputs
def bad_call(fa, change):
    batch = PagedBatch([3, 5], [20, 40], 2, 2, 64, 16, torch.float32, seed=13)
    k, v, t = batch.cache.on_device()
    args = dict(q=batch.q.to(DEVICE), k=k, v=v, cu_seqlens_q=batch.cu_q.to(DEVICE), cu_seqlens_k=batch.cu_k.to(DEVICE),
                max_seqlen_q=5, max_seqlen_k=40, causal=True, block_table=t)
    args.update(change(args))
    return fa.flash_attn_varlen_func(**args)


@pytest.mark.parametrize("change, error, match", [
    (lambda a: {"block_table": a["block_table"].long()}, TypeError, "block_table must be torch.int32"),
    (lambda a: {"block_table": a["block_table"][0]}, ValueError, r"block_table must be \[batch, max_blocks"),
    (lambda a: {"block_table": a["block_table"][:1]}, ValueError, "block_table has 1 rows but cu_seqlens_q holds 2"),
    (lambda a: {"block_table": a["block_table"].to("meta")}, ValueError, "block_table is on meta"),
    (lambda a: {"block_table": a["block_table"][:, :2]}, ValueError, "block_table is too narrow: cu_seqlens_k gives "
                                                                     "sequence 1 40 keys"),
    (lambda a: {"block_table": torch.where(a["block_table"] == a["block_table"][1, 1], 99, a["block_table"])},
     ValueError, r"block_table\[1, 1\] = 99 is not a block of the cache"),
    (lambda a: {"k": a["k"].flatten(0, 1), "v": a["v"].flatten(0, 1)}, ValueError,
     "with block_table, k and v must be paged caches"),
    (lambda a: {"v": a["v"][:, :8]}, ValueError, "v_cache must have the shape of k_cache"),
    (lambda a: {"seqused_k": torch.tensor([20, 40, 1], dtype=torch.int32)}, ValueError, r"seqused_k must be \[batch\]"),
    (lambda a: {"seqused_k": torch.tensor([20, 40])}, TypeError, "seqused_k must be torch.int32"),
    (lambda a: {"seqused_k": torch.tensor([20, -1], dtype=torch.int32)}, ValueError, r"seqused_k\[1\] = -1"),
    (lambda a: {"seqused_k": torch.tensor([20, 49], dtype=torch.int32)}, ValueError,
     "block_table is too narrow: seqused_k gives sequence 1 49 keys"),
    (lambda a: {"cu_seqlens_k": None}, TypeError, "cu_seqlens_k may be None only with block_table and seqused_k"),
    (lambda a: {"max_seqlen_k": 30}, ValueError, "max_seqlen_k = 30 is smaller than the longest sequence"),
], ids=["table_dtype", "table_rank", "table_rows", "table_device", "table_too_narrow", "block_out_of_range",
        "kv_not_4d", "v_shape", "seqused_shape", "seqused_dtype", "seqused_negative", "seqused_too_many",
        "no_cu_seqlens_k", "max_seqlen_k"])
def test_bad_input(fa, change, error, match):
    with pytest.raises(error, match=match):
        bad_call(fa, change)


def test_seqused_k_past_its_span(fa):
    q = torch.randn(4, 2, 64)
    k = torch.randn(10, 2, 64)
    with pytest.raises(ValueError, match="seqused_k\\[1\\] = 7 is more than the 6 keys cu_seqlens_k gives sequence 1"):
        fa.flash_attn_varlen_func(q, k, k, cu([2, 2]), cu([4, 6]), 2, 6, seqused_k=torch.tensor([4, 7]).int())


def test_no_backward(fa):
    """A paged call works with grad enabled (transformers runs inference so) but backward() raises, naming it."""
    batch = PagedBatch([3, 5], [20, 40], 2, 2, 64, 16, torch.float32, seed=14)
    k, v, t = batch.cache.on_device()
    q = batch.q.to(DEVICE).requires_grad_()
    out = fa.flash_attn_varlen_func(q, k, v, batch.cu_q.to(DEVICE), batch.cu_k.to(DEVICE), 5, 40, block_table=t)
    with pytest.raises(NotImplementedError, match="flash_attn_varlen_func with block_table .* has no backward"):
        out.sum().backward()


def test_flash_attn_func_rejects_paged_arguments(fa):
    q = torch.randn(1, 4, 2, 64, device=DEVICE)
    for name in ("block_table", "seqused_k"):
        with pytest.raises(NotImplementedError, match=f"{name} is not supported by flash_attn_func"):
            fa.flash_attn_func(q, q, q, **{name: torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)})
