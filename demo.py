"""Main job: load metal-flash-sdpa through `kernels` exactly as a Mac user would, run sliding-window +
sinks attention (gpt-oss style), and print parity against an independent float64 PyTorch reference.

On Linux the kernel is the CPU build: the same Metal shaders executed by the mslsim simulator. Nothing
here is an Apple GPU measurement; timings are of the simulator.
"""
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("LOCAL_KERNELS", f"kernels-community/metal-flash-sdpa={REPO}")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from scripts.build_variant import build  # noqa: E402
from tests.reference import attention_reference, visible_keys  # noqa: E402


def max_error(out, ref):
    return (out.double() - ref).abs().max().item()


def paged_parity(out, q, k_cache, v_cache, table, lengths, **kw):
    """(err, plain fp16 PyTorch's err, parity) of a decode step's out [B, 1, H, D] against the float64 reference
    over each sequence's first lengths[b] keys of the paged cache."""
    B, _, H, D = q.shape
    block_size = k_cache.shape[1]
    keys, values = [], []
    for b, n in enumerate(lengths):
        pos = torch.arange(n)
        blocks = table[b, pos // block_size].long()
        keys.append(k_cache[blocks, pos % block_size])
        values.append(v_cache[blocks, pos % block_size])
    cu_q = torch.arange(B + 1, dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    args = (q.view(B, H, D), torch.cat(keys), torch.cat(values), cu_q, cu_k)
    ref, _ = attention_reference(*args, **kw)
    plain, _ = attention_reference(*args, dtype=torch.float16, **kw)
    err, baseline = max_error(out.view(B, H, D), ref), max_error(plain, ref)
    return err, baseline, err <= 2 * baseline + 1e-5


def decode_step(fa, device):
    """One continuous-batching decode step: append a token per request to a paged cache, then attend."""
    B, H, Hkv, D, block_size, window = 4, 16, 2, 64, 32, 128
    cached = [700, 1, 333, 129]
    g = torch.Generator().manual_seed(1)
    blocks_per_seq = max(-(-(n + 1) // block_size) for n in cached)
    k_cache, v_cache = (torch.randn(B * blocks_per_seq + 2, block_size, Hkv, D, generator=g).half() for _ in range(2))
    table = torch.randperm(B * blocks_per_seq + 2, generator=g)[:B * blocks_per_seq].int().view(B, blocks_per_seq)
    q = torch.randn(B, 1, H, D, generator=g).half()
    new_k, new_v = (torch.randn(B, 1, Hkv, D, generator=g).half() for _ in range(2))
    sinks = torch.randn(H, generator=g)
    kc, vc = k_cache.to(device), v_cache.to(device)
    # The serving-loop split: write the new K/V through the block table, then attend over the cache.
    fa.kv_cache_write(new_k.to(device), new_v.to(device), kc, vc, table.to(device),
                      torch.tensor(cached, dtype=torch.int32, device=device))
    if device == "cpu":
        fa.simulator_counters(reset=True)
    out = fa.flash_attn_with_kvcache(q.to(device), kc, vc, block_table=table.to(device),
                                     cache_seqlens=torch.tensor(cached, dtype=torch.int32, device=device) + 1,
                                     causal=True, window_size=(window - 1, window - 1), s_aux=sinks.to(device)).cpu()
    lengths = [n + 1 for n in cached]
    err, baseline, ok = paged_parity(out, q, kc.cpu(), vc.cpu(), table, lengths, causal=True,
                                     window=(window - 1, 0), sinks=sinks)
    print(f"\npaged decode step (flash_attn_with_kvcache): {B} requests with {cached} cached tokens, block size "
          f"{block_size}, new token written by kv_cache_write, window {window} + sinks")
    print(f"  max |out - float64 reference| = {err:.2e}   (plain fp16 PyTorch attention: {baseline:.2e})   "
          f"parity: {'PASS' if ok else 'FAIL'}")
    if device == "cpu":
        c = fa.simulator_counters()
        print(f"  work: partitions computed {c['partitions_computed']}, skipped before any math "
              f"{c['partitions_skipped']}; K cache bytes read {c['device_bytes_read[1]']} = the window's keys once "
              f"per KV head ({sum(min(n, window) for n in lengths) * Hkv * D * 2})")
    return ok


def quantized_decode_step(fa, device):
    """The same kind of step on a quantized paged cache: 8-bit keys, 4-bit values (MLX's affine layout, group 64),
    the new token quantized as it is appended, the tiles dequantized inside the decode kernel."""
    B, H, Hkv, D, block_size, group = 4, 16, 2, 128, 32, 64
    cached = [700, 1, 333, 129]
    g = torch.Generator().manual_seed(2)
    blocks_per_seq = max(-(-(n + 1) // block_size) for n in cached)
    table = torch.randperm(B * blocks_per_seq, generator=g).int().view(B, blocks_per_seq)
    k_plain, v_plain = (torch.randn(B * blocks_per_seq, block_size, Hkv, D, generator=g).half() for _ in range(2))
    k_cache, k_scales, k_biases = fa.quantize_kv(k_plain.to(device), 8, group)
    v_cache, v_scales, v_biases = fa.quantize_kv(v_plain.to(device), 4, group)
    q = torch.randn(B, 1, H, D, generator=g).half()
    new_k, new_v = (torch.randn(B, 1, Hkv, D, generator=g).half() for _ in range(2))
    if device == "cpu":
        fa.simulator_counters(reset=True)
    out = fa.flash_attn_with_kvcache(q.to(device), k_cache, v_cache, k=new_k.to(device), v=new_v.to(device),
                                     block_table=table.to(device), causal=True,
                                     cache_seqlens=torch.tensor(cached, dtype=torch.int32, device=device),
                                     k_scales=k_scales, k_biases=k_biases, v_scales=v_scales, v_biases=v_biases,
                                     kv_bits=(8, 4), kv_group_size=group).cpu()
    counters = fa.simulator_counters() if device == "cpu" else None
    # The reference attends to the dequantized cache (the appended token included, as it was quantized).
    kc = fa.dequantize_kv(k_cache, k_scales, k_biases, 8, group).cpu()
    vc = fa.dequantize_kv(v_cache, v_scales, v_biases, 4, group).cpu()
    lengths = [n + 1 for n in cached]
    err, baseline, ok = paged_parity(out, q, kc, vc, table, lengths, causal=True)
    print(f"\nquantized paged decode step: K 8-bit, V 4-bit (group {group}, MLX's affine layout), D={D}, new token "
          f"quantized on append, dequantized in the kernel")
    print(f"  max |out - float64 reference on the dequantized cache| = {err:.2e}   (plain fp16 PyTorch: "
          f"{baseline:.2e})   parity: {'PASS' if ok else 'FAIL'}")
    if counters is not None:
        kv_bytes = sum(counters.get(f"device_bytes_read[{i}]", 0) for i in (1, 2, 14, 15, 16, 17))
        fp16_bytes = sum(lengths) * Hkv * D * 2 * 2
        print(f"  K/V bytes read (words + scales + biases, and the append's new rows): {kv_bytes} = "
              f"{kv_bytes / fp16_bytes:.3f}x an fp16 cache's")
    return ok


def main():
    device = "mps" if torch.backends.mps.is_available() else "cpu"
    if device == "cpu":
        build(quiet=False)
    import kernels
    fa = kernels.get_kernel("kernels-community/metal-flash-sdpa", version=2)
    backend = "Metal (MPS)" if device == "mps" else "CPU build: Metal shaders run by the mslsim simulator"
    print(f"loaded {fa.__name__} via kernels.get_kernel(version=2) from {Path(fa.__file__).parent}\n  -> {backend}\n")

    # gpt-oss attention: GQA 8:1 (64 query heads over 8 KV heads; 16 over 2 here to keep the simulation
    # quick), head dim 64, sliding window 128 + one sink logit per head.
    H, Hkv, D, window = 16, 2, 64, 128
    seqlens = [700, 1, 333, 129]
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(int(cu[-1]), h, D, generator=g).half() for h in (H, Hkv, Hkv))
    sinks = torch.randn(H, generator=g)
    print(f"varlen batch {seqlens}, H={H}, Hkv={Hkv}, D={D}, fp16, causal window ({window - 1}, 0) + sinks")

    if device == "cpu":
        fa.simulator_counters(reset=True)
    start = time.perf_counter()
    out, lse, _ = fa.flash_attn_varlen_func(
        q.to(device), k.to(device), v.to(device), cu.to(device), cu.to(device), max(seqlens), max(seqlens),
        causal=True, window_size=(window - 1, window - 1), s_aux=sinks.to(device), return_attn_probs=True)
    elapsed = time.perf_counter() - start
    out = out.cpu()

    kw = dict(causal=True, window=(window - 1, 0), sinks=sinks)
    ref, ref_lse = attention_reference(q, k, v, cu, cu, **kw)
    plain, _ = attention_reference(q, k, v, cu, cu, dtype=torch.float16, **kw)
    err, baseline = max_error(out, ref), max_error(plain, ref)
    cos = torch.nn.functional.cosine_similarity(out.double().flatten(), ref.flatten(), dim=0).item()
    lse_err = (lse.cpu().double() - ref_lse).abs().max().item()
    ok = err <= 2 * baseline + 1e-5 and not torch.isnan(out).any()
    print(f"  max |out - float64 reference| = {err:.2e}   (plain fp16 PyTorch attention: {baseline:.2e})")
    print(f"  cosine similarity = {cos:.6f}, max |LSE error| = {lse_err:.2e}, NaNs: {int(torch.isnan(out).sum())}")
    print(f"  parity (flash-attn rule, error <= 2x plain PyTorch): {'PASS' if ok else 'FAIL'}   "
          f"[{elapsed * 1e3:.0f} ms {'simulated' if device == 'cpu' else 'on MPS'}]")

    if device == "cpu":
        c = fa.simulator_counters()
        in_band = 0
        full = 0
        for n in seqlens:
            blocks_q, blocks_k = -(-n // 32), -(-n // 32)
            mask, _ = visible_keys(n, n, True, (window - 1, 0))
            padded = torch.zeros(blocks_q * 32, blocks_k * 32, dtype=torch.bool)
            padded[:n, :n] = mask
            in_band += int(padded.reshape(blocks_q, 32, blocks_k, 32).any(3).any(1).sum()) * H
            full += blocks_q * (blocks_q + 1) // 2 * H
        print(f"\nwork (simulator counters): K tiles loaded {c['k_tiles_loaded']}, tiles holding a visible key "
              f"{in_band} (ratio {c['k_tiles_loaded'] / in_band:.2f}); a full causal pass would load {full}")
    ok = decode_step(fa, device) and ok
    ok = quantized_decode_step(fa, device) and ok
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
