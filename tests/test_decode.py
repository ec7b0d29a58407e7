"""flash_attn_with_kvcache (Flash-Decoding over paged / contiguous caches) and the paged KV write, through
the kernel loaded with `kernels`, against the float64 reference over K/V gathered from the cache."""
import math

import pytest
import torch

from tests.helpers import DEVICE, KERNEL, SIMULATED, PagedCache, queries
from tests.reference import assert_matches_reference, attention_reference, visible_keys

DECODE_SPLIT = KERNEL._ops.ops.decode_split   # (sizes..., num_splits, gpu_cores) -> [partitions, keys each, scratch]


def reference_decode(q, keys, values, causal, window, softcap=0.0, sinks=None, scale=None):
    """q [B, Sq, H, D]; keys/values: per-sequence [n_b, Hkv, D] -> (out [B*Sq, H, D], lse [H, B*Sq]) float64."""
    B, Sq = q.shape[:2]
    cu_q = torch.arange(B + 1, dtype=torch.int32) * Sq
    cu_k = torch.tensor([0, *torch.tensor([k.shape[0] for k in keys]).cumsum(0).tolist()], dtype=torch.int32)
    kw = dict(causal=causal, window=window, softcap=softcap, sinks=sinks, scale=scale)
    return q.reshape(B * Sq, *q.shape[2:]), torch.cat(keys), torch.cat(values), cu_q, cu_k, kw


def check_decode(fa, q, cache, seqlens_k, causal=True, window=(-1, -1), softcap=0.0, sinks=None, num_splits=0,
                 new_kv=None):
    """Run flash_attn_with_kvcache on `cache` (PagedCache) and compare with the reference; returns out."""
    kc, vc, table = cache.on_device()
    kw = dict(causal=causal, window_size=window, softcap=softcap, num_splits=num_splits, return_softmax_lse=True,
              block_table=table, s_aux=None if sinks is None else sinks.to(DEVICE))
    if new_kv is not None:
        kw.update(k=new_kv[0].to(DEVICE), v=new_kv[1].to(DEVICE))
    out, lse = fa.flash_attn_with_kvcache(q.to(DEVICE), kc, vc, cache_seqlens=cache.seqlens.to(DEVICE), **kw)
    keys, values = zip(*[cache.gather(b, int(n), (kc.cpu(), vc.cpu())) for b, n in enumerate(seqlens_k)])
    B, Sq, H, D = q.shape
    vq, vk, vv, cu_q, cu_k, rkw = reference_decode(q, keys, values, causal, window, softcap, sinks)
    assert out.shape == (B, Sq, H, D) and lse.shape == (B, H, Sq)
    assert_matches_reference(out.cpu().reshape(B * Sq, H, D), lse.cpu().permute(1, 0, 2).reshape(H, B * Sq),
                             vq, vk, vv, cu_q, cu_k, **rkw)
    return out.cpu()


# Ragged contexts around K-tile and partition edges (multiples of 256 keys +- 1) and tiny ones.
RAGGED = [1, 255, 256, 257, 511, 513, 100, 37]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("H, Hkv", [(8, 1), (16, 4), (32, 4)], ids=lambda h: str(h))
@pytest.mark.parametrize("block_size", [16, 32])
def test_ragged_batch_matrix(fa, dtype, H, Hkv, block_size):
    D = 64 if block_size == 16 else 128
    window = (-1, -1) if H == 16 else (199, 0)
    cache = PagedCache(RAGGED, Hkv, D, block_size, dtype, seed=H + block_size)
    check_decode(fa, queries(len(RAGGED), 1, H, D, dtype), cache, RAGGED, window=window)


# (context, sliding window W as in aiter: keep the last W keys, i.e. window_size=(W - 1, 0); W = 0: disabled)
CONTEXT_WINDOWS = [(100, 200), (256, 256), (257, 256), (511, 256), (513, 128), (1024, 1), (4097, 2048),
                   (9216, 8192), (300, 0)]


def intersecting_partitions(n, Sq, window_left, partition):
    """Ideal: partitions holding a key visible to some new query, from the explicit mask."""
    visible, _ = visible_keys(Sq, n, True, (window_left, -1))
    keys = visible.any(0).nonzero().flatten()
    return len(set((keys // partition).tolist())), math.ceil(max(n, 1) / partition), int(visible.any(0).sum())


@pytest.mark.parametrize("context, W", CONTEXT_WINDOWS, ids=lambda c: str(c))
def test_contexts_windows_and_partition_skipping(fa, counters, context, W):
    """Parity, and the work counters: partitions computed == partitions intersecting the window (the rest
    skipped before any math), K/V bytes read == the window's keys once per KV head (ratio 1.00)."""
    H, Hkv, D, dtype = 8, 1, 64, torch.float16
    left = W - 1 if W > 0 else -1
    cache = PagedCache([context], Hkv, D, 16, dtype, seed=context)
    counters()
    check_decode(fa, queries(1, 1, H, D, dtype, seed=W), cache, [context], window=(left, -1 if W <= 0 else 0))
    c = counters()
    _, partition, _ = DECODE_SPLIT(1, H, Hkv, 1, D, 2, context, left, 0, 0)
    computed, total, visible = intersecting_partitions(context, 1, left, partition)
    assert c["partitions_computed"] == computed and c["partitions_skipped"] == total - computed
    minimal = visible * Hkv * D * 2   # bytes of the visible keys, each read once
    assert c["device_bytes_read[1]"] == minimal and c["device_bytes_read[2]"] == minimal   # K, V caches


@pytest.mark.parametrize("num_splits, bound", [(1, 1.05), (9, 1.06), (0, 1.15)],
                         ids=["no_split", "split_k_256_keys", "split_k_heuristic"])
def test_bytes_read_per_step_with_gqa_packing(fa, counters, num_splits, bound):
    """All query heads of a KV head share each K/V read: K/V cache bytes read == the window's keys once per
    KV head, exactly. Counting every buffer the step reads (q, block table, lengths, split-K partials; params
    excluded: constant memory), the total is <= 1.05x minimal without a split; split-K adds its inherent
    traffic (q once per partition, fp32 partials of the partitions that did work): 5.7% with 256-key partitions
    (9 here); the heuristic splits B=4 x Hkv=4 into 15 partitions of 96 keys to fill 40 cores, which costs 13.8%."""
    B, H, Hkv, D, dtype = 4, 32, 4, 128, torch.bfloat16
    seqlens = [2000, 1500, 999, 2049]
    cache = PagedCache(seqlens, Hkv, D, 32, dtype, seed=5)
    counters()
    kc, vc, table = cache.on_device()
    fa.flash_attn_with_kvcache(queries(B, 1, H, D, dtype).to(DEVICE), kc, vc, cache_seqlens=cache.seqlens.to(DEVICE),
                               block_table=table, causal=True, window_size=(1023, 0), num_splits=num_splits)
    c = counters()
    minimal_kv = sum(min(n, 1024) for n in seqlens) * Hkv * D * 2 * 2
    minimal = minimal_kv + B * H * D * 2 + B * 4   # + q + cache_seqlens
    read = sum(v for k, v in c.items() if k.startswith("device_bytes_read[") and k != "device_bytes_read[6]")
    assert c["device_bytes_read[1]"] + c["device_bytes_read[2]"] == minimal_kv
    assert c["launches"] == (1 if num_splits == 1 else 2)
    assert read / minimal <= bound, f"read {read} bytes for {minimal} minimal ({read / minimal:.3f})"


@pytest.mark.parametrize("cores", [10, 40, 80])
def test_split_heuristic_fills_the_gpu(cores):
    """num_splits=0 sizes the split-K grid to the GPU (decode.cpp: fewest waves x (partition keys + fixed work)):
    one sequence at B=1 spreads over every core in one wave instead of a fixed 256-key split (which left 256
    threadgroups for 240 slots at 8k keys: a second, near-empty wave); a batch that fills the GPU by itself is
    split little; more cores never get fewer partitions."""
    resident, tile, overhead = 6, 32, 64   # fp16 D=128: ~9 KiB of threadgroup memory of ~60 KiB per core (params.h)
    slots = cores * resident
    for Hkv, keys in [(8, 8192), (8, 32768), (2, 131072)]:
        partitions, size, _ = DECODE_SPLIT(1, 4 * Hkv, Hkv, 1, 128, 2, keys, -1, 0, cores)
        assert partitions * size >= keys and (partitions - 1) * size < keys and size % tile == 0

        def cost(size):   # the documented cost, brute force over every partition size of whole tiles
            return math.ceil(Hkv * math.ceil(keys / size) / slots) * (size + overhead)
        sizes = [s for s in range(tile, keys + tile, tile) if math.ceil(keys / s) <= KERNEL.DECODE_MAX_PARTITIONS]
        assert cost(size) == min(map(cost, sizes))
        most = min(keys // tile, KERNEL.DECODE_MAX_PARTITIONS) * Hkv
        assert partitions * Hkv >= min(slots, most) // 2   # at least half the GPU busy
    fewer = [DECODE_SPLIT(B, 32, 32, 1, 128, 2, 2048, -1, 0, cores)[0] for B in (8, 64)]
    assert fewer[1] <= fewer[0] and fewer[1] <= 2
    more_cores = [DECODE_SPLIT(4, 32, 8, 1, 128, 2, 16384, -1, 0, c)[0] for c in (cores, 2 * cores)]
    assert more_cores[1] >= more_cores[0]


def test_seed_validation_case(fa):
    """The seed PR's validation: B=4, H=16, D=128, S=50, fp32 paged decode vs SDPA over gathered KV <= 2e-6."""
    B, H, D, S = 4, 16, 128, 50
    cache = PagedCache([S] * B, H, D, 16, torch.float32, seed=7)
    q = queries(B, 1, H, D, torch.float32)
    out = check_decode(fa, q, cache, [S] * B, causal=False)
    keys, values = zip(*[cache.gather(b, S) for b in range(B)])
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double().transpose(1, 2), torch.stack(keys).double().transpose(1, 2), torch.stack(values).double().transpose(1, 2))
    assert (out.double() - ref.transpose(1, 2)).abs().max().item() <= 2e-6


@pytest.mark.parametrize("D", [32, 72, 80, 96, 192, 256])
def test_other_head_dims(fa, D):
    cache = PagedCache([70, 300], 2, D, 16, torch.float16, seed=D)
    check_decode(fa, queries(2, 1, 4, D, torch.float16, seed=D), cache, [70, 300], window=(127, 0))


@pytest.mark.parametrize("feature", ["sinks", "softcap", "sinks+softcap+window"])
def test_sinks_and_softcap(fa, feature):
    cache = PagedCache([40, 600, 257], 2, 64, 32, torch.float16, seed=9)
    sinks = torch.randn(8, generator=torch.Generator().manual_seed(3)) if "sinks" in feature else None
    softcap = 10.0 if "softcap" in feature else 0.0
    window = (200, 0) if "window" in feature else (-1, -1)
    q = queries(3, 1, 8, 64, torch.float16) * 3
    check_decode(fa, q, cache, [40, 600, 257], window=window, softcap=softcap, sinks=sinks)


@pytest.mark.parametrize("Sq_new", [1, 4])
@pytest.mark.parametrize("num_splits", [0, 1, 3])
def test_append_new_tokens_then_attend(fa, Sq_new, num_splits):
    """New k/v are written at cache_seqlens, then the Sq_new queries attend bottom-right aligned."""
    B, H, Hkv, D, dtype = 3, 8, 2, 64, torch.bfloat16
    cached = [0, 300, 31]
    cache = PagedCache([n + Sq_new for n in cached], Hkv, D, 16, dtype, seed=11)
    cache.seqlens = torch.tensor(cached, dtype=torch.int32)
    g = torch.Generator().manual_seed(12)
    new_k, new_v = (torch.randn(B, Sq_new, Hkv, D, generator=g).to(dtype) for _ in range(2))
    check_decode(fa, queries(B, Sq_new, H, D, dtype), cache, [n + Sq_new for n in cached], window=(63, 0),
                 num_splits=num_splits, new_kv=(new_k, new_v))


def test_contiguous_and_paged_caches_agree(fa):
    """The same keys as a contiguous cache [B, S, Hkv, D] and as a shuffled paged cache: identical results."""
    B, H, Hkv, D, S, dtype = 3, 8, 2, 64, 600, torch.float16
    seqlens = [600, 1, 333]
    paged = PagedCache(seqlens, Hkv, D, 32, dtype, seed=13)
    contiguous_k = torch.zeros(B, S, Hkv, D, dtype=dtype)
    contiguous_v = torch.zeros(B, S, Hkv, D, dtype=dtype)
    for b, n in enumerate(seqlens):
        contiguous_k[b, :n], contiguous_v[b, :n] = paged.gather(b, n)
    q = queries(B, 1, H, D, dtype).to(DEVICE)
    kw = dict(cache_seqlens=paged.seqlens.to(DEVICE), causal=True, window_size=(255, 0), s_aux=torch.ones(H, device=DEVICE))
    k, v, table = paged.on_device()
    out_paged = fa.flash_attn_with_kvcache(q, k, v, block_table=table, **kw)
    out_contiguous = fa.flash_attn_with_kvcache(q, contiguous_k.to(DEVICE), contiguous_v.to(DEVICE), **kw)
    assert torch.equal(out_paged, out_contiguous)


def test_contiguous_cache_with_batch_idx_and_leftpad(fa):
    B, H, Hkv, D, S, dtype = 2, 4, 4, 64, 96, torch.float32
    g = torch.Generator().manual_seed(14)
    k_cache, v_cache = (torch.randn(3, S, Hkv, D, generator=g) for _ in range(2))
    batch_idx = torch.tensor([2, 0], dtype=torch.int32)
    leftpad = torch.tensor([10, 0], dtype=torch.int32)
    lens = torch.tensor([90, 50], dtype=torch.int32)
    q = queries(B, 1, H, D, dtype)
    out, lse = fa.flash_attn_with_kvcache(q.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE),
                                          cache_seqlens=lens.to(DEVICE), cache_batch_idx=batch_idx.to(DEVICE),
                                          cache_leftpad=leftpad.to(DEVICE), causal=True, return_softmax_lse=True)
    keys = [k_cache[int(r), int(p):int(n)] for r, p, n in zip(batch_idx, leftpad, lens)]
    values = [v_cache[int(r), int(p):int(n)] for r, p, n in zip(batch_idx, leftpad, lens)]
    vq, vk, vv, cu_q, cu_k, rkw = reference_decode(q, keys, values, True, (-1, -1))
    assert_matches_reference(out.cpu().reshape(B, H, D), lse.cpu().permute(1, 0, 2).reshape(H, B), vq, vk, vv,
                             cu_q, cu_k, **rkw)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("batch", [1, 8, 16])
@pytest.mark.parametrize("H, Hkv", [(8, 1), (16, 4), (32, 4)], ids=lambda h: str(h))
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("context, W", [(257, 256), (4097, 2048), (9216, 8192), (513, 0)], ids=lambda c: str(c))
def test_aiter_matrix(fa, dtype, batch, H, Hkv, D, block_size, context, W):
    """The aiter seed's full matrix (slow: minutes per long-context case in the simulator)."""
    lens = [max(context - 37 * b, 1) for b in range(batch)]   # ragged within the batch
    cache = PagedCache(lens, Hkv, D, block_size, dtype, seed=batch + H)
    check_decode(fa, queries(batch, 1, H, D, dtype), cache, lens, window=(W - 1, 0) if W else (-1, -1))


@pytest.mark.skipif(not SIMULATED, reason="the launch profile exists only in the simulator build")
@pytest.mark.parametrize("dims", [(128, 128), (256, 256), (576, 512)], ids=lambda d: f"{d[0]}x{d[1]}")
def test_threadgroup_bytes_are_the_kernels(fa, monkeypatch, dims):
    """DECODE_THREADGROUP_BYTES (params.h), by which the host counts the threadgroups a core holds for the split-K
    grid, is the threadgroup memory the fp16 decode kernel declares, as the simulator's launch profile reports it."""
    DK, DV = dims
    keys = 40
    q = queries(1, 1, 2, DK, torch.float16).to(DEVICE)
    k_cache = torch.randn(1, keys, 1, DK, dtype=torch.float16, device=DEVICE)
    v_cache = torch.randn(1, keys, 1, DV, dtype=torch.float16, device=DEVICE)
    monkeypatch.setenv("MSLSIM_PROFILE", "1")
    fa.simulator_counters(reset=True)
    fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([keys], dtype=torch.int32, device=DEVICE),
                               causal=True, num_splits=1)
    counters = fa.simulator_counters(reset=True)
    assert counters["launches"] == 1   # the decode kernel alone: no split, no reduce
    kernel = f"attention_decode_half_{DK}" + (f"_{DV}" if DV != DK else "")
    expected = fa._ops.ops.kernel_constants()["decode_threadgroup_bytes_16bit"][fa.FORWARD_HEAD_DIMS.index(dims)]
    assert counters[f"profile[{kernel}].threadgroup_memory"] == expected
