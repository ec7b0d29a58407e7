"""metal-flash-sdpa benchmarks, one command:

    python3 benchmarks/run.py            # everything this machine can do
    python3 benchmarks/run.py --smoke    # a tiny configuration (CI runs the same code paths with it)

Three parts, each printed as a table and saved to benchmarks/results/ (results.json, work.png, memory.png):
  work    (CPU build: the simulator's counters) K tiles loaded vs the tiles in the causal/window band, decode
          partitions computed vs those intersecting the window, K/V bytes read vs the minimum (each byte once
          per KV head); prefill sweeps sequence length and window, decode sweeps context length.
  memory  (anywhere; meta tensors, no data) bytes the attention call allocates as the sequence grows to 131k
          tokens: our wrappers (outputs only, O(n)) vs eager attention with an explicit mask (O(n^2)).
  timing  (MPS; on other devices only with --smoke, labelled simulated) median ms over warm runs, TFLOPS or
          GB/s achieved, driver memory, and the ratio to torch SDPA with an explicit mask (and MLX's
          mx.fast.scaled_dot_product_attention when installed), next to a roofline estimate; our decode on 8- and
          4-bit caches against our fp16 decode of the same shape (issue 16's goals, which --profile only predicts).
No Apple GPU number is produced unless this runs on one.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"

# Nominal peak figures from public spec sheets (fp32 TFLOPS, unified-memory GB/s); edit or override with
# --peak-tflops / --bandwidth for your machine. They feed the roofline column only.
GPUS = {"m1": (2.6, 68), "m1-max": (10.4, 400), "m2": (3.6, 100), "m2-max": (13.6, 400),
        "m3-max": (16.4, 400), "m4": (4.3, 120), "m4-max": (18.4, 546)}


def load_kernel():
    os.environ.setdefault("LOCAL_KERNELS", f"kernels-community/metal-flash-sdpa={REPO}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not torch.backends.mps.is_available():
        from scripts.build_variant import build
        build()
    import kernels
    return kernels.get_kernel("kernels-community/metal-flash-sdpa", version=2)


def progress(items, desc):
    try:
        from tqdm import tqdm
        return tqdm(items, desc=desc, leave=False, file=sys.stderr)
    except ImportError:
        return items


# ---------------------------------------------------------------------------------------------- ideals
def visible_per_row(n_q, n_k, window_left):
    """Keys each query row sees under causal (+ left window), bottom-right aligned: [n_q] ints."""
    pos = torch.arange(n_q) + n_k - n_q
    lo = (pos - window_left).clamp(min=0) if window_left >= 0 else torch.zeros_like(pos)
    return (pos + 1 - lo).clamp(min=0)


def band_tiles(n, window_left, block_q, block_k):
    """K tiles holding a key visible to some row of each query block (causal + left window)."""
    tiles = 0
    for row0 in range(0, n, block_q):
        last = min(row0 + block_q, n) - 1
        lo = max(row0 - window_left, 0) if window_left >= 0 else 0
        tiles += last // block_k - lo // block_k + 1
    return tiles


def attention_flops(n_q, n_k, heads, head_dim, window_left):
    return 4 * head_dim * heads * int(visible_per_row(n_q, n_k, window_left).sum())   # QK^T and PV, 2 per MAC


# ---------------------------------------------------------------------------------------------- work
def work_prefill(fa, lengths, windows, heads=1, head_dim=64):
    rows = []
    for n in progress(lengths, "work: prefill"):
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(n, heads, head_dim, generator=g).half() for _ in range(3))
        cu = torch.tensor([0, n], dtype=torch.int32)
        for w in windows:
            fa.simulator_counters(reset=True)
            fa.flash_attn_varlen_func(q, k, v, cu, cu, n, n, causal=True, window_size=(w - 1 if w else -1, 0),
                                      s_aux=torch.zeros(heads) if w else None)
            c = fa.simulator_counters()
            tiles = fa.PREFILL_BLOCK_Q, fa.KV_TILE_KEYS[head_dim]
            ideal = band_tiles(n, w - 1 if w else -1, *tiles) * heads
            full = band_tiles(n, -1, *tiles) * heads
            rows.append(dict(kind="prefill", tokens=n, window=w or None, k_tiles=c["k_tiles_loaded"], band_tiles=ideal,
                             ratio=c["k_tiles_loaded"] / ideal, full_causal_tiles=full,
                             eager_score_elements=n * n * heads))
    return rows


def work_decode(fa, contexts, windows, batch=1, heads=8, kv_heads=1, head_dim=64, block_size=32):
    rows = []
    for n in progress(contexts, "work: decode"):
        g = torch.Generator().manual_seed(n)
        blocks = math.ceil(n / block_size)
        k_cache, v_cache = (torch.randn(batch * blocks, block_size, kv_heads, head_dim, generator=g).half()
                            for _ in range(2))
        table = torch.arange(batch * blocks, dtype=torch.int32).view(batch, blocks)
        q = torch.randn(batch, 1, heads, head_dim, generator=g).half()
        lens = torch.full((batch,), n, dtype=torch.int32)
        for w in windows:
            fa.simulator_counters(reset=True)
            fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, block_table=table, causal=True,
                                       window_size=(w - 1 if w else -1, 0))
            c = fa.simulator_counters()
            visible = min(n, w) if w else n
            _, partition, _ = fa._ops.ops.decode_split(batch, heads, kv_heads, 1, head_dim, 2, n, w - 1 if w else -1, 0, 0)
            partitions = math.ceil(n / partition)
            intersecting = partitions - (n - visible) // partition
            minimal_kv = batch * kv_heads * visible * head_dim * 2 * 2
            kv_read = c["device_bytes_read[1]"] + c["device_bytes_read[2]"]
            rows.append(dict(kind="decode", context=n, window=w or None,
                             partitions_computed=c.get("partitions_computed", 0),
                             partitions_intersecting=batch * kv_heads * intersecting,
                             partitions_skipped=c.get("partitions_skipped", 0), kv_bytes=kv_read, minimal_kv_bytes=minimal_kv,
                             bytes_ratio=kv_read / minimal_kv))
    return rows


# ---------------------------------------------------------------------------------------------- memory
class AllocationCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the fresh tensors every op of a call produces (views excluded): an upper bound of the
    call's peak allocation, computable on meta tensors at any size."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.bytes += t.untyped_storage().nbytes()
        return out


def allocated_bytes(fn):
    with AllocationCounter() as counter:
        fn()
    return counter.bytes


def memory_sweep(fa, lengths, heads=8, kv_heads=1, head_dim=64, window=128):
    rows = []
    for n in progress(lengths, "memory"):
        q = torch.empty(n, heads, head_dim, dtype=torch.float16, device="meta")
        kv = torch.empty(n, kv_heads, head_dim, dtype=torch.float16, device="meta")
        cu = torch.empty(2, dtype=torch.int32, device="meta")
        ours = allocated_bytes(lambda: fa.flash_attn_varlen_func(q, kv, kv, cu, cu, n, n, causal=True,
                                                                 window_size=(window - 1, 0),
                                                                 s_aux=torch.empty(heads, device="meta")))

        def eager():   # the O(n^2) path models fall back to: explicit band mask, scores materialised
            qh, kh = q.transpose(0, 1), kv.transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
            pos = torch.arange(n, device="meta")
            mask = (pos[:, None] >= pos[None, :]) & (pos[:, None] - pos[None, :] < window)
            scores = (qh @ kh.transpose(1, 2)).masked_fill(~mask, float("-inf")).softmax(-1)
            return scores @ kh
        rows.append(dict(tokens=n, ours_bytes=ours, eager_bytes=allocated_bytes(eager),
                         inputs_bytes=(q.numel() + 2 * kv.numel()) * 2))
    return rows


# ---------------------------------------------------------------------------------------------- timing
def synchronize(device):
    if device == "mps":
        torch.mps.synchronize()


def median_ms(fn, device, warmup, reps):
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def driver_mib(fn, device):
    if device != "mps":
        return None
    torch.mps.empty_cache()
    before = torch.mps.driver_allocated_memory()
    fn()
    synchronize(device)
    return (torch.mps.driver_allocated_memory() - before) / 2**20


def try_run(fn):
    try:
        return fn()
    except (RuntimeError, MemoryError) as error:   # eager dies at long sequences: record it, keep going
        return f"failed: {str(error).splitlines()[0][:60]}"


def mlx_sdpa(n, heads, kv_heads, head_dim, window):
    try:
        import mlx.core as mx
    except ImportError:
        return None
    q = mx.random.normal((1, heads, n, head_dim)).astype(mx.float16)
    k = mx.random.normal((1, kv_heads, n, head_dim)).astype(mx.float16)
    pos = mx.arange(n)
    mask = (pos[:, None] >= pos[None, :]) & (pos[:, None] - pos[None, :] < window) if window else "causal"

    def run():
        mx.eval(mx.fast.scaled_dot_product_attention(q, k, k, scale=head_dim ** -0.5, mask=mask))
    return run


def timing_prefill(fa, device, lengths, configs, warmup, reps, peak):
    rows = []
    for n in progress(lengths, "timing: prefill"):
        for name, heads, kv_heads, window in configs:
            head_dim = 64
            g = torch.Generator().manual_seed(n)
            q = torch.randn(1, n, heads, head_dim, generator=g).half().to(device)
            k, v = (torch.randn(1, n, kv_heads, head_dim, generator=g).half().to(device) for _ in range(2))
            sinks = torch.zeros(heads, device=device) if window else None
            ours = lambda: fa.flash_attn_func(q, k, v, causal=True, window_size=(window - 1 if window else -1, 0),  # noqa: E731
                                              s_aux=sinks)

            def sdpa():
                pos = torch.arange(n, device=device)
                mask = pos[:, None] >= pos[None, :]
                if window:
                    mask &= pos[:, None] - pos[None, :] < window
                return torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=True)
            flops = attention_flops(n, n, heads, head_dim, window - 1 if window else -1)
            ms = try_run(lambda: median_ms(ours, device, warmup, reps))
            ref_ms = try_run(lambda: median_ms(sdpa, device, warmup, reps))
            mlx = mlx_sdpa(n, heads, kv_heads, head_dim, window) if device == "mps" else None
            mlx_ms = try_run(lambda: median_ms(mlx, "cpu", warmup, reps)) if mlx else None
            row = dict(kind="prefill", config=name, tokens=n, ms=ms, sdpa_ms=ref_ms, mlx_ms=mlx_ms,
                       tflops=flops / ms / 1e9 if isinstance(ms, float) else None,
                       mib=try_run(lambda: driver_mib(ours, device)), sdpa_mib=try_run(lambda: driver_mib(sdpa, device)),
                       roofline_ms=flops / (peak[0] * 1e12) * 1e3)
            row["speedup_vs_sdpa"] = ref_ms / ms if isinstance(ms, float) and isinstance(ref_ms, float) else None
            rows.append(row)
    return rows


def paged_decode_inputs(batch, n, heads, kv_heads, head_dim, block_size, device, generator=None):
    """A decode step's fp16 inputs: K and V caches of ceil(n / block_size) blocks per sequence, the block table
    (blocks in order; shuffled when a generator is given), q [batch, 1, heads, head_dim] and the lengths (n each)."""
    blocks = math.ceil(n / block_size)
    k_cache, v_cache = (torch.randn(batch * blocks, block_size, kv_heads, head_dim, generator=generator).half()
                        .to(device) for _ in range(2))
    order = (torch.randperm(batch * blocks, generator=generator) if generator is not None
             else torch.arange(batch * blocks))
    table = order.int().view(batch, blocks).to(device)
    q = torch.randn(batch, 1, heads, head_dim, generator=generator).half().to(device)
    return k_cache, v_cache, table, q, torch.full((batch,), n, dtype=torch.int32, device=device)


def timing_decode(fa, device, batches, contexts, windows, warmup, reps, peak, heads=32, kv_heads=8, head_dim=128):
    rows = []
    for batch in progress(batches, "timing: decode"):
        for n in contexts:
            block_size = 32
            blocks = math.ceil(n / block_size)
            k_cache, v_cache, table, q, lens = paged_decode_inputs(batch, n, heads, kv_heads, head_dim, block_size,
                                                                   device)
            contiguous = k_cache.view(batch, blocks * block_size, kv_heads, head_dim)[:, :n].transpose(1, 2)
            for w in windows:
                ours = lambda: fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens,  # noqa: E731
                                                          block_table=table, causal=True,
                                                          window_size=(w - 1 if w else -1, 0))
                keys = contiguous[:, :, -w:] if w else contiguous
                sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
                    q.transpose(1, 2), keys, keys, enable_gqa=True)
                kv_bytes = batch * kv_heads * (min(n, w) if w else n) * head_dim * 2 * 2
                ms = try_run(lambda: median_ms(ours, device, warmup, reps))
                ref_ms = try_run(lambda: median_ms(sdpa, device, warmup, reps))
                rows.append(dict(kind="decode", batch=batch, context=n, window=w or None, ms=ms, sdpa_ms=ref_ms,
                                 gbps=kv_bytes / ms / 1e6 if isinstance(ms, float) else None,
                                 roofline_ms=kv_bytes / (peak[1] * 1e9) * 1e3,
                                 speedup_vs_sdpa=ref_ms / ms if isinstance(ms, float) and isinstance(ref_ms, float)
                                 else None))
    return rows


# The profile's quantized cases (benchmarks/instrument.py): 32k keys, 4 and 8 query heads per KV head (vector and MMA paths).
QUANTIZED_DECODE_SHAPES = [(8, 32768, 32, 8, 128), (8, 32768, 32, 4, 128)]   # (batch, keys, heads, kv_heads, head dim)
QUANTIZED_DECODE_GOALS = {8: 0.6, 4: 0.35}   # issue 16: quantized step time / fp16 step time at 32k keys


def timing_quantized_decode(fa, device, shapes, warmup, reps, group_size=64, block_size=16):
    """Our decode step on K and V quantized by quantize_kv (each bit width of QUANTIZED_DECODE_GOALS, groups of
    group_size), paged (block_size-slot blocks in shuffled order) and contiguous, against our fp16 decode of the
    same paged cache: the ratio the profile predicts (benchmarks/README.md, quantized sections)."""
    rows = []
    for batch, n, heads, kv_heads, head_dim in progress(shapes, "timing: quantized decode"):
        blocks = math.ceil(n / block_size)
        k_cache, v_cache, table, q, lens = paged_decode_inputs(batch, n, heads, kv_heads, head_dim, block_size, device,
                                                               torch.Generator().manual_seed(n + kv_heads))
        fp16 = lambda: fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens,  # noqa: E731
                                                  block_table=table, causal=True)
        fp16_ms = try_run(lambda: median_ms(fp16, device, warmup, reps))
        for bits, goal in QUANTIZED_DECODE_GOALS.items():
            for layout in ("paged", "contiguous"):
                def quantized_ms():   # (the caches inside: running out of memory is recorded like the rest)
                    k, v = k_cache, v_cache
                    if layout == "contiguous":   # the same keys in order, [B, S, Hkv, D]
                        k, v = (c[table.long()].view(batch, blocks * block_size, kv_heads, head_dim) for c in (k, v))
                    (k_codes, k_scales, k_biases), (v_codes, v_scales, v_biases) = (
                        fa.quantize_kv(c, bits, group_size) for c in (k, v))
                    paging = dict(block_table=table) if layout == "paged" else {}
                    return median_ms(lambda: fa.flash_attn_with_kvcache(
                        q, k_codes, v_codes, cache_seqlens=lens, causal=True, k_scales=k_scales, k_biases=k_biases,
                        v_scales=v_scales, v_biases=v_biases, kv_bits=bits, kv_group_size=group_size, **paging),
                        device, warmup, reps)
                ms = try_run(quantized_ms)
                ratio = ms / fp16_ms if isinstance(ms, float) and isinstance(fp16_ms, float) else None
                rows.append(dict(kind="quantized_decode", layout=layout, batch=batch, context=n,
                                 heads=f"{heads}/{kv_heads}", bits=bits, group=group_size, ms=ms, fp16_ms=fp16_ms,
                                 ratio_to_fp16=ratio, goal=goal))
    return rows


# ---------------------------------------------------------------------------------------------- output
def table(rows, columns, title):
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
        return "-" if v is None else str(v)
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [title, "  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    print("\n".join(lines) + "\n")


def plot(results, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefill = [r for r in results.get("work", []) if r["kind"] == "prefill"]
    if prefill:
        fig, ax = plt.subplots(figsize=(6, 4))
        for window in sorted({r["window"] for r in prefill if r["window"]}):
            rows = [r for r in prefill if r["window"] == window]
            ax.loglog([r["tokens"] for r in rows], [r["k_tiles"] for r in rows], "o-",
                      label=f"ours, window {window}: K tiles loaded")
        rows = [r for r in prefill if not r["window"]] or prefill
        n = [r["tokens"] for r in rows]
        ax.loglog(n, [r["full_causal_tiles"] for r in rows], "s--", label="ours, full causal: K tiles loaded")
        ax.loglog(n, [r["eager_score_elements"] / 1024 for r in rows], "^:", label="eager: 32x32 score tiles (n²/1024)")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("tiles (per head)")
        ax.set_title("Prefill work (simulator counters)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "work.png", dpi=120)
        plt.close(fig)
    memory = results.get("memory", [])
    if memory:
        fig, ax = plt.subplots(figsize=(6, 4))
        n = [r["tokens"] for r in memory]
        ax.loglog(n, [r["ours_bytes"] / 2**20 for r in memory], "o-", label="ours (out + LSE)")
        ax.loglog(n, [r["eager_bytes"] / 2**20 for r in memory], "s--", label="eager attention with a mask")
        ax.loglog(n, [r["inputs_bytes"] / 2**20 for r in memory], ":", color="gray", label="q, k, v themselves")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("MiB allocated by the call")
        ax.set_title("Attention memory, window 128, H=8/Hkv=1, D=64, fp16")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "memory.png", dpi=120)
        plt.close(fig)


def profile_main(args):
    """--profile: ours vs MLX per case, counters and MODEL predictions (benchmarks/instrument.py)."""
    from benchmarks import cost_model, instrument
    from tests.mslsim.anchors import mlx
    fa, lib = load_kernel(), mlx.library()
    cases = instrument.SMOKE_CASES if args.smoke else instrument.CASES
    cases = [c for c in cases if not args.cases or args.cases in c["case"]]
    records = []
    for c in progress(cases, "profile"):
        records += instrument.profile_case(fa, lib, c)
    if records:   # --cases may select training cases only
        rows = []
        for ours, theirs in zip(records[::2], records[1::2]):   # ref: MLX, or our fp16 decode for quantized caches
            row = dict(case=ours["case"], ref=theirs["kernel"])
            for gpu in cost_model.PREDICTED_GPUS:
                row[f"ours_{gpu}_ms_model"], row[f"ref_{gpu}_ms_model"] = ours["predicted_ms"][gpu], theirs["predicted_ms"][gpu]
                row[f"ours/ref_{gpu}"] = ours["predicted_ms"][gpu] / theirs["predicted_ms"][gpu]
            # per FLOP (4 (DK + DV) / 2 per visible pair): the wide cases' reference is ours at another head dim
            flops = lambda r: r["shape"]["head_dim"] + r["shape"].get("head_dim_v", r["shape"]["head_dim"])   # noqa: E731
            row["ours/ref_per_flop_m3_max"] = row["ours/ref_m3_max"] * flops(theirs) / flops(ours)
            for name, r in (("ours", ours), ("ref", theirs)):   # device bytes moved / the minimal DRAM bytes (issue 15: <= 1.05 x minimal)
                row[f"{name}_bytes/min"] = r["device_bytes"] / r["minimal_bytes"]
            row["ours_err"], row["ref_err"] = ours["max_abs_err"], theirs["max_abs_err"]
            for name, record in (("ours", ours), ("ref", theirs)):   # residency inputs of the first (main) launch
                c = record["launches"][0]["counters"]
                row[f"{name}_tg_bytes/regs_est/resident"] = (f"{c['threadgroup_memory']}/{c.get('registers_per_thread', '-')}/"
                                                            f"{cost_model.residency(c['threads_per_threadgroup'], c['threadgroup_memory'], c.get('registers_per_thread', 0))}")
            rows.append(row)
        table(rows, list(rows[0]), "PROFILE MODEL (predicted from simulator instruction counts, NOT a timing): ours vs "
              "the reference (ref: MLX, or our fp16 decode for quantized KV caches)")
        def ratio(o, t, n):
            a, b = o["counters"].get(n, 0), t["counters"].get(n, 0)
            return a / b if b else (float("inf") if a else None)
        names = sorted(n for n in {k for r in records for k in r["counters"]} - {"launches"} if any(r["counters"].get(n) for r in records))
        counter_rows = [dict(counter=n, **{o["case"][:34]: ratio(o, t, n) for o, t in zip(records[::2], records[1::2])})
                        for n in names]
        table(counter_rows, list(counter_rows[0]), "ours / MLX per counter (executed lane-instructions; inf: MLX has none)")
    training = [c for c in (instrument.SMOKE_TRAINING_CASES if args.smoke else instrument.TRAINING_CASES)
                if not args.cases or args.cases in c["case"]]
    backward_records, backward_rows = [], []
    for c in progress(training, "profile backward"):
        forward, backward = instrument.profile_backward(fa, c)
        backward_records += [forward, backward]
        row = dict(case=c["case"])
        for gpu in cost_model.PREDICTED_GPUS:
            row[f"forward_{gpu}_ms_model"], row[f"backward_{gpu}_ms_model"] = (r["predicted_ms"][gpu] for r in (forward, backward))
            row[f"backward/forward_{gpu}"] = backward["predicted_ms"][gpu] / forward["predicted_ms"][gpu]
        row["mma backward/forward"] = (backward["counters"]["matrix_multiply_accumulate"]
                                       / forward["counters"]["matrix_multiply_accumulate"])
        row["forward_err"], row["grad_err"] = forward["max_abs_err"], backward["max_abs_err"]
        backward_rows.append(row)
    if backward_rows:
        table(backward_rows, list(backward_rows[0]), "PROFILE MODEL, training: our backward vs our forward "
              "(predicted from simulator instruction counts, NOT a timing; issue 18 goal: backward/forward <= 2.5)")
    calibration = None if args.smoke or not records else instrument.calibrate(fa, lib)
    if calibration:
        print(f"calibration (MODEL vs published MLX): {calibration}\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.json").write_text(json.dumps(records, indent=1))
    (args.out / "profile_backward.json").write_text(json.dumps(backward_records, indent=1))
    (args.out / "profile_model.json").write_text(json.dumps(dict(
        note="predicted_ms are a MODEL from executed-instruction counts, not timings", sources=cost_model.sources(),
        calibration=calibration), indent=1))
    if records:
        plot_profile(records, args.out)
    print(f"profile: {args.out / 'profile.json'}, {args.out / 'profile_model.json'}, {args.out / 'profile.png'}")
    return records


def plot_profile(records, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pairs = list(zip(records[::2], records[1::2]))
    keys = ["fp32", "int32_add", "int64_add", "int64_mul", "int_div", "compare_select", "matrix_multiply_accumulate",
            "device_load_bytes", "threadgroup_load_bytes", "threadgroup_barrier"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4 + 0.3 * len(pairs)))
    labels = [o["case"] for o, _ in pairs]
    for i, gpu in enumerate(("m3_max", "m4_max")):
        left.barh([y + 0.4 * i for y in range(len(pairs))], [o["predicted_ms"][gpu] / t["predicted_ms"][gpu]
                                                              for o, t in pairs], 0.4, label=gpu)
    left.axvline(1, color="gray", lw=0.8)
    left.set_yticks(range(len(pairs)), labels, fontsize=7)
    left.set_xlabel("ours / MLX, predicted time (MODEL, not a timing)")
    left.legend()
    for y, (o, t) in enumerate(pairs):
        right.scatter([o["counters"].get(k, 0) / max(t["counters"].get(k, 0), 1) for k in keys], keys, s=12,
                      label=o["case"])
    right.set_xscale("symlog")
    right.axvline(1, color="gray", lw=0.8)
    right.set_xlabel("ours / MLX per counter (simulator counts)")
    right.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_dir / "profile.png", dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny configuration (CI)")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="m3-max", help="roofline figures to use")
    parser.add_argument("--peak-tflops", type=float, help="override the roofline's peak TFLOPS")
    parser.add_argument("--bandwidth", type=float, help="override the roofline's GB/s")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--profile", action="store_true",
                        help="executed-instruction profiles of ours vs MLX with a MODEL of M3/M4 Max time "
                             "(profile.json, profile.png); with --smoke: tiny cases")
    parser.add_argument("--cases", help="--profile: only cases whose name contains this text")
    args = parser.parse_args(argv)
    if args.profile:
        return profile_main(args)
    device = "mps" if torch.backends.mps.is_available() else "cpu"
    simulated = device == "cpu"
    peak = (args.peak_tflops or GPUS[args.gpu][0], args.bandwidth or GPUS[args.gpu][1])
    fa = load_kernel()
    results = dict(device=device, simulated=simulated, roofline_gpu=args.gpu, peak=peak)

    if simulated:
        lengths = [256, 512] if args.smoke else [1024, 2048, 4096, 8192]
        results["work"] = work_prefill(fa, lengths, [128, None] if args.smoke else [128, 1024, None])
        results["work"] += work_decode(fa, [300, 700] if args.smoke else [512, 2048, 8192, 32768],
                                       [128, None] if args.smoke else [128, 4096, None])
        table([r for r in results["work"] if r["kind"] == "prefill"],
              ["tokens", "window", "k_tiles", "band_tiles", "ratio", "full_causal_tiles"],
              "Prefill work (simulator): K tiles loaded vs tiles in the band (ratio must be 1.00)")
        table([r for r in results["work"] if r["kind"] == "decode"],
              ["context", "window", "partitions_computed", "partitions_intersecting", "partitions_skipped",
               "kv_bytes", "minimal_kv_bytes", "bytes_ratio"],
              "Decode work (simulator): partitions and K/V bytes vs the minimum")

    mem_lengths = [1024, 4096] if args.smoke else [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
    results["memory"] = memory_sweep(fa, mem_lengths)
    for r in results["memory"]:
        r["ours_mib"], r["eager_mib"] = r["ours_bytes"] / 2**20, r["eager_bytes"] / 2**20
    table(results["memory"], ["tokens", "ours_mib", "eager_mib"],
          "Memory allocated by one attention call (meta tensors; eager = explicit mask + scores)")

    if device == "mps" or args.smoke:
        warmup, reps = (1, 3) if args.smoke else (3, 10)
        prefill_lengths = [128, 256] if args.smoke else [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
        configs = [("causal H8", 8, 8, 0), ("window128+sinks H8", 8, 8, 128), ("window128+sinks GQA 32/8", 32, 8, 128)]
        if args.smoke:
            configs = configs[1:2]
        results["timing"] = timing_prefill(fa, device, prefill_lengths, configs, warmup, reps, peak)
        results["timing"] += timing_decode(fa, device, [1, 2] if args.smoke else [1, 8, 32, 64],
                                           [256] if args.smoke else [512, 2048, 8192, 32768],
                                           [None, 128] if args.smoke else [None, 1024], warmup, reps, peak,
                                           **(dict(heads=4, kv_heads=1, head_dim=64) if args.smoke else {}))
        results["timing"] += timing_quantized_decode(
            fa, device, [(1, 256, 8, 2, 128)] if args.smoke else QUANTIZED_DECODE_SHAPES, warmup, reps)
        label = "SIMULATED on the CPU (not Apple GPU numbers)" if simulated else f"on {device}"
        table([r for r in results["timing"] if r["kind"] == "prefill"],
              ["config", "tokens", "ms", "sdpa_ms", "mlx_ms", "speedup_vs_sdpa", "tflops", "roofline_ms", "mib",
               "sdpa_mib"], f"Prefill timing, median ms {label}")
        table([r for r in results["timing"] if r["kind"] == "decode"],
              ["batch", "context", "window", "ms", "sdpa_ms", "speedup_vs_sdpa", "gbps", "roofline_ms"],
              f"Decode timing, median ms {label}")
        table([r for r in results["timing"] if r["kind"] == "quantized_decode"],
              ["layout", "batch", "context", "heads", "bits", "group", "ms", "fp16_ms", "ratio_to_fp16", "goal"],
              f"Quantized decode (issue 16) vs our fp16 decode of the same paged cache, median ms {label}")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    plot(results, args.out)
    print(f"results: {args.out / 'results.json'}, plots: {args.out}/*.png")
    return results


if __name__ == "__main__":
    main()
