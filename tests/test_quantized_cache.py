"""Quantized KV caches (issue 16): quantize_kv / dequantize_kv bit for bit against MLX (mode "affine", its CPU
stream), the quantizing KV write, and its argument checks."""
import mlx.core as mx   # test-only dependency (requirements.txt): the mlx-cpu wheel runs on x86_64 Linux
import numpy as np
import pytest
import torch

from tests.helpers import DEVICE, DTYPES, KERNEL, REPO, PagedCache
from tests.reference import affine_values, assert_matches_reference, attention_reference

REPO_README = (REPO / "README.md").read_text()
BITS = [4, 8]
GROUPS = [32, 64, 128]


def to_mlx(t):
    """A torch tensor as an MLX array of the same dtype (bf16 through fp32: exact)."""
    dtype = {torch.float32: mx.float32, torch.float16: mx.float16, torch.bfloat16: mx.bfloat16}[t.dtype]
    return mx.array(t.float().cpu().numpy()).astype(dtype)


def from_mlx(a):
    if a.dtype == mx.uint32:
        return torch.from_numpy(np.array(a).view(np.int32)).view(torch.uint32)
    dtype = {mx.float32: torch.float32, mx.float16: torch.float16, mx.bfloat16: torch.bfloat16}[a.dtype]
    return torch.from_numpy(np.array(a.astype(mx.float32))).to(dtype)


def mlx_quantize(x, bits, group_size):
    with mx.stream(mx.cpu):
        return tuple(from_mlx(a) for a in mx.quantize(to_mlx(x), group_size=group_size, bits=bits))


def assert_bits_equal(ours, theirs):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert torch.equal(bytes_of(ours), bytes_of(theirs))


def bytes_of(t):
    return t.cpu().contiguous().view(torch.uint8)


def awkward_rows(rows, dim, dtype, seed=0):
    """Random rows plus the edge cases of the affine rule: constant groups (zero, positive, negative, tiny), groups
    whose larger edge is negative, a group spanning two values, and large magnitudes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g) * torch.logspace(-3, 2, rows).unsqueeze(1)
    x[0] = 0.0
    x[1] = 3.25
    x[2] = -0.7
    x[3] = 1e-8
    x[4] = torch.randn(dim, generator=g).abs() * -5 + 0.1
    x[5] = torch.where(torch.arange(dim) % 2 == 0, 1.0, -1.0)
    x[6, : dim // 2] = 0.0
    return x.to(dtype)


@pytest.fixture(params=["exact", "gpu"])
def numerics(request, monkeypatch):
    """The simulator's exact twin, or its GPU-numerics twin (fast math as Apple's compiler builds by default: `/` may
    be a reciprocal multiply), where a Mac's bit differences from MLX / torch would show."""
    monkeypatch.setenv("MSLSIM_GPU_NUMERICS", "1" if request.param == "gpu" else "0")
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_quantize_matches_mlx(fa, numerics, bits, group_size, dtype):
    x = awkward_rows(24, 256, dtype, seed=bits + group_size).view(2, 3, 4, 256)
    packed, scales, biases = fa.quantize_kv(x.to(DEVICE), bits, group_size)
    expected = mlx_quantize(x, bits, group_size)
    for ours, theirs in zip((packed, scales, biases), expected):
        assert_bits_equal(ours, theirs.view(ours.shape))
    with mx.stream(mx.cpu):
        theirs = mx.dequantize(mx.array(packed.cpu().view(torch.int32).numpy()).view(mx.uint32), to_mlx(scales),
                               to_mlx(biases), group_size=group_size, bits=bits)
    dequantized = fa.dequantize_kv(packed, scales, biases, bits, group_size)
    assert_bits_equal(dequantized, from_mlx(theirs))
    # the exact affine values the tests' reference uses: mlx's two roundings to the dtype away at most
    exact, rounded = affine_values(packed, scales, biases, bits, group_size), dequantized.cpu().double()
    bias = biases.cpu().double().repeat_interleave(group_size, dim=-1)
    assert ((exact - rounded).abs() <= torch.finfo(dtype).eps * (2 * rounded.abs() + bias.abs())).all()


def test_quantize_strided_and_empty(fa):
    """A non-contiguous input quantizes like its contiguous copy; no rows gives empty outputs."""
    x = torch.randn(6, 128, 2).to(DEVICE)[..., 0]
    for ours, theirs in zip(fa.quantize_kv(x, 4, 32), fa.quantize_kv(x.contiguous(), 4, 32)):
        assert torch.equal(ours, theirs)
    packed, scales, biases = fa.quantize_kv(torch.zeros(0, 64, device=DEVICE), 8, 64)
    assert packed.shape == (0, 16) and scales.shape == biases.shape == (0, 1)


@pytest.mark.parametrize("kwargs, exception, words", [
    (dict(bits=3), ValueError, "bits must be 4 or 8, got 3"),
    (dict(group_size=16), ValueError, "group_size must be 32, 64 or 128"),
    (dict(x=torch.zeros(2, 96)), ValueError, "multiple of group_size 64"),
    (dict(x=torch.zeros(2, 64, dtype=torch.int32)), TypeError, "x has dtype Int"),
])
def test_quantize_bad_input(fa, kwargs, exception, words):
    args = dict(x=torch.zeros(2, 64), bits=4, group_size=64) | kwargs
    with pytest.raises(exception, match=words):
        fa.quantize_kv(args["x"].to(DEVICE), args["bits"], args["group_size"])


class QuantCache:
    """A paged (or contiguous) cache quantized with quantize_kv (k_bits / v_bits independently), and its plain
    source: the reference attends to the exact affine values of it (affine_values)."""

    def __init__(self, seqlens, Hkv, D, block_size, dtype, k_bits, v_bits, group_size, paged=True, seed=0):
        self.paged = paged
        self.group_size, self.k_bits, self.v_bits = group_size, k_bits, v_bits
        if paged:
            self.plain = PagedCache(seqlens, Hkv, D, block_size, dtype, seed=seed)
            k, v = self.plain.k, self.plain.v
        else:
            g = torch.Generator().manual_seed(seed)
            k, v = (torch.randn(len(seqlens), block_size, Hkv, D, generator=g).to(dtype) for _ in range(2))
        self.k = [t.to(DEVICE) for t in fa_quantize(k, k_bits, group_size)]
        self.v = [t.to(DEVICE) for t in fa_quantize(v, v_bits, group_size)]
        self.table = self.plain.table.to(DEVICE) if paged else None
        self.seqlens = torch.tensor(seqlens, dtype=torch.int32)

    def kwargs(self):
        return dict(k_scales=self.k[1], k_biases=self.k[2], v_scales=self.v[1], v_biases=self.v[2],
                    kv_bits=(self.k_bits, self.v_bits), kv_group_size=self.group_size)

    def affine(self):
        return (affine_values(*self.k, self.k_bits, self.group_size),
                affine_values(*self.v, self.v_bits, self.group_size))


def fa_quantize(x, bits, group_size):
    return KERNEL.quantize_kv(x.to(DEVICE), bits, group_size)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k_bits, v_bits, group_size", [(4, 4, 64), (8, 8, 32), (8, 4, 128), (4, 8, 32)])
@pytest.mark.parametrize("paged", [True, False], ids=["paged", "contiguous"])
def test_write_quantizes_like_quantize_kv(fa, k_bits, v_bits, group_size, dtype, paged):
    """Appended rows land in the cache exactly as quantize_kv of them (words, scales and biases); nothing else
    changes."""
    B, Hkv, D, block_size = 2, 2, 128, 16
    slots = block_size if paged else 40   # slots per block (a contiguous cache: per sequence)
    cache = QuantCache([19, 3], Hkv, D, slots, dtype, k_bits, v_bits, group_size, paged=paged)
    g = torch.Generator().manual_seed(5)
    k, v = (torch.randn(B, 5, Hkv, D, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    seqlens = torch.tensor([19, 3], dtype=torch.int32, device=DEVICE)
    table = cache.table if paged else torch.arange(B, dtype=torch.int32, device=DEVICE).view(B, 1)
    before = [t.clone() for t in (*cache.k, *cache.v)]
    fa.kv_cache_write(k, v, cache.k[0], cache.v[0], table, seqlens, **cache.kwargs())
    expected = [t.clone() for t in before]
    for b in range(B):
        for i in range(5):
            pos = int(seqlens[b]) + i
            block, slot = int(table[b, pos // slots]), pos % slots
            for j, (new, bits) in enumerate(((k, k_bits), (v, v_bits))):
                for part, value in enumerate(fa.quantize_kv(new[b, i], bits, group_size)):
                    expected[3 * j + part][block, slot] = value
    for ours, theirs in zip((*cache.k, *cache.v), expected):
        assert torch.equal(bytes_of(ours), bytes_of(theirs))


def write_args():
    cache = QuantCache([10, 4], 2, 64, 16, torch.float16, 8, 4, 32)
    k = torch.randn(2, 2, 2, 64).half().to(DEVICE)
    return cache, dict(k=k, v=-k, k_cache=cache.k[0], v_cache=cache.v[0], block_table=cache.table,
                       cache_seqlens=torch.tensor([10, 4], dtype=torch.int32, device=DEVICE), **cache.kwargs())


BAD_QUANT = {
    "bits 3": (lambda c, a: dict(kv_bits=(3, 4)), ValueError, "4 or 8 bits each, got k_bits = 3"),
    "bits missing": (lambda c, a: dict(kv_bits=None), ValueError, r"pass kv_bits=\(k_bits, v_bits\)"),
    "bits on a plain cache": (lambda c, a: dict(k_cache=torch.zeros(4, 16, 2, 64, dtype=torch.float16, device=DEVICE)),
                              ValueError, "k_scales / k_biases are for quantized caches"),
    "group 48": (lambda c, a: dict(kv_group_size=48), ValueError, "kv_group_size must be 32, 64 or 128"),
    "group not dividing": (lambda c, a: dict(k_cache=a["k_cache"][..., :4], v_cache=a["v_cache"][..., :2],
                                             kv_bits=(8, 4), kv_group_size=64, k=a["k"][..., :16],
                                             v=a["v"][..., :16]),
                           ValueError, "kv_group_size 64 does not divide head_dim 16"),
    "no scales": (lambda c, a: dict(k_scales=None), ValueError, "k_cache is quantized: pass k_scales and k_biases"),
    "scales dtype": (lambda c, a: dict(v_scales=a["v_scales"].float()), TypeError, "v_scales has dtype Float"),
    "scales shape": (lambda c, a: dict(k_biases=a["k_biases"][..., :1]), ValueError, r"k_biases must be \[5, 16, 2, 2\]"),
    "biases strides": (lambda c, a: dict(k_biases=a["k_biases"].transpose(0, 1).contiguous().transpose(0, 1)),
                       ValueError, "k_biases must have the strides of k_scales"),
    "v shape": (lambda c, a: dict(v_cache=a["v_cache"][..., :4]), ValueError, "v_cache must have the shape of k_cache"),
    "descale on affine": (lambda c, a: dict(k_descale=torch.ones(2, 2, device=DEVICE)), ValueError,
                          "k_descale is for fp8 caches"),
    "fp8 without descale": (lambda c, a: dict(v_cache=torch.zeros(6, 16, 2, 64, dtype=torch.uint8, device=DEVICE),
                                              kv_bits=(8, 0), v_scales=None, v_biases=None),
                            ValueError, r"v_cache is fp8 \(Byte\): pass v_descale"),
    "descale shape": (lambda c, a: dict(v_cache=torch.zeros(6, 16, 2, 64, dtype=torch.uint8, device=DEVICE),
                                        kv_bits=(8, 0), v_scales=None, v_biases=None,
                                        v_descale=torch.ones(2, device=DEVICE)),
                      ValueError, r"v_descale must be \[batch, kv_heads\] = \[2, 2\]"),
    # the write's scales are in its new tokens' dtype (the decode op's: q's)
    "new k dtype": (lambda c, a: dict(k=a["k"].float(), v=a["v"].float()), TypeError, "k_scales has dtype Half but k"),
}


@pytest.mark.parametrize("case", BAD_QUANT)
@pytest.mark.parametrize("op", ["kv_cache_write", "flash_attn_with_kvcache"])
def test_quantized_bad_input_changes_nothing(fa, case, op):
    make, exception, words = BAD_QUANT[case]
    cache, args = write_args()
    before = [bytes_of(t) for t in (*cache.k, *cache.v)]
    args.update(make(cache, args))
    if op == "flash_attn_with_kvcache":
        if case == "new k dtype":   # the decode op's new tokens must have q's dtype
            words = "k \\(new tokens\\) has dtype Float"
        q = torch.randn(2, 1, 4, args["k"].shape[-1]).half().to(DEVICE)
        call = lambda: fa.flash_attn_with_kvcache(q, args.pop("k_cache"), args.pop("v_cache"), args.pop("k"),
                                                  args.pop("v"), block_table=args.pop("block_table"), **args)
    else:
        call = lambda: fa.kv_cache_write(args.pop("k"), args.pop("v"), args.pop("k_cache"), args.pop("v_cache"),
                                         args.pop("block_table"), args.pop("cache_seqlens"), **args)
    with pytest.raises(exception, match=words):
        call()
    assert all(torch.equal(bytes_of(t), b) for t, b in zip((*cache.k, *cache.v), before))


# ------------------------------------------------------------------------------------------ decode on the caches
def decode_on_quantized(fa, cache, q, causal=True, window=(-1, -1), softcap=0.0, sinks=None, alibi=None,
                        num_splits=0, new_kv=None, leftpad=None):
    """flash_attn_with_kvcache on a QuantCache (appending new_kv first, quantized on the way in) against the float64
    reference on the exact affine values of the cache (from cache_leftpad `leftpad`, contiguous caches); returns (out,
    the reference inputs)."""
    B, Sq, H, D = q.shape
    seqlens = cache.seqlens.to(DEVICE)
    kw = dict(causal=causal, window_size=window, softcap=softcap, num_splits=num_splits, return_softmax_lse=True,
              cache_seqlens=seqlens, s_aux=None if sinks is None else sinks.to(DEVICE),
              alibi_slopes=None if alibi is None else alibi.to(DEVICE), **cache.kwargs())
    if cache.paged:
        kw["block_table"] = cache.table
    if leftpad is not None:
        kw["cache_leftpad"] = torch.tensor(leftpad, dtype=torch.int32, device=DEVICE)
    if new_kv is not None:
        kw.update(k=new_kv[0].to(DEVICE), v=new_kv[1].to(DEVICE))
    out, lse = fa.flash_attn_with_kvcache(q.to(DEVICE), cache.k[0], cache.v[0], **kw)
    lengths = [int(n) + (0 if new_kv is None else new_kv[0].shape[1]) for n in cache.seqlens]
    keys, values = gather(cache, cache.affine(), lengths)
    if leftpad is not None:
        keys, values = ([t[first:] for t, first in zip(ts, leftpad)] for ts in (keys, values))
        lengths = [n - first for n, first in zip(lengths, leftpad)]
    cu_q = torch.arange(B + 1, dtype=torch.int32) * Sq
    cu_k = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    rkw = dict(causal=causal, window=window, softcap=softcap, sinks=sinks, alibi_slopes=alibi)
    inputs = (q.reshape(B * Sq, H, D), torch.cat(keys), torch.cat(values), cu_q, cu_k)
    assert_matches_reference(out.cpu().reshape(B * Sq, H, D), lse.cpu().permute(1, 0, 2).reshape(H, B * Sq), *inputs,
                             **rkw)
    return out.cpu(), lengths, rkw


def gather(cache, kv, lengths):
    k, v = (t.cpu() for t in kv)
    if cache.paged:
        return zip(*[cache.plain.gather(b, n, (k, v)) for b, n in enumerate(lengths)])
    return [k[b, :n] for b, n in enumerate(lengths)], [v[b, :n] for b, n in enumerate(lengths)]


FEATURES = {
    "causal": {},
    "window": dict(window=(40, 0)),
    "sinks": dict(sinks=True),
    "softcap": dict(softcap=8.0),
    "alibi": dict(alibi=True),
}
# (k_bits, v_bits) x group x layout x feature x (H, Hkv): the full product is the slow matrix, every 7th case CI's
# (7 is prime to every factor, so the sample covers each value of each). Rows per KV head: 1, 2 and 4 take the vector
# path, 8 the direct path, 16 the tile path.
MATRIX = [(bits, group, paged, feature, heads)
          for bits in [(4, 4), (8, 8), (8, 4)] for group in GROUPS for paged in (True, False) for feature in FEATURES
          for heads in [(4, 4), (4, 2), (8, 2), (16, 2), (32, 2)]]
CI_MATRIX = MATRIX[::7]


def run_matrix_case(fa, bits, group, paged, feature, heads, dtype=torch.float16, D=128, Sq=1, new=0, splits=0):
    (H, Hkv), extra = heads, dict(FEATURES[feature])
    seqlens = [300, 57, 1]
    cache = QuantCache(seqlens, Hkv, D, 16 if paged else 320, dtype, *bits, group, paged=paged, seed=group + H)
    g = torch.Generator().manual_seed(H)
    if extra.pop("sinks", False):
        extra["sinks"] = torch.randn(H, generator=g)
    if extra.pop("alibi", False):
        extra["alibi"] = torch.rand(H, generator=g) * 0.1
    q = torch.randn(len(seqlens), Sq, H, D, generator=g).to(dtype)
    new_kv = tuple(torch.randn(len(seqlens), new, Hkv, D, generator=g).to(dtype) for _ in range(2)) if new else None
    return decode_on_quantized(fa, cache, q, num_splits=splits, new_kv=new_kv, **extra)


def matrix_id(case):
    bits, group, paged, feature, (H, Hkv) = case
    return f"k{bits[0]}v{bits[1]}-g{group}-{'paged' if paged else 'contig'}-{feature}-H{H}kv{Hkv}"


@pytest.mark.parametrize("case", CI_MATRIX, ids=matrix_id)
def test_decode_matrix(fa, case):
    run_matrix_case(fa, *case)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in MATRIX if c not in CI_MATRIX], ids=matrix_id)
def test_decode_matrix_full(fa, case):
    run_matrix_case(fa, *case)


@pytest.mark.parametrize("bits", [(8, 4), (4, 8)], ids=["k8v4", "k4v8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [32, 64, 96, 192, 256])
def test_decode_head_dims_and_dtypes(fa, dtype, D, bits):
    """Head dims other than 64 / 128 take the tile path, D 64 the vector path (4 rows), in every dtype; group 32 and
    (where it divides D) 64."""
    run_matrix_case(fa, bits, 32 if bits[0] == 8 or D % 64 else 64, True, "causal", (8, 2), dtype=dtype, D=D)


# (D, query heads per KV head = rows R, (k_bits, v_bits), group size): each D, R, bit mix and group size at least once.
VECTOR_TILE_CASES = [(64, 1, (4, 8), 32), (64, 2, (8, 4), 64), (64, 4, (8, 8), 32), (128, 1, (8, 4), 128),
                     (128, 2, (4, 4), 64), (128, 4, (4, 8), 128)]


@pytest.mark.parametrize("D, group, bits, group_size", VECTOR_TILE_CASES, ids=lambda x: str(x))
def test_vector_path_tiles(fa, counters, D, group, bits, group_size):
    """The vector path's per-simdgroup tiles of 32 keys, on a paged cache of 5-slot blocks (a tile's keys span up to 8
    blocks) and on a contiguous cache with cache_leftpad (keys starting mid-tile): with a window that leaves 8-key groups
    of a tile empty, and with one partition of 441 keys, so each of the 4 key slices takes several tiles (the running
    rescale carried from tile to tile); the tile counter equals the 32-key tiles that overlap each band."""
    Hkv, seqlens, leftpad = 2, [441, 77, 9], [37, 0, 3]
    q = torch.randn(len(seqlens), 1, group * Hkv, D, generator=torch.Generator().manual_seed(D + group)).to(torch.float16)
    for paged in (True, False):
        cache = QuantCache(seqlens, Hkv, D, 5 if paged else 480, torch.float16, *bits, group_size, paged=paged,
                           seed=D + group)
        first = [0] * len(seqlens) if paged else leftpad
        for window, splits in (((70, 0), 0), ((-1, -1), 1)):
            counters(reset=True)
            decode_on_quantized(fa, cache, q, window=window, num_splits=splits, leftpad=None if paged else leftpad)
            bands = [(max(0, n - f - 1 - window[0]) if window[0] >= 0 else 0, n - f) for n, f in zip(seqlens, first)]
            tiles = sum(-(-hi // 32) - lo // 32 for lo, hi in bands) * Hkv
            assert counters()["vector_tiles"] == tiles, (paged, window)


@pytest.mark.parametrize("paged", [True, False], ids=["paged-12", "contiguous-leftpad"])
def test_vector_path_runs(fa, counters, paged):
    """Run addressing: an 8-key group whose keys all exist in consecutive slots of one block is read from its first
    key's offset (no shuffle a key), a group that crosses a block boundary key by key. 12-slot blocks (the table
    scatters them) mix both in each tile (positions 8..15 cross, 16..23 do not); a contiguous cache with cache_leftpad
    has no boundary, and its groups start at unaligned positions. The output matches the reference and the counter
    counts the groups this rule gives."""
    Hkv, D, group, seqlens, leftpad = 2, 128, 4, [441, 77, 9], [37, 0, 3]
    block_size = 12 if paged else 480
    q = torch.randn(len(seqlens), 1, group * Hkv, D, generator=torch.Generator().manual_seed(11)).to(torch.float16)
    cache = QuantCache(seqlens, Hkv, D, block_size, torch.float16, 4, 8, 64, paged=paged, seed=11)
    first = [0] * len(seqlens) if paged else leftpad
    counters(reset=True)
    decode_on_quantized(fa, cache, q, num_splits=1, leftpad=None if paged else leftpad)
    runs = sum(1 for n, f in zip(seqlens, first) for key in range(0, n - f - 7, 8)   # whole groups, one block
               if (f + key) // block_size == (f + key + 7) // block_size)
    assert runs > 0 and (not paged or runs < sum((n - f) // 8 for n, f in zip(seqlens, first)))
    assert counters()["vector_run_groups"] == runs * Hkv


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_unaligned_rows(fa, counters, dtype):
    """Packed rows that do not start on 16-byte boundaries (a cache sliced from wider rows) take the tile path."""
    Hkv, D, seqlens = 2, 128, [300, 57, 1]
    cache = QuantCache(seqlens, Hkv, D, 320, dtype, 8, 4, 64, paged=False, seed=3)
    for kv in (cache.k, cache.v):
        wider = torch.zeros(*kv[0].shape[:-1], kv[0].shape[-1] + 1, dtype=kv[0].dtype, device=DEVICE)
        kv[0] = wider[..., :-1].copy_(kv[0])
    q = torch.randn(len(seqlens), 1, 8, D, generator=torch.Generator().manual_seed(3)).to(dtype)
    counters(reset=True)
    decode_on_quantized(fa, cache, q, softcap=8.0)
    assert counters()["k_tiles_loaded"] > 0


@pytest.mark.parametrize("Sq, new, splits", [(1, 1, 0), (3, 3, 0), (4, 2, 1), (2, 0, 5)])
def test_decode_append_multi_query_and_splits(fa, Sq, new, splits):
    """Sq_new > 1, new tokens quantized on the way in (the reference reads their affine values back), forced split
    counts (1: no split-K; 5: split-K with the reduce)."""
    run_matrix_case(fa, (4, 8), 64, True, "window", (8, 2), Sq=Sq, new=new, splits=splits)


# (query heads per KV head, new tokens) -> rows per KV head 1..4 (vector path, R = 1, 2, 4 with padded rows), 5 and 8
# (direct path).
VECTOR_ROWS = [(1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (2, 2), (4, 1), (1, 5), (8, 1)]


@pytest.mark.parametrize("group, sq", VECTOR_ROWS, ids=lambda x: str(x))
@pytest.mark.parametrize("D", [64, 128])
def test_decode_rows_per_path(fa, counters, group, sq, D):
    """Every row count on the vector path (and its neighbours on the direct path), with Sq_new > 1 (causal inside the
    new tokens), window, sinks, softcap and ALiBi at once, mixed bits and group sizes, against float64; then without
    causal or window masks (every row sees every key: the vector path's whole 8-key groups skip the mask tests, also
    with padded rows, 3 -> 4). The last sequence ends on an 8-key boundary: its last group is whole, and with Sq_new > 1
    and a causal mask its mask tests must still run."""
    Hkv, seqlens, bits = 2, [300, 57, 1 + sq, 64], ((4, 8) if sq % 2 else (8, 4))
    cache = QuantCache(seqlens, Hkv, D, 16, torch.float16, *bits, 32 if D == 64 else 64, paged=True, seed=group * 7 + sq)
    g = torch.Generator().manual_seed(sq)
    H = group * Hkv
    q = torch.randn(len(seqlens), sq, H, D, generator=g).to(torch.float16)
    sinks, alibi = torch.randn(H, generator=g), torch.rand(H, generator=g) * 0.1
    for causal, window in ((True, (60, 0)), (False, (-1, -1))):
        counters(reset=True)
        decode_on_quantized(fa, cache, q, causal=causal, window=window, softcap=8.0, sinks=sinks, alibi=alibi)
        c = counters()
        vector = group * sq <= 4
        assert (c.get("vector_tiles", 0) > 0) == vector and (c.get("direct_tiles", 0) > 0) == (not vector)


# --------------------------------------------------------------------------------------------------- bytes read
# (H, Hkv, D): the vector path (<= 4 rows per KV head), the direct path (8 rows), the tile path for 16 rows per KV head
# and for D 256.
BYTES_SHAPES = {"vector": (8, 2, 128), "direct": (16, 2, 128), "tile-16rows": (32, 2, 128), "tile-d256": (8, 2, 256)}
PATH_COUNTERS = {"vector": "vector_tiles", "direct": "direct_tiles", "tile": "k_tiles_loaded"}


@pytest.mark.parametrize("path", BYTES_SHAPES)
@pytest.mark.parametrize("k_bits, v_bits, group_size", [(8, 8, 64), (4, 4, 64), (8, 4, 32)])
def test_bytes_read_are_the_visible_packed_keys(fa, counters, k_bits, v_bits, group_size, path):
    """K/V bytes read per step == the packed words + scales + biases of the visible keys, each once per KV head
    (simulator counters per buffer), on both decode paths; against the fp16 cache: 8-bit ~0.53x, 4-bit (group 64)
    ~0.28x."""
    (H, Hkv, D), dtype, context, left = BYTES_SHAPES[path], torch.float16, 1000, 299
    cache = QuantCache([context], Hkv, D, 16, dtype, k_bits, v_bits, group_size, seed=7)
    q = torch.randn(1, 1, H, D).to(dtype)
    counters(reset=True)
    decode_on_quantized(fa, cache, q, window=(left, 0))
    c = counters()
    for name, counter in PATH_COUNTERS.items():   # each path counts its tiles
        assert (c.get(counter, 0) > 0) == path.startswith(name), (counter, c.get(counter))
    visible = left + 1
    for bits, cache_buffer, scale_buffers in ((k_bits, 1, (14, 15)), (v_bits, 2, (16, 17))):
        assert c[f"device_bytes_read[{cache_buffer}]"] == visible * Hkv * D * bits // 8
        for b in scale_buffers:
            assert c[f"device_bytes_read[{b}]"] == visible * Hkv * D // group_size * 2
    plain_bytes = visible * Hkv * D * 2
    k_ratio = (c["device_bytes_read[1]"] + c["device_bytes_read[14]"] + c["device_bytes_read[15]"]) / plain_bytes
    assert k_ratio == pytest.approx({(8, 64): 0.53, (4, 64): 0.28, (8, 32): 0.56}[(k_bits, group_size)], abs=0.005)


def test_quantization_error_report(fa, record_property):
    """The quantization error against the unquantized fp16 result (reported, README "Quantized KV caches"; not a
    parity claim): printed per format at the end of the run (conftest: reported figures); asserted only to shrink
    with more bits."""
    H, Hkv, D, dtype, seqlens = 8, 2, 128, torch.float16, [512, 200]
    plain = PagedCache(seqlens, Hkv, D, 16, dtype, seed=11)
    q = torch.randn(len(seqlens), 1, H, D, generator=torch.Generator().manual_seed(3)).to(dtype)
    keys, values = zip(*[plain.gather(b, n) for b, n in enumerate(seqlens)])
    cu_k = torch.tensor([0, *np.cumsum(seqlens)], dtype=torch.int32)
    cu_q = torch.arange(len(seqlens) + 1, dtype=torch.int32)
    exact, _ = attention_reference(q.reshape(-1, H, D), torch.cat(keys), torch.cat(values), cu_q, cu_k, causal=True)
    errors = {}
    for bits, group in [(8, 32), (8, 64), (8, 128), (4, 32), (4, 64), (4, 128)]:
        cache = QuantCache(seqlens, Hkv, D, 16, dtype, bits, bits, group, seed=11)
        out, _, _ = decode_on_quantized(fa, cache, q)
        errors[bits, group] = (out.reshape(-1, H, D).double() - exact).abs().max().item()
    record_property("report", "quantized KV cache, max |out - fp64 attention on the fp16 cache| (fp16, D 128, N(0, 1) "
                    "K/V): " + ", ".join(f"{b}-bit g{g}: {e:.2e}" for (b, g), e in errors.items()))
    assert max(errors[8, g] for g in GROUPS) < min(errors[4, g] for g in GROUPS)


# ------------------------------------------------------------------------------------------------ fp8 e4m3 caches
def fp8_cache(B, slots, Hkv, D, seed, view_uint8):
    g = torch.Generator().manual_seed(seed)
    cache = (torch.randn(B, slots, Hkv, D, generator=g) * 3).to(torch.float8_e4m3fn)
    return (cache.view(torch.uint8) if view_uint8 else cache).to(DEVICE)


def fp8_values(cache, descale, dtype):
    """The dequantized fp8 cache as the kernel reads it: e4m3 * descale[b, kv_head], rounded to the attention dtype."""
    return (cache.cpu().view(torch.float8_e4m3fn).float() * descale.cpu()[:, None, :, None]).to(dtype)


@pytest.mark.parametrize("view_uint8", [False, True], ids=["float8_e4m3fn", "uint8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp8_write_matches_torch_cast(fa, numerics, dtype, view_uint8):
    """Appended rows are x / descale cast to e4m3 exactly as torch casts (round to nearest even, saturating at 448),
    including values past the range and subnormals."""
    B, Hkv, D = 2, 2, 64
    k_cache, v_cache = fp8_cache(B, 8, Hkv, D, 0, view_uint8), fp8_cache(B, 8, Hkv, D, 1, view_uint8)
    g = torch.Generator().manual_seed(2)
    k = (torch.randn(B, 3, Hkv, D, generator=g) * torch.logspace(-4, 3, D)).to(dtype)
    k[0, 0, 0, :4] = torch.tensor([float("inf"), -1e6, 464.0, -0.0])
    descale = torch.rand(B, Hkv, generator=g) + 0.5
    seqlens = torch.tensor([2, 5], dtype=torch.int32)
    table = torch.arange(B, dtype=torch.int32).view(B, 1)
    expected = [bytes_of(c).view(B, 8, Hkv, D).clone() for c in (k_cache, v_cache)]
    for b in range(B):
        for c, x in zip(expected, (k, -k)):
            cast = (x[b].float() / descale[b][None, :, None]).to(torch.float8_e4m3fn).view(torch.uint8)
            c[b, int(seqlens[b]):int(seqlens[b]) + 3] = cast
    fa.kv_cache_write(k.to(DEVICE), (-k).to(DEVICE), k_cache, v_cache, table.to(DEVICE), seqlens.to(DEVICE),
                      k_descale=descale.to(DEVICE), v_descale=descale.to(DEVICE))
    assert torch.equal(bytes_of(k_cache).view(B, 8, Hkv, D), expected[0])
    assert torch.equal(bytes_of(v_cache).view(B, 8, Hkv, D), expected[1])


@pytest.mark.parametrize("view_uint8", [False, True], ids=["float8_e4m3fn", "uint8"])
@pytest.mark.parametrize("dtype, D, heads, feature", [(torch.float16, 128, (8, 2), "window"),
                                                      (torch.bfloat16, 64, (4, 4), "sinks"),
                                                      (torch.float32, 72, (16, 2), "softcap")], ids=str)
def test_fp8_decode(fa, dtype, D, heads, feature, view_uint8):
    """fp8 caches (contiguous, with an append of 2 tokens quantized on the way in) against the float64 reference on
    the dequantized cache, split-K and all."""
    (H, Hkv), B, slots = heads, 3, 300
    k_cache, v_cache = fp8_cache(B, slots, Hkv, D, 3, view_uint8), fp8_cache(B, slots, Hkv, D, 4, view_uint8)
    g = torch.Generator().manual_seed(5)
    k_descale, v_descale = torch.rand(B, Hkv, generator=g) + 0.1, torch.rand(B, Hkv, generator=g) + 0.1
    seqlens = [280, 33, 0]
    q = torch.randn(B, 2, H, D, generator=g).to(dtype)
    new = [torch.randn(B, 2, Hkv, D, generator=g).to(dtype) for _ in range(2)]
    extra = {"window": dict(window_size=(50, 0)), "sinks": dict(s_aux=torch.randn(H, generator=g)),
             "softcap": dict(softcap=5.0)}[feature]
    out, lse = fa.flash_attn_with_kvcache(q.to(DEVICE), k_cache, v_cache, new[0].to(DEVICE), new[1].to(DEVICE),
                                          cache_seqlens=torch.tensor(seqlens, dtype=torch.int32, device=DEVICE),
                                          causal=True, k_descale=k_descale.to(DEVICE), v_descale=v_descale.to(DEVICE),
                                          return_softmax_lse=True,
                                          **{k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in extra.items()})
    k_all, v_all = fp8_values(k_cache, k_descale, dtype), fp8_values(v_cache, v_descale, dtype)
    lengths = [n + 2 for n in seqlens]
    cu_k = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    rkw = dict(causal=True, window=extra.get("window_size", (-1, -1)), softcap=extra.get("softcap", 0.0),
               sinks=extra.get("s_aux"))
    assert_matches_reference(out.cpu().reshape(B * 2, H, D), lse.cpu().permute(1, 0, 2).reshape(H, B * 2),
                             q.reshape(B * 2, H, D), torch.cat([k_all[b, :n] for b, n in enumerate(lengths)]),
                             torch.cat([v_all[b, :n] for b, n in enumerate(lengths)]),
                             torch.arange(B + 1, dtype=torch.int32) * 2, cu_k, **rkw)


def test_mixed_fp8_keys_and_affine_values(fa):
    """K and V formats are independent: fp8 keys with 4-bit values."""
    B, Hkv, D, H, dtype = 2, 2, 64, 4, torch.float16
    k_cache = fp8_cache(B, 40, Hkv, D, 6, False)
    g = torch.Generator().manual_seed(8)
    values = torch.randn(B, 40, Hkv, D, generator=g).to(dtype)
    v_cache, v_scales, v_biases = fa.quantize_kv(values.to(DEVICE), 4, 32)
    k_descale = torch.rand(B, Hkv, generator=g) + 0.5
    q = torch.randn(B, 1, H, D, generator=g).to(dtype)
    out = fa.flash_attn_with_kvcache(q.to(DEVICE), k_cache, v_cache, cache_seqlens=torch.tensor(
        [40, 17], dtype=torch.int32, device=DEVICE), k_descale=k_descale.to(DEVICE), v_scales=v_scales,
        v_biases=v_biases, kv_bits=(0, 4), kv_group_size=32, causal=True)
    k_all = fp8_values(k_cache, k_descale, dtype)
    v_all = fa.dequantize_kv(v_cache, v_scales, v_biases, 4, 32).cpu()
    ref, _ = attention_reference(q.reshape(B, H, D), torch.cat([k_all[0], k_all[1, :17]]),
                                 torch.cat([v_all[0], v_all[1, :17]]), torch.arange(B + 1, dtype=torch.int32),
                                 torch.tensor([0, 40, 57], dtype=torch.int32), causal=True)
    assert (out.cpu().reshape(B, H, D).double() - ref).abs().max() < 2e-3


# ------------------------------------------------------------------------------------------ ops under torch.compile
def test_opcheck_quantized_ops(fa):
    ops = fa._ops.ops
    torch.library.opcheck(ops.quantize_kv.default, (torch.randn(3, 5, 64, device=DEVICE).half(), 4, 32))
    cache, args = write_args()
    q = torch.randn(2, 1, 4, 64, device=DEVICE).half()
    quant = (cache.k[1], cache.k[2], cache.v[1], cache.v[2], 8, 4, 32)
    torch.library.opcheck(ops.flash_attn_decode.default,
                          (q, cache.k[0], cache.v[0], args["k"], args["v"], cache.table, None, args["cache_seqlens"],
                           None, 0, None, True, -1, -1, 0.0, None, None, *quant))
    torch.library.opcheck(ops.kv_cache_write.default,
                          (args["k"], args["v"], cache.k[0], cache.v[0], cache.table, args["cache_seqlens"], *quant))
    k_cache = fp8_cache(2, 20, 2, 64, 0, True)   # the uint8 view: opcheck's schema test does arithmetic on inputs
    torch.library.opcheck(ops.flash_attn_decode.default,
                          (q, k_cache, k_cache.clone(), None, None, None, None, None, None, 0, None, True, -1, -1, 0.0,
                           None, None, None, None, None, None, 0, 0, 0, torch.ones(2, 2, device=DEVICE),
                           torch.ones(2, 2, device=DEVICE)))


@pytest.mark.skipif(DEVICE != "cpu", reason="the README block uses CPU tensors (the simulator build)")
def test_readme_mlx_same_bytes(fa):
    """The README's "Quantized KV caches" example: MLX's quantized bytes are ours, and the decode op takes them."""
    block = REPO_README.split("<!-- mlx-same-bytes -->\n```python\n")[1].split("```")[0]
    g = torch.Generator().manual_seed(4)
    values = torch.randn(4, 16, 2, 128, generator=g).half()
    v_packed, v_scales, v_biases = fa.quantize_kv(values, 4, 64)
    table = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
    namespace = dict(fa=fa, q=torch.randn(2, 1, 4, 128, generator=g).half(), v_packed=v_packed, v_scales=v_scales,
                     v_biases=v_biases, table=table, lens=torch.tensor([20, 32], dtype=torch.int32))
    exec(block, namespace)
    assert namespace["out"].shape == (2, 1, 4, 128) and not torch.isnan(namespace["out"]).any()
