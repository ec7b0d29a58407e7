"""Wide heads and V head dims that differ from q's and k's (issue 17, item 2): head dim 512 and (q/k, v) = (192, 128),
(576, 512) in prefill (batched, varlen, paged) and decode (paged, split-K, the contiguous [B, S, H, D] route), with
flash-attn 3's argument semantics (out has V's head dim; softmax_scale defaults to 1/sqrt(q's head dim), the
reference's default). MLA passes V as a view of the latent K cache (k_cache[..., :512]): read in place, no copy (bytes
counters). The backward and unsupported head-dim pairs are rejected with clear errors, and a rejected call changes
nothing. Parity against the float64 reference on K/V gathered through the table in the test."""
import itertools

import pytest
import torch

from tests.helpers import DEVICE, DTYPES, HEAD_DIMS, KERNEL, SIMULATED, PagedCache
from tests.reference import assert_matches_reference

# The forward kernels' head dims that the square list (every op's) does not have: (q/k, v).
WIDE = [dims for dims in KERNEL.FORWARD_HEAD_DIMS if dims[0] != dims[1] or dims[0] not in HEAD_DIMS]
MLA = (576, 512)
slow = pytest.mark.slow


def ids(dims):
    return f"{dims[0]}x{dims[1]}"


def cu(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


def randn(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def paged_caches(lengths, Hkv, dims, block_size, dtype, seed=0):
    """(PagedCache, k_cache, v_cache): v_cache is k_cache[..., :DV] for MLA (a strided view of its storage), else its
    own cache of V's head dim."""
    D, DV = dims
    cache = PagedCache(lengths, Hkv, D, block_size, dtype, seed=seed)
    k_cache = cache.k.to(DEVICE)
    v_cache = k_cache[..., :DV] if dims == MLA else randn(*cache.k.shape[:3], DV, dtype=dtype, seed=seed + 7).to(DEVICE)
    return cache, k_cache, v_cache


def gathered(cache, lengths, k_cache, v_cache):
    parts = [cache.gather(b, n, (k_cache.cpu(), v_cache.cpu())) for b, n in enumerate(lengths)]
    return torch.cat([k for k, _ in parts]), torch.cat([v for _, v in parts])


def prefill_options(name, H):
    """(kernel kwargs, reference kwargs) of a mask / score option."""
    g = torch.Generator().manual_seed(11)
    sinks = torch.randn(H, generator=g) if name == "sinks" else None
    ref = dict(causal=name != "bidirectional", window=(23, 0) if name == "window" else (-1, -1),
               softcap=20.0 if name == "softcap" else 0.0, sinks=sinks)
    kw = dict(causal=ref["causal"], window_size=ref["window"], softcap=ref["softcap"],
              s_aux=None if sinks is None else sinks.to(DEVICE))
    return kw, ref


# ------------------------------------------------------------------------------------------------------ prefill
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dims", WIDE, ids=ids)
def test_varlen_prefill_dtypes(fa, dims, dtype):
    """Ragged sequences (query blocks and K tiles cut mid-way), GQA 4/2, causal; out [total, H, DV]."""
    D, DV = dims
    q_lens, k_lens = [37, 1, 40], [50, 9, 40]
    q, k = randn(sum(q_lens), 4, D, dtype=dtype, seed=1), randn(sum(k_lens), 2, D, dtype=dtype, seed=2)
    v = randn(sum(k_lens), 2, DV, dtype=dtype, seed=3)
    out, lse, _ = fa.flash_attn_varlen_func(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), cu(q_lens).to(DEVICE),
                                            cu(k_lens).to(DEVICE), max(q_lens), max(k_lens), causal=True,
                                            return_attn_probs=True)
    assert out.shape == (sum(q_lens), 4, DV)
    assert_matches_reference(out, lse, q, k, v, cu(q_lens), cu(k_lens), causal=True)


OPTIONS = ["window", "sinks", "softcap", "bidirectional"]


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("dims", [pytest.param(d, marks=[] if d == MLA else slow) for d in WIDE], ids=ids)
def test_batched_prefill_options(fa, dims, option):
    """flash_attn_func [B, S, H, D] with a window, sinks, softcap or no mask; GQA 6/2 (CI: MLA's dims)."""
    D, DV = dims
    B, S, H, Hkv = 2, 45, 6, 2
    q, k = randn(B, S, H, D, dtype=torch.float16, seed=4), randn(B, S, Hkv, D, dtype=torch.float16, seed=5)
    v = randn(B, S, Hkv, DV, dtype=torch.float16, seed=6)
    kw, ref = prefill_options(option, H)
    out, lse, _ = fa.flash_attn_func(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), return_attn_probs=True, **kw)
    assert out.shape == (B, S, H, DV)
    flat = lambda t: t.reshape(B * S, *t.shape[2:])   # noqa: E731
    assert_matches_reference(flat(out.cpu()), lse.cpu().permute(1, 0, 2).reshape(H, B * S), flat(q), flat(k), flat(v),
                             cu([S] * B), cu([S] * B), **ref)


@pytest.mark.parametrize("block_size", [16, pytest.param(32, marks=slow), pytest.param(256, marks=slow)])
@pytest.mark.parametrize("dims", WIDE, ids=ids)
def test_paged_prefill(fa, dims, block_size):
    """block_table: a decode row, a chunk after a cached prefix, a fresh prompt, a sequence without new tokens."""
    q_lens, k_lens = [1, 30, 41, 0], [90, 61, 41, 12]
    cache, k_cache, v_cache = paged_caches(k_lens, 2, dims, block_size, torch.float16, seed=block_size)
    q = randn(sum(q_lens), 4, dims[0], dtype=torch.float16, seed=8)
    out, lse, _ = fa.flash_attn_varlen_func(q.to(DEVICE), k_cache, v_cache, cu(q_lens).to(DEVICE), cu(k_lens).to(DEVICE),
                                            max(q_lens), max(k_lens), causal=True, block_table=cache.table.to(DEVICE),
                                            return_attn_probs=True)
    k, v = gathered(cache, k_lens, k_cache, v_cache)
    assert_matches_reference(out, lse, q, k, v, cu(q_lens), cu(k_lens), causal=True)


# ------------------------------------------------------------------------------------------------------- decode
def check_decode(fa, dims, dtype, seqlens, H, Hkv, Sq, num_splits, window=(-1, -1), block_size=16):
    cache, k_cache, v_cache = paged_caches(seqlens, Hkv, dims, block_size, dtype, seed=len(seqlens) + Sq)
    q = randn(len(seqlens), Sq, H, dims[0], dtype=dtype, seed=9)
    out, lse = fa.flash_attn_with_kvcache(q.to(DEVICE), k_cache, v_cache, cache_seqlens=cache.seqlens.to(DEVICE),
                                          block_table=cache.table.to(DEVICE), causal=True, window_size=window,
                                          num_splits=num_splits, return_softmax_lse=True)
    B = len(seqlens)
    assert out.shape == (B, Sq, H, dims[1])
    k, v = gathered(cache, seqlens, k_cache, v_cache)
    assert_matches_reference(out.cpu().reshape(B * Sq, H, dims[1]), lse.cpu().permute(1, 0, 2).reshape(H, B * Sq),
                             q.reshape(B * Sq, H, dims[0]), k, v, cu([Sq] * B), cu(seqlens), causal=True, window=window)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dims", WIDE, ids=ids)
def test_paged_decode(fa, dims, dtype, num_splits):
    """One and two new tokens per sequence (GQA 8/2: 8 and 16 query rows per KV head), with and without split-K."""
    check_decode(fa, dims, dtype, [70, 33, 1], 8, 2, 2 if num_splits == 3 else 1, num_splits)


@pytest.mark.parametrize("dims", [pytest.param(d, marks=[] if d == MLA else slow) for d in WIDE], ids=ids)
def test_decode_window_many_rows(fa, dims):
    """A sliding window; 40 query rows per KV head (two row chunks), block size 32, the heuristic split."""
    check_decode(fa, dims, torch.bfloat16, [130, 64], 20, 1, 2, 0, window=(47, 0), block_size=32)


def test_contiguous_decode_route(fa):
    """flash_attn_func with a few new tokens runs the decode kernel on a contiguous cache: V's head dim there too."""
    D, DV = MLA
    q, k = randn(2, 3, 4, D, dtype=torch.float16, seed=12), randn(2, 50, 1, D, dtype=torch.float16, seed=13)
    v = k[..., :DV]
    out, lse, _ = fa.flash_attn_func(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), causal=True, return_attn_probs=True)
    assert out.shape == (2, 3, 4, DV)
    assert_matches_reference(out.cpu().reshape(6, 4, DV), lse.cpu().permute(1, 0, 2).reshape(4, 6), q.reshape(6, 4, D),
                             k.reshape(100, 1, D), v.reshape(100, 1, DV), cu([3, 3]), cu([50, 50]), causal=True)


# -------------------------------------------------------------------------------------------- MLA: V in place
@pytest.mark.skipif(not SIMULATED, reason="bytes counters exist only in the simulator build")
@pytest.mark.parametrize("op", ["decode", "paged_prefill"])
def test_mla_value_view_is_read_in_place(fa, counters, op):
    """V = k_cache[..., :512] is bound as the K cache's own storage and taken from the K tile (FC_V_IN_K_TILE): the
    bytes read from the cache are each visible key's 576-element row once (decode: per KV head; prefill: per query
    head and query block's band), no V tile is loaded, and nothing is copied (the bytes written are the outputs')."""
    D, DV = MLA
    seqlens, Hkv = [70, 33], 1
    cache, k_cache, v_cache = paged_caches(seqlens, Hkv, MLA, 16, torch.float16)
    assert v_cache.untyped_storage().data_ptr() == k_cache.untyped_storage().data_ptr() and v_cache.stride(2) == D
    table = cache.table.to(DEVICE)
    counters()
    if op == "decode":
        out, lse = fa.flash_attn_with_kvcache(randn(2, 1, 8, D, dtype=torch.float16, seed=3).to(DEVICE), k_cache, v_cache,
                                              cache_seqlens=cache.seqlens.to(DEVICE), block_table=table, num_splits=1,
                                              return_softmax_lse=True)
    else:
        out, lse, _ = fa.flash_attn_varlen_func(randn(sum(seqlens), 8, D, dtype=torch.float16, seed=3).to(DEVICE),
                                                k_cache, v_cache, cu(seqlens).to(DEVICE), cu(seqlens).to(DEVICE),
                                                max(seqlens), max(seqlens), causal=True, block_table=table,
                                                return_attn_probs=True)
    c = counters()
    cache_bytes = c.get("device_bytes_read[1]", 0) + c.get("device_bytes_read[2]", 0)
    if op == "decode":
        assert cache_bytes == sum(seqlens) * Hkv * D * 2
    else:   # each query head's block of 32 rows reads its band's keys: block i of sequence b min(32 (i + 1), n) keys
        reads = sum(min(fa.PREFILL_BLOCK_Q * (i + 1), n) for n in seqlens for i in range(-(-n // fa.PREFILL_BLOCK_Q)))
        assert cache_bytes == reads * 8 * D * 2
    assert c["device_bytes_written"] == out.numel() * 2 + lse.numel() * 4   # the outputs only: no copy of a cache
    assert c["v_tiles_loaded"] == 0 < c["k_tiles_loaded"]


@pytest.mark.parametrize("offset", [64, 0])
def test_value_view_elsewhere_in_the_rows(fa, offset):
    """A V view that is not the rows' first elements (offset 64), or a copy of them (offset 0, another storage), is
    read as a V cache of its own: the same results as the reference."""
    D, DV = MLA
    cache, k_cache, _ = paged_caches([45, 20], 1, MLA, 16, torch.float16)
    v_cache = k_cache[..., offset:offset + DV]
    v_cache = v_cache if offset else v_cache.clone()
    q = randn(2, 1, 4, D, dtype=torch.float16, seed=2)
    out, lse = fa.flash_attn_with_kvcache(q.to(DEVICE), k_cache, v_cache, cache_seqlens=cache.seqlens.to(DEVICE),
                                          block_table=cache.table.to(DEVICE), return_softmax_lse=True)
    k, v = gathered(cache, [45, 20], k_cache, v_cache)
    assert_matches_reference(out.cpu().reshape(2, 4, DV), lse.cpu().permute(1, 0, 2).reshape(4, 2), q.reshape(2, 4, D),
                             k, v, cu([1, 1]), cu([45, 20]))


# ----------------------------------------------------------------------------------------------- rejected calls
@pytest.mark.parametrize("dims", [(128, 64), (512, 256), (576, 128)], ids=ids)
def test_unsupported_pairs(fa, dims):
    """A V head dim that differs from q's outside the pairs: ValueError naming v (v_cache) and listing the pairs."""
    D, DV = dims
    q, k, v = torch.randn(1, 4, 2, D), torch.randn(1, 4, 2, D), torch.randn(1, 40, 2, DV)
    with pytest.raises(ValueError, match=rf"v has head_dim {DV} but q and k have {D}.*\(192, 128\), \(576, 512\)"):
        fa.flash_attn_func(q.to(DEVICE), k.to(DEVICE), v[:, :4].to(DEVICE))
    with pytest.raises(ValueError, match=rf"v_cache has head_dim {DV} but q and k have {D}.*\(192, 128\), \(576, 512\)"):
        fa.flash_attn_with_kvcache(q[:, :1].to(DEVICE), torch.randn(1, 40, 2, D).to(DEVICE), v.to(DEVICE),
                                   cache_seqlens=10)


def test_unsupported_head_dim_lists_the_wide_ones(fa):
    q = torch.randn(1, 4, 2, 1024).to(DEVICE)
    with pytest.raises(NotImplementedError, match=r"head_dim 1024 is not supported; supported head dims: 32, .*256, 512 "
                                                  r"\(and \(q/k, v\) pairs \(192, 128\), \(576, 512\)\)"):
        fa.flash_attn_func(q, q, q)


def test_rejected_append_changes_nothing(fa):
    """Appending k/v to an MLA cache (V a view of K) is not supported: NotImplementedError naming both head dims,
    and the cache (both views) stays byte-identical; so does a quantized cache whose head dims differ."""
    D, DV = MLA
    cache, k_cache, v_cache = paged_caches([20], 1, MLA, 16, torch.float16)
    before = k_cache.clone()
    q, new = torch.randn(1, 1, 2, D).half().to(DEVICE), torch.randn(1, 1, 1, D).half().to(DEVICE)
    with pytest.raises(NotImplementedError, match=rf"different head dims \(k_cache {D}, v_cache {DV}\)"):
        fa.flash_attn_with_kvcache(q, k_cache, v_cache, k=new, v=new[..., :DV], cache_seqlens=cache.seqlens.to(DEVICE),
                                   block_table=cache.table.to(DEVICE))
    assert torch.equal(k_cache.cpu(), before.cpu())
    packed, scales, biases = fa.quantize_kv(cache.k.to(DEVICE), 8, 64)
    with pytest.raises(ValueError, match="only plain .unquantized. caches may differ in the head dim"):
        fa.flash_attn_with_kvcache(q, packed, v_cache, cache_seqlens=cache.seqlens.to(DEVICE),
                                   block_table=cache.table.to(DEVICE), k_scales=scales, k_biases=biases,
                                   kv_bits=(8, 0), kv_group_size=64)


def test_quantized_wide_heads_rejected(fa):
    """Quantized caches stop at head dim 256 (KV_QUANT_MAX_HEAD_DIM): a 512-wide affine or fp8 cache gets a ValueError
    naming the limit, from the decode call (with new tokens to append) and from the write, and nothing is written."""
    D = 512
    cache, k_cache, _ = paged_caches([20], 1, (D, D), 16, torch.float16)
    packed, scales, biases = fa.quantize_kv(cache.k.to(DEVICE), 8, 64)
    fp8 = k_cache.to(torch.float8_e4m3fn)
    descale = torch.ones(1, 1, device=DEVICE)
    q, new = torch.randn(1, 1, 2, D).half().to(DEVICE), torch.randn(1, 1, 1, D).half().to(DEVICE)
    lens, table = cache.seqlens.to(DEVICE), cache.table.to(DEVICE)
    affine = dict(k_scales=scales, k_biases=biases, v_scales=scales, v_biases=biases, kv_bits=(8, 8), kv_group_size=64)
    before = [t.clone() for t in (packed, scales, biases, fp8)]
    limit = "quantized caches .kv_bits or fp8. support head dims up to 256, got head_dim 512"
    with pytest.raises(ValueError, match=limit):
        fa.flash_attn_with_kvcache(q, packed, packed, k=new, v=new, cache_seqlens=lens, block_table=table, **affine)
    with pytest.raises(ValueError, match=limit):
        fa.kv_cache_write(new, new, packed, packed, table, lens, **affine)
    with pytest.raises(ValueError, match=limit):
        fa.flash_attn_with_kvcache(q, fp8, fp8, k=new, v=new, cache_seqlens=lens, block_table=table,
                                   k_descale=descale, v_descale=descale)
    assert all(torch.equal(a.cpu().view(torch.uint8), b.cpu().view(torch.uint8))
               for a, b in zip((packed, scales, biases, fp8), before))


@pytest.mark.parametrize("dims", [(512, 512), (192, 128)], ids=ids)
def test_backward_rejects_forward_only_head_dims(fa, dims):
    D, DV = dims
    q, k = torch.randn(1, 6, 2, D, requires_grad=True), torch.randn(1, 6, 2, D, requires_grad=True)
    v = torch.randn(1, 6, 2, DV, requires_grad=True)
    out = fa.flash_attn_func(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), causal=True)
    assert out.shape[-1] == DV
    with pytest.raises(NotImplementedError, match=rf"no kernel for head_dim {D} \(q, k\) and head_dim_v {DV}"):
        out.sum().backward()
