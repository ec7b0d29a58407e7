"""The paged KV write, and bad or adversarial input to the KV-cache entry points: clear errors first, and
with the host-side data checks switched off, kernels that still never touch memory outside the cache."""
import pytest
import torch

from tests.helpers import DEVICE, SIMULATED, PagedCache, queries

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("new_tokens", [1, 5, 40])
def test_kv_cache_write_ragged_across_block_boundaries(fa, dtype, new_tokens):
    block_size, Hkv, D = 16, 2, 64
    cached = [0, 15, 16, 33]   # starts at, just before and at block boundaries
    cache = PagedCache([n + new_tokens for n in cached], Hkv, D, block_size, dtype, seed=new_tokens)
    before_k, before_v = cache.k.clone(), cache.v.clone()
    g = torch.Generator().manual_seed(1)
    k, v = (torch.randn(len(cached), new_tokens, Hkv, D, generator=g).to(dtype) for _ in range(2))
    kc, vc, table = cache.on_device()
    fa.kv_cache_write(k.to(DEVICE), v.to(DEVICE), kc, vc, table, torch.tensor(cached, dtype=torch.int32, device=DEVICE))
    kc, vc = kc.cpu(), vc.cpu()
    expected_k, expected_v = before_k.clone(), before_v.clone()
    for b, start in enumerate(cached):
        pos = torch.arange(start, start + new_tokens)
        blocks = cache.table[b, pos // block_size].long()
        expected_k[blocks, pos % block_size] = k[b]
        expected_v[blocks, pos % block_size] = v[b]
    assert torch.equal(kc, expected_k) and torch.equal(vc, expected_v)   # written exactly there, nothing else


def test_kv_cache_write_into_aliased_caches(fa):
    """transformers' paged cache: K and V are views of one storage (V = K shifted by some pages)."""
    storage = torch.zeros(8, 16, 2, 32, device=DEVICE)
    k_cache, v_cache = storage[:4], storage[4:]
    table = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32, device=DEVICE)
    k = torch.randn(2, 3, 2, 32, device=DEVICE)
    fa.kv_cache_write(k, -k, k_cache, v_cache, table, torch.tensor([15, 0], dtype=torch.int32, device=DEVICE))
    assert torch.equal(k_cache[2, 15], k[0, 0]) and torch.equal(k_cache[0, :2], k[0, 1:])
    assert torch.equal(v_cache[1, :3], -k[1]) and torch.equal(storage[4 + 1, :3], -k[1])
    assert int((storage != 0).any(-1).any(-1).sum()) == 12   # 6 tokens x (K, V)


def cache_and_inputs():
    cache = PagedCache([20, 40], 2, 64, 16, torch.float16, seed=3, max_blocks=4)
    kc, vc, table = cache.on_device()
    q = queries(2, 1, 4, 64, torch.float16).to(DEVICE)
    return dict(q=q, k_cache=kc, v_cache=vc, block_table=table, cache_seqlens=cache.seqlens.to(DEVICE))


BAD_DECODE = {
    "cache dtype": (lambda a: dict(k_cache=a["k_cache"].float(), v_cache=a["v_cache"].float()), TypeError,
                    ["same dtype"]),
    "cache rank": (lambda a: dict(k_cache=a["k_cache"][0], v_cache=a["v_cache"][0]), ValueError, ["k_cache must be"]),
    "v_cache shape": (lambda a: dict(v_cache=a["v_cache"][:, :8]), ValueError, ["v_cache must have the shape"]),
    "cache head dim strided": (lambda a: dict(k_cache=a["k_cache"][..., ::2], v_cache=a["v_cache"][..., ::2]),
                               ValueError, ["contiguous head dim"]),
    "block_table int64": (lambda a: dict(block_table=a["block_table"].long()), TypeError, ["block_table", "int32"]),
    "block_table 1-D": (lambda a: dict(block_table=a["block_table"][0]), ValueError, ["block_table must be"]),
    "cache_seqlens int64": (lambda a: dict(cache_seqlens=a["cache_seqlens"].long()), TypeError, ["cache_seqlens"]),
    "cache_seqlens beyond capacity": (lambda a: dict(cache_seqlens=torch.tensor([20, 65], dtype=torch.int32,
                                                                                device=DEVICE)),
                                      ValueError, ["cache_seqlens[1] = 65", "64 slots"]),
    "negative cache_seqlens": (lambda a: dict(cache_seqlens=torch.tensor([-1, 3], dtype=torch.int32, device=DEVICE)),
                               ValueError, ["cache_seqlens[0] = -1"]),
    "block out of range": (lambda a: dict(block_table=torch.tensor([[0, 1, -1, -1], [99, 3, 4, -1]], dtype=torch.int32,
                                                                   device=DEVICE)),
                           ValueError, ["block_table[1, 0] = 99"]),
    "H % Hkv": (lambda a: dict(q=a["q"][:, :, :3]), ValueError, ["multiple"]),
    "q rank": (lambda a: dict(q=a["q"][0]), ValueError, ["q must be [batch, seqlen_q, heads, head_dim]"]),
    "new k shape": (lambda a: dict(k=a["q"][:, :, :1], v=a["q"][:, :, :1]), ValueError, ["k must be"]),
    "only k": (lambda a: dict(k=a["q"][:, :, :2]), ValueError, ["both k and v"]),
    "new tokens overflow": (lambda a: dict(k=torch.zeros(2, 30, 2, 64, dtype=torch.float16, device=DEVICE),
                                           v=torch.zeros(2, 30, 2, 64, dtype=torch.float16, device=DEVICE)),
                            ValueError, ["block_table[0, 2] = -1", "not a block of the cache"]),
    "rotary": (lambda a: dict(rotary_cos=torch.zeros(1), rotary_sin=torch.zeros(1)), NotImplementedError, ["rotary"]),
    "leftpad with paged": (lambda a: dict(cache_leftpad=torch.zeros(2, dtype=torch.int32, device=DEVICE)),
                           NotImplementedError, ["cache_leftpad"]),
    "s_aux shape": (lambda a: dict(s_aux=torch.zeros(2, device=DEVICE)), ValueError, ["s_aux"]),
    # with new tokens to append: still rejected before anything is written (the test checks the cache)
    "s_aux shape + append": (lambda a: dict(s_aux=torch.zeros(2, device=DEVICE), k=a["q"][:, :, :2], v=a["q"][:, :, :2]),
                             ValueError, ["s_aux"]),
    "window + append": (lambda a: dict(window_size=(-3, 0), k=a["q"][:, :, :2], v=a["q"][:, :, :2]), ValueError,
                        ["window_size entries must be >= -1"]),
    "softcap + append": (lambda a: dict(softcap=-1.0, k=a["q"][:, :, :2], v=a["q"][:, :, :2]), ValueError,
                         ["softcap must be >= 0"]),
    "num_splits": (lambda a: dict(num_splits=-1), ValueError, ["num_splits"]),
    # New tokens of another dtype than the cache would be copied with the wrong element size.
    "new k/v dtype": (lambda a: dict(k=a["q"][:, :, :2].float(), v=a["q"][:, :, :2].float()), TypeError,
                      ["k (new tokens) has dtype Float but the cache has Half"]),
    "new k/v device": (lambda a: dict(k=a["q"][:, :, :2].to("meta"), v=a["q"][:, :, :2].to("meta")), ValueError,
                       ["is on meta"]),
    "append without cache_seqlens": (lambda a: dict(cache_seqlens=None, k=a["q"][:, :, :2], v=a["q"][:, :, :2]),
                                     ValueError, ["pass cache_seqlens with k and v"]),
}


@pytest.mark.parametrize("case", BAD_DECODE)
def test_decode_bad_input(fa, case):
    make, exception, words = BAD_DECODE[case]
    args = cache_and_inputs()
    before = args["k_cache"].clone()
    args.update(make(args))
    with pytest.raises(exception) as info:
        fa.flash_attn_with_kvcache(**args)
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"
    if args["k_cache"].shape == before.shape and args["k_cache"].dtype == before.dtype:
        assert torch.equal(args["k_cache"], before)   # a rejected call writes nothing


def test_appends_to_one_slot_from_two_sequences_are_rejected(fa):
    """Sequences sharing a block may read it (prefix sharing), but two new tokens for one slot would race."""
    args = cache_and_inputs()
    shared = torch.tensor([[0, 1, -1, -1], [0, 1, 2, -1]], dtype=torch.int32, device=DEVICE)
    before = args["k_cache"].clone()
    k = torch.ones(2, 1, 2, 64, dtype=torch.float16, device=DEVICE)
    lens = torch.tensor([20, 20], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="block_table: sequences 0 and 1 both append to block 1, slot 4"):
        fa.kv_cache_write(k, k, args["k_cache"], args["v_cache"], shared, lens)
    with pytest.raises(ValueError, match="both append"):
        fa.flash_attn_with_kvcache(args["q"], args["k_cache"], args["v_cache"], k=k, v=k, block_table=shared,
                                   cache_seqlens=lens)
    assert torch.equal(args["k_cache"], before)
    out = fa.flash_attn_with_kvcache(args["q"], args["k_cache"], args["v_cache"], block_table=shared,
                                     cache_seqlens=lens)   # reading a shared block is fine
    assert not torch.isnan(out).any()


def test_kv_cache_write_rejects_slots_outside_the_table(fa):
    args = cache_and_inputs()
    k = torch.ones(2, 2, 2, 64, dtype=torch.float16, device=DEVICE)
    before = args["k_cache"].clone()
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\] = 63 \+ 2 new tokens"):
        fa.kv_cache_write(k, k, args["k_cache"], args["v_cache"], args["block_table"],
                          torch.tensor([63, 0], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"block_table\[0, 2\] = -1"):   # padding past the sequence's blocks
        fa.kv_cache_write(k, k, args["k_cache"], args["v_cache"], args["block_table"],
                          torch.tensor([31, 0], dtype=torch.int32, device=DEVICE))
    assert torch.equal(args["k_cache"], before)


@pytest.mark.skipif(not SIMULATED, reason="out-of-bounds detection needs the simulator")
def test_adversarial_indices_never_leave_the_cache(fa, monkeypatch):
    """With the host-side data checks off, garbage block tables, lengths and leftpads reach the kernels:
    the simulator (which fails any out-of-bounds access) must see none, and no output is NaN."""
    monkeypatch.setenv("METAL_FLASH_SDPA_CHECK_DATA", "0")
    g = torch.Generator().manual_seed(4)
    for trial in range(6):
        args = cache_and_inputs()
        # Garbage entries (negative, past the 8 blocks), but no block twice: two sequences appending to one
        # slot would be a write race, which the checks reject and an unchecked call leaves to chance.
        args["block_table"] = (torch.randperm(16, generator=g)[:8] - 4).int().view(2, 4)
        args["cache_seqlens"] = torch.randint(-70, 140, (2,), generator=g, dtype=torch.int32)
        k = torch.randn(2, 3, 2, 64, generator=g).half()
        out = fa.flash_attn_with_kvcache(**args, k=k, v=k, causal=True, window_size=(7, 0), num_splits=trial % 3)
        assert not torch.isnan(out).any()
        contiguous = torch.randn(2, 50, 2, 64, generator=g).half()
        out = fa.flash_attn_with_kvcache(args["q"], contiguous, contiguous, cache_seqlens=args["cache_seqlens"],
                                         cache_leftpad=torch.randint(-90, 90, (2,), generator=g, dtype=torch.int32))
        assert not torch.isnan(out).any()
    # and the prefill's cu_seqlens
    q = torch.randn(10, 2, 64)
    bad = torch.tensor([5, -3, 99], dtype=torch.int32)
    assert not torch.isnan(fa.flash_attn_varlen_func(q, q, q, bad, bad.flip(0), 3, 3)).any()


@pytest.mark.skipif(not SIMULATED, reason="out-of-bounds detection needs the simulator")
def test_unchecked_kv_write_drops_slots_outside_the_cache(fa, monkeypatch):
    """Checks off: a token whose slot lies outside the table (past capacity, negative, int32 overflow of
    cache_seqlens + i) or in a block outside the cache is dropped; the in-range tokens land where they belong."""
    monkeypatch.setenv("METAL_FLASH_SDPA_CHECK_DATA", "0")
    cache = PagedCache([64, 64, 64, 64], 2, 32, 16, torch.float32, seed=5, spare_blocks=0)
    k_cache, v_cache, table = cache.on_device()
    table[3, 1] = 99   # block outside the cache
    starts = [62, -2, 2**31 - 2, 14]   # 2 in range + 2 past the end; 2 in range; int32 overflow; block 1 bad
    k = torch.randn(4, 4, 2, 32, device=DEVICE)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    for b, start in enumerate(starts):
        for i in range(4):
            pos = start + i
            if 0 <= pos < 64 and table[b, pos // 16] < k_cache.shape[0]:
                expected_k[table[b, pos // 16], pos % 16] = k[b, i]
                expected_v[table[b, pos // 16], pos % 16] = -k[b, i]
    fa.kv_cache_write(k, -k, k_cache, v_cache, table, torch.tensor(starts, dtype=torch.int32, device=DEVICE))
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    k_cache, v_cache, table = cache.on_device()
    table[3, 1] = 99
    out = fa.flash_attn_with_kvcache(k[:, :1].repeat(1, 1, 2, 1), k_cache, v_cache, k=k, v=-k, block_table=table,
                                     cache_seqlens=torch.tensor(starts, dtype=torch.int32, device=DEVICE))
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v) and not torch.isnan(out).any()


def test_opcheck_decode_and_kv_write(fa):
    ops = fa._ops.ops
    args = cache_and_inputs()
    torch.library.opcheck(ops.flash_attn_decode.default,
                          (args["q"], args["k_cache"], args["v_cache"], None, None, args["block_table"], None,
                           args["cache_seqlens"], None, 0, 0.125, True, 15, -1, 0.0, None, torch.randn(4, device=DEVICE)))
    new = torch.randn(2, 1, 2, 64, device=DEVICE).half()   # with the in-place append
    torch.library.opcheck(ops.flash_attn_decode.default,
                          (args["q"], args["k_cache"], args["v_cache"], new, new, args["block_table"], None,
                           args["cache_seqlens"], None, 0, None, True, 15, -1, 0.0, None, None))
    k = torch.randn(2, 3, 2, 64, device=DEVICE).half()
    torch.library.opcheck(ops.kv_cache_write.default,
                          (k, k, args["k_cache"], args["v_cache"], args["block_table"], args["cache_seqlens"]))


def test_compiled_decode_step_matches_eager(fa):
    args = cache_and_inputs()
    k = torch.randn(2, 1, 2, 64, device=DEVICE).half()

    def step(q, k_cache, v_cache, block_table, cache_seqlens, k):
        return fa.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=k, cache_seqlens=cache_seqlens,
                                          block_table=block_table, causal=True, window_size=(15, 0))

    eager_cache = (args["k_cache"].clone(), args["v_cache"].clone())
    expected = step(args["q"], *eager_cache, args["block_table"], args["cache_seqlens"], k)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(args["q"], args["k_cache"], args["v_cache"], args["block_table"], args["cache_seqlens"], k)
    assert torch.equal(got, expected)
    assert torch.equal(args["k_cache"], eager_cache[0])   # the in-place append happened under compile too


def test_compiled_kv_cache_write_matches_eager(fa):
    args = cache_and_inputs()
    k = torch.randn(2, 2, 2, 64, device=DEVICE).half()
    eager_k, eager_v = args["k_cache"].clone(), args["v_cache"].clone()
    fa.kv_cache_write(k, -k, eager_k, eager_v, args["block_table"], args["cache_seqlens"])
    torch._dynamo.reset()
    compiled = torch.compile(fa.kv_cache_write, fullgraph=True, backend="aot_eager")
    compiled(k, -k, args["k_cache"], args["v_cache"], args["block_table"], args["cache_seqlens"])
    assert torch.equal(args["k_cache"], eager_k) and torch.equal(args["v_cache"], eager_v)
    assert not torch.equal(eager_k, cache_and_inputs()["k_cache"])   # something was written
