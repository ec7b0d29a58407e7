"""Executed-instruction profiles of our shaders and MLX's on the same attention problems, with a MODEL of their
time on M3 Max / M4 Max (benchmarks/cost_model.py). Nothing here is a timing.

Ours run through the torch ops (the CPU build, same launch plan and constants as on a Mac) with MSLSIM_PROFILE=1;
MLX's kernels run from the mlx-metal wheel's headers (tests/mslsim/anchors/mlx.py, MLX's own host choices).

Extrapolation, exact (counts per threadgroup are deterministic functions of its band of keys):
- batches and KV-head groups are independent threadgroups doing identical work (same lengths, no data-dependent
  trip counts), so a case is simulated for one batch and one KV head (its G query heads) and every extensive
  counter is multiplied by B x Hkv; decode's split-K count depends on B x Hkv (decode_split), so the slice runs
  with the whole case's split, passed as num_splits;
- within a head, prefill query blocks (grid columns) are grouped by `column_plan`: a block's counts are affine in
  its index within a class, so two blocks per class are simulated (mslsim's threadgroup subset), plus the class's
  last block, which checks the affine law on every run.
`extrapolate_check` proves both exact on small shapes simulated whole (tests/test_profile_benchmark.py). Sequence
lengths are never shortened: a case runs at the length it names; except training cases past TRAINING_WHOLE tokens,
whose counters are a quadratic law in the length, fitted exactly on shorter whole runs and checked on one more
(profile_backward).
"""
from __future__ import annotations

import contextlib
import math
import os
from fractions import Fraction

import torch

import mslsim
from benchmarks import cost_model
from tests.mslsim.anchors import mlx
from tests.reference import affine_values, attention_reference

# Counters that do not scale with the number of threadgroups.
INTENSIVE = ("threads_per_threadgroup", "threadgroup_memory", "launches", "registers_per_thread")
PROFILE_PREFIX = "profile["
# Profiled launches run on one simulator worker: with two, our prefill was seen to count one branch and one
# compare/select more per extra worker (not yet explained; it also varies by that much with the inputs).
PROFILE_WORKERS = 1
# Our prefill's branch and compare_select counts depend a little on the data (seen: 2 in 12e6 between inputs, and
# 508 in 10.7e6 off the affine law at the last 8k block; likely a value-dependent branch, not yet located): they are
# extrapolated within this relative error; every other counter exactly.
NOISY_COUNTERS, NOISE = ("branch", "compare_select"), 1e-4


def agrees(name, value, expected):
    return abs(value - expected) <= (NOISE * abs(expected) if name in NOISY_COUNTERS else 0)


def case(name, kind, batch, heads, kv_heads, head_dim, seqlen, window=None, sinks=False, kv_bits=None, head_dim_v=None,
         mla=False):
    """head_dim: q's and k's; head_dim_v: v's (None: the same); mla: v is the view k[..., :head_dim_v] (decode)."""
    return dict(case=name, kind=kind, batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim, seqlen=seqlen,
                window=window, sinks=sinks, dtype="float16", kv_bits=kv_bits, head_dim_v=head_dim_v or head_dim, mla=mla)


# Quantized decode (issue 16): kv_bits-bit affine caches in groups of KV_GROUP (quantize_kv, MLX's layout). MLX has
# no fused equivalent (its sdpa_vector reads fp16/bf16/fp32 K/V only; mlx-lm's quantized cache runs
# quantized_matmul + softmax unfused), so these cases compare with our own fp16 decode of the same shape.
KV_GROUP = 64


# Issue 17 item 2, wide heads: MLX has no fused kernel for them (steel attention and sdpa_vector stop at D = 256), so
# they compare with our own kernel at D = 128 on the same shape; run.py's time/FLOP column divides by the FLOPs
# (proportional to DK + DV).
WIDE_REFERENCE_HEAD_DIM = 128
WIDE_CASES = [
    case("wide prefill 4k causal H32 D512", "prefill", 1, 32, 32, 512, 4096),
    case("wide prefill 4k causal H32 DK192/DV128", "prefill", 1, 32, 32, 192, 4096, head_dim_v=128),
    case("wide decode B8 ctx8k Hq32/Hkv8 D512", "decode", 8, 32, 8, 512, 8192),
    case("wide decode B8 ctx8k Hq16/Hkv1 MLA DK576/DV512", "decode", 8, 16, 1, 576, 8192, head_dim_v=512, mla=True),
]


# The cases (#14). MLX runs D=256 prefill unfused on M1-M4 (ScaledDotProductAttention::use_fallback);
# its steel kernel is profiled there anyway, as the fused kernel it would be.
CASES = [
    case("prefill 8k causal H32 D128", "prefill", 1, 32, 32, 128, 8192),
    case("prefill 8k window128+sinks H8 D64", "prefill", 1, 8, 8, 64, 8192, window=128, sinks=True),
    case("prefill 4k causal H32 D64", "prefill", 1, 32, 32, 64, 4096),
    case("prefill 4k causal H32 D256", "prefill", 1, 32, 32, 256, 4096),
    case("decode B1 ctx8k Hq32/Hkv8 D128", "decode", 1, 32, 8, 128, 8192),
    case("decode B8 ctx8k Hq32/Hkv8 D128", "decode", 8, 32, 8, 128, 8192),
    case("decode B8 ctx32k Hq32/Hkv4 D128", "decode", 8, 32, 4, 128, 32768),
    case("decode B32 ctx2k Hq32/Hkv32 D128", "decode", 32, 32, 32, 128, 2048),
    case("decode B8 ctx32k Hq32/Hkv4 D128 8-bit KV", "decode", 8, 32, 4, 128, 32768, kv_bits=8),
    case("decode B8 ctx32k Hq32/Hkv4 D128 4-bit KV", "decode", 8, 32, 4, 128, 32768, kv_bits=4),
    # 4 query heads per KV head (Llama 3 8B, Mistral 7B): the quantized vector path
    case("decode B8 ctx32k Hq32/Hkv8 D128 8-bit KV", "decode", 8, 32, 8, 128, 32768, kv_bits=8),
    case("decode B8 ctx32k Hq32/Hkv8 D128 4-bit KV", "decode", 8, 32, 8, 128, 32768, kv_bits=4),
    *WIDE_CASES,
]
SMOKE_CASES = [
    case("smoke prefill 128 window32+sinks H2 D64", "prefill", 1, 2, 2, 64, 128, window=32, sinks=True),
    case("smoke decode B1 ctx1100 Hq4/Hkv2 D128", "decode", 1, 4, 2, 128, 1100),
]

# Issue 18's training goal: backward predicted <= 2.5x the forward at 8k causal D=128. The backward's fused launch
# is key-block parallel, which column_plan (query-block classes) does not cover, so a training case is simulated
# whole for its one-KV-head slice, or past TRAINING_WHOLE tokens extrapolated in the length (profile_backward).
TRAINING_CASES = [case("training 2k causal H32 D128", "prefill", 1, 32, 32, 128, 2048),
                  case("training 8k causal H32 D128", "prefill", 1, 32, 32, 128, 8192)]
SMOKE_TRAINING_CASES = [case("smoke training 128 causal H2 D64", "prefill", 1, 2, 2, 64, 128)]


def sampled(c, fa=None):
    """The simulated slice of a case: one batch, one KV head with its query heads; and the factor to scale by.
    Decode (given fa): the slice is split into the whole case's partitions (checked to give the same partition size)."""
    group = c["heads"] // c["kv_heads"]
    small = {**c, "batch": 1, "heads": group, "kv_heads": 1}
    if fa is not None and c["kind"] == "decode":
        def split(x, num_splits):
            return fa._ops.ops.decode_split(x["batch"], x["heads"], x["kv_heads"], 1, x["head_dim"], 2, x["seqlen"],
                                            x["window"] - 1 if x["window"] else -1, num_splits, 0, x["head_dim_v"])[:2]
        small["num_splits"] = split(c, 0)[0]
        assert split(small, small["num_splits"]) == split(c, 0), "the slice must run the whole case's partitions"
    return small, c["batch"] * c["kv_heads"]


def scale(launches, factor):
    return [{**l, "counters": {k: v if k in INTENSIVE else v * factor for k, v in l["counters"].items()}}
            for l in launches]


# ------------------------------------------------------------------------------------------ inputs
def inputs(c, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, H, Hkv, D, n = c["batch"], c["heads"], c["kv_heads"], c["head_dim"], c["seqlen"]
    DV = c.get("head_dim_v", D)
    q_len = 1 if c["kind"] == "decode" else n
    q = torch.randn(B, H, q_len, D, generator=g).half()
    k, v = torch.randn(B, Hkv, n, D, generator=g).half(), torch.randn(B, Hkv, n, DV, generator=g).half()
    if c.get("mla"):
        v = k[..., :DV]
    sinks = torch.randn(H, generator=g).half().float() if c["sinks"] else None
    return q, k, v, sinks


def quantized(fa, x, bits):
    """(packed, scales, biases) of fp16 K or V rows, as a quantized cache holds them."""
    return fa.quantize_kv(x, bits, KV_GROUP)


def as_cached(fa, c, x):
    """K or V as the kernel reads it: for quantized cases the cache's exact affine values (float64)."""
    return affine_values(*quantized(fa, x, c["kv_bits"]), c["kv_bits"], KV_GROUP) if c["kv_bits"] else x


def max_abs_err(out, q, k, v, c, sinks, rows=slice(None)):
    """max |out - float64 reference| over the case's query `rows` ([B, H, qL, D] layout). Every case is causal
    (bottom-right aligned), so rows r0..r1 see keys 0..r1 only."""
    if rows.stop is not None:
        out, q, k, v = out[:, :, rows], q[:, :, rows], k[:, :, :rows.stop], v[:, :, :rows.stop]
    B, H, qL, D = q.shape
    varlen = lambda t: t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])   # noqa: E731
    cu_q, cu_k = (torch.arange(B + 1, dtype=torch.int32) * n for n in (qL, k.shape[2]))
    window = (c["window"] - 1, 0) if c["window"] else (-1, -1)
    ref, _ = attention_reference(varlen(q), varlen(k), varlen(v), cu_q, cu_k, scale=D ** -0.5, causal=True,
                                 window=window, sinks=sinks)
    return (varlen(out).double() - ref).abs().max().item()


# ------------------------------------------------------------------------------------------ running
def launches_from_counters(counters):
    """simulator_counters() keys `profile[<kernel>].<name>` -> [{kernel, counters}] (one entry per kernel)."""
    by_kernel = {}
    for key, value in counters.items():
        if key.startswith(PROFILE_PREFIX):
            kernel, name = key[len(PROFILE_PREFIX):].split("].", 1)
            by_kernel.setdefault(kernel, {})[name] = value
    return [dict(kernel=k, counters=v) for k, v in by_kernel.items()]


@contextlib.contextmanager
def environment(**variables):
    """Set environment variables (None: unset) for the duration of the block."""
    def apply(values):
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    previous = {name: os.environ.get(name) for name in variables}
    apply(variables)
    try:
        yield
    finally:
        apply(previous)


def prefill_tiles(fa, kernel, head_dim):
    """(query rows per threadgroup, keys per K tile) of an implementation's prefill kernel."""
    return (fa.PREFILL_BLOCK_Q, fa.KV_TILE_KEYS[head_dim]) if kernel == "ours" else mlx.steel_tiles(head_dim)


# Registers (32-bit) per thread of a prefill kernel, for the cost model's residency: an ESTIMATE from the fragments
# a lane holds at once, not a compiler figure. An 8x8 fragment is 2 elements per lane: 2 registers in fp32, 1 in a
# 16-bit type. Ours: Q (D/8 fragments in the input type), O (D/8), S (BK/8) and one K/V operand. MLX steel: per 8-row fragment row, O (D/8) and S (BK/8), plus one Q and one K/V
# fragment (its Q stays in threadgroup memory, reloaded per head-dim step). Both: SCALAR_REGISTERS for row
# coordinates, offsets, pointers and the softmax state (estimate).
SCALAR_REGISTERS = 16


def prefill_registers(fa, kernel, head_dim, element_bytes, head_dim_v=None):
    """Ours holds 1 / HEAD_PARTS of Q's and O's head dims per simdgroup (the wide heads' split, params.h)."""
    head_dim_v = head_dim_v or head_dim
    block_q, block_k = prefill_tiles(fa, kernel, head_dim)
    registers = lambda fragments, element=4: fragments * 2 * element // 4   # noqa: E731
    if kernel == "ours":
        parts = fa.HEAD_PARTS[head_dim_v]
        return (registers(head_dim // parts // 8, element_bytes) + registers(head_dim_v // parts // 8)
                + registers(block_k // 8) + registers(1) + SCALAR_REGISTERS)
    rows = block_q // (4 * 8)   # 8-row fragments per simdgroup (4 simdgroups)
    return rows * (registers(head_dim // 8) + registers(block_k // 8)) + registers(2) + SCALAR_REGISTERS


def column_ids(c, block_q, columns):
    """Linear ids of the prefill grid's (query blocks, heads, batch) threadgroups in the given query blocks."""
    return None if columns is None else mslsim.threadgroup_ids(
        (math.ceil(c["seqlen"] / block_q), c["heads"], c["batch"]), columns)


def run_ours(fa, lib, c, q, k, v, sinks, columns=None):
    """Our op on the case (q/k/v [B, H, L, D]); returns (out [B, H, qL, D], launches). columns: prefill only, the
    query blocks to simulate (the other rows of `out` are not written)."""
    ids = column_ids(c, fa.PREFILL_BLOCK_Q, columns)
    with environment(MSLSIM_PROFILE="1", MSLSIM_WORKERS=str(PROFILE_WORKERS),
                     MSLSIM_THREADGROUPS=ids and ",".join(map(str, ids))):
        fa.simulator_counters(reset=True)
        if c["kind"] == "prefill":
            t = lambda x: x.transpose(1, 2).contiguous()   # noqa: E731  [B, L, H, D]
            w = c["window"]
            out = fa.flash_attn_func(t(q), t(k), t(v), causal=True, window_size=(w - 1 if w else -1, 0),
                                     s_aux=sinks).transpose(1, 2)
        else:
            B, Hkv, n, D = k.shape
            block_size = 32
            blocks = math.ceil(n / block_size)
            cache = lambda x: torch.nn.functional.pad(x, (0, 0, 0, blocks * block_size - n)).transpose(1, 2).reshape(  # noqa: E731
                B * blocks, block_size, Hkv, x.shape[3]).contiguous()
            table = torch.arange(B * blocks, dtype=torch.int32).view(B, blocks)
            lens = torch.full((B,), n, dtype=torch.int32)
            k_cache, quant = cache(k), {}
            v_cache = k_cache[..., :v.shape[3]] if c.get("mla") else cache(v)   # MLA: V read in place from K's rows
            if c["kv_bits"]:
                (k_cache, k_scales, k_biases), (v_cache, v_scales, v_biases) = (
                    quantized(fa, x, c["kv_bits"]) for x in (k_cache, v_cache))
                quant = dict(k_scales=k_scales, k_biases=k_biases, v_scales=v_scales, v_biases=v_biases,
                             kv_bits=c["kv_bits"], kv_group_size=KV_GROUP)
                fa.simulator_counters(reset=True)   # the decode step only, not the quantization
            out = fa.flash_attn_with_kvcache(q.transpose(1, 2).contiguous(), k_cache, v_cache, cache_seqlens=lens,
                                             block_table=table, causal=True, num_splits=c.get("num_splits", 0),
                                             **quant).transpose(1, 2)
        return out, launches_from_counters(fa.simulator_counters(reset=True))


def mlx_pass1(c):
    """The pass-1 kernel MLX's 2-pass decode launches for a decode case: the duplication-free
    sdpa_vector_2pass_1_gqa (G = H / Hkv in {8, 12, 16}, >= 8192 keys, no mask/sinks; mlx.uses_gqa_pass1) or the
    generic sdpa_vector_2pass_1."""
    gqa = mlx.uses_gqa_pass1(c["heads"], c["kv_heads"], 1, c["seqlen"], c["head_dim"], sinks=c["sinks"])
    return "sdpa_vector_2pass_1_gqa" if gqa else "sdpa_vector_2pass_1"


def run_mlx(fa, lib, c, q, k, v, sinks, columns=None):
    """MLX's kernel for the case, launched as MLX's host code launches it; returns (out, launches). columns: as
    run_ours."""
    scale_ = c["head_dim"] ** -0.5
    if c["kind"] == "decode":
        if mlx.uses_two_pass(c["heads"], c["kv_heads"], c["seqlen"]):
            out, stats = mlx.sdpa_vector_2pass(lib, q, k, v, scale_, profile=True, workers=PROFILE_WORKERS)
        else:
            out, one = mlx.sdpa_vector(lib, q, k, v, scale_, profile=True, workers=PROFILE_WORKERS)
            stats = [one]
        kernels = [mlx_pass1(c), "sdpa_vector_2pass_2"] if len(stats) == 2 else ["sdpa_vector"]
    else:
        mask = None
        if c["window"]:   # MLX takes a window as a boolean mask array (as benchmarks/run.py times it)
            pos = torch.arange(c["seqlen"])
            mask = (pos[:, None] >= pos[None, :]) & (pos[:, None] - pos[None, :] < c["window"])
        ids = column_ids(c, mlx.steel_tiles(c["head_dim"])[0], columns)
        out, one = mlx.steel_attention(lib, q, k, v, scale_, causal=mask is None, mask=mask, sinks=sinks, profile=True,
                                       workers=PROFILE_WORKERS, only_threadgroups=ids)
        stats, kernels = [one], ["steel_attention"]
    return out, [dict(kernel=name, counters=s.profile) for name, s in zip(kernels, stats)]


RUNNERS = {"ours": run_ours, "mlx": run_mlx}


# ------------------------------------------------------------------------------------------ query-block classes
def column_plan(seqlen, window, block_q, block_k):
    """({query block: (a, b)}, blocks to simulate): block i's counters are counters(a) + (counters(b) -
    counters(a)) x (i - a) / (b - a), or counters(i) when a == b.

    Query block i (causal, bottom-right aligned, left window W) sees keys [i*BQ - W + 1, (i+1)*BQ): past the
    warm-up where that band starts clipped at key 0, blocks i and i + period (period*BQ a multiple of BK) see the
    same tiles shifted by whole tiles, one more tile at the diagonal per period without a window. So within a
    residue class their counts are affine in i: two members are simulated, and the class's last one checks the law.
    Unaligned lengths (a partial last tile changes the blocks that reach it) are simulated whole."""
    blocks = math.ceil(seqlen / block_q)
    if seqlen % block_q or seqlen % block_k:
        return {i: (i, i) for i in range(blocks)}, list(range(blocks))
    period = math.lcm(block_q, block_k) // block_q
    # Block 0 is always its own class: its one tile is both the sequence's first and the diagonal, which a kernel
    # that masks only edge tiles counts once where later blocks count two edge tiles.
    warm_up = min(max(math.ceil((window - 1) / block_q) if window else 0, 1), blocks)
    plan = {i: (i, i) for i in range(warm_up)}
    for first in range(warm_up, min(warm_up + period, blocks)):
        members = range(first, blocks, period)
        plan.update({i: (members[0], members[1]) if len(members) > 2 else (i, i) for i in members})
    simulate = {x for pair in plan.values() for x in pair} | {max(i for i in plan if plan[i] == pair)
                                                               for pair in set(plan.values())}
    return plan, sorted(simulate)


def combine(plan, simulated):
    """The whole grid's launches from the simulated blocks' ({block: launches}); raises if a simulated block
    disagrees with its class's affine law."""
    def value(block, j, name):
        a, b = plan[block]
        ca, cb = (simulated[x][j]["counters"][name] for x in (a, b))
        return ca if a == b else ca + (cb - ca) * ((block - a) // (b - a))
    for block, launches in simulated.items():
        for j, l in enumerate(launches):
            wrong = {n: v for n, v in l["counters"].items() if n not in INTENSIVE and not agrees(n, value(block, j, n), v)}
            if wrong:
                raise RuntimeError(f"query block {block} of {l['kernel']}: counters { {n: (v, value(block, j, n)) for n, v in wrong.items()} } are not affine "
                                   f"in the block index within its class {plan[block]}; extrapolation would be inexact")
    first = simulated[min(simulated)]
    return [dict(kernel=l["kernel"], counters={n: v if n in INTENSIVE else sum(value(i, j, n) for i in plan)
                                               for n, v in l["counters"].items()})
            for j, l in enumerate(first)]


def simulate(fa, lib, kernel, c, q, k, v, sinks):
    """(launches, max_abs_err, simulated query blocks) of one implementation on a case (small enough in B x Hkv
    to run). Prefill runs only the query blocks column_plan picks, one launch each; max_abs_err covers their rows."""
    run = RUNNERS[kernel]
    if c["kind"] == "decode":
        out, launches = run(fa, lib, c, q, k, v, sinks)
        return launches, max_abs_err(out, q, as_cached(fa, c, k), as_cached(fa, c, v), c, sinks), None
    block_q, block_k = prefill_tiles(fa, kernel, c["head_dim"])
    plan, blocks = column_plan(c["seqlen"], c["window"], block_q, block_k)
    simulated, err = {}, 0.0
    for block in blocks:
        out, simulated[block] = run(fa, lib, c, q, k, v, sinks, columns=[block])
        rows = slice(block * block_q, min((block + 1) * block_q, c["seqlen"]))
        err = max(err, max_abs_err(out, q, k, v, c, sinks, rows))
    return combine(plan, simulated), err, blocks


def dram_bytes(c, kernel):
    """Bytes each implementation must move from DRAM at least: q, k, v read once, out written once (fp16); MLX's
    boolean window mask is read too."""
    B, H, Hkv, D, n = c["batch"], c["heads"], c["kv_heads"], c["head_dim"], c["seqlen"]
    DV = c.get("head_dim_v", D)
    q_len = 1 if c["kind"] == "decode" else n
    # per K or V row: fp16 elements, or packed words + an fp16 scale and bias per group; MLA's V rows are K's
    row_bytes = lambda d: d * c["kv_bits"] // 8 + 2 * 2 * d // KV_GROUP if c["kv_bits"] else 2 * d   # noqa: E731
    total = 2 * B * H * q_len * (D + DV) + B * Hkv * n * (row_bytes(D) + (0 if c.get("mla") else row_bytes(DV)))
    if kernel == "mlx" and c["window"]:
        total += n * n
    return total


def device_bytes(counters):
    """Bytes a launch's (or a record's) device loads and stores moved (constant-argument loads are not device
    loads: mslsim counts them as constant_load_*)."""
    return counters.get("device_load_bytes", 0) + counters.get("device_store_bytes", 0)


def predict(launches, total_bytes):
    """{gpu: MODEL ms} of a sequence of launches; the minimal DRAM bytes are shared between launches in proportion to
    their device bytes."""
    device = [device_bytes(l["counters"]) for l in launches]
    return {gpu: sum(cost_model.predict_ms(l["counters"], total_bytes * d / max(sum(device), 1), gpu)
                     for l, d in zip(launches, device))
            for gpu in cost_model.PREDICTED_GPUS}


def summed(launches):
    """The launches' extensive counters added up."""
    counters = {}
    for l in launches:
        for name, value in l["counters"].items():
            if name not in INTENSIVE:
                counters[name] = counters.get(name, 0) + value
    return counters


def profile_case(fa, lib, c):
    """Two records (ours, then MLX; for quantized caches our fp16 decode, kernel "ours fp16") for a case: counters
    extrapolated exactly from the simulated slice."""
    small, factor = sampled(c, fa)
    q, k, v, sinks = inputs(small)
    records = []
    comparator = ("ours fp16", "ours", {**small, "kv_bits": None}) if c["kv_bits"] else ("mlx", "mlx", small)
    if c["case"].startswith("wide "):   # its own split at D = 128 (decode)
        D = WIDE_REFERENCE_HEAD_DIM
        comparator = (f"ours D{D}", "ours", sampled({**c, "head_dim": D, "head_dim_v": D, "mla": False}, fa)[0])
    for kernel, runner, shape in (("ours", "ours", small), comparator):
        if shape is not small:
            q, k, v, sinks = inputs(shape)
        launches, err, blocks = simulate(fa, lib, runner, shape, q, k, v, sinks)
        launches = scale(launches, factor)
        if c["kind"] == "prefill":
            registers = prefill_registers(fa, runner, shape["head_dim"], torch.finfo(getattr(torch, c["dtype"])).bits // 8,
                                          shape["head_dim_v"])
            launches = [{**l, "counters": {**l["counters"], "registers_per_thread": registers}} for l in launches]
        total_bytes = dram_bytes({**c, **{k_: shape[k_] for k_ in ("kv_bits", "head_dim", "head_dim_v", "mla")}}, runner)
        predicted, counters = predict(launches, total_bytes), summed(launches)
        records.append(dict(kernel=kernel, case=c["case"],
                            shape={k_: shape[k_] if k_ in ("head_dim", "head_dim_v") else c[k_]
                                   for k_ in ("kind", "batch", "heads", "kv_heads", "head_dim", "head_dim_v", "seqlen",
                                              "window", "sinks", "dtype")},
                            counters=counters, launches=launches, predicted_ms=predicted,
                            device_bytes=device_bytes(counters), minimal_bytes=total_bytes,
                            max_abs_err=err, simulated=dict(batch=1, kv_heads=1, scale_factor=factor,
                                                            query_blocks=blocks)))
    return records


def backward_bytes(c):
    """Minimal DRAM bytes of the backward: q, k, v, out, dout read and dq, dk, dv written once (fp16), the LSE read
    (fp32)."""
    B, H, Hkv, D, n = c["batch"], c["heads"], c["kv_heads"], c["head_dim"], c["seqlen"]
    return 2 * (4 * B * H * n * D + 4 * B * Hkv * n * D) + 4 * B * H * n


def simulate_training(fa, c, chunks):
    """(forward launches, backward launches, errors) of ours on a case's one-KV-head slice simulated whole, the
    backward with `chunks` chunks of key blocks; errors: out's max |error| (forward) and the largest of dq/dk/dv's
    (backward) against float64 autograd through the reference."""
    small, _ = sampled(c)
    q, k, v, sinks = inputs(small)
    t = lambda x: x.transpose(1, 2).contiguous()   # noqa: E731  [B, L, H, D]
    B, H, n, D = q.shape
    ops, scale_ = fa._ops.ops, D ** -0.5
    window = (c["window"] - 1, 0) if c["window"] else (-1, -1)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).half()
    options = (n, n, scale_, True, *window, 0.0, None)
    with environment(MSLSIM_PROFILE="1", MSLSIM_WORKERS=str(PROFILE_WORKERS)):
        fa.simulator_counters(reset=True)
        out, lse = ops.flash_attn_varlen(t(q), t(k), t(v), None, None, *options, sinks)
        forward = launches_from_counters(fa.simulator_counters(reset=True))
        grads = ops.flash_attn_varlen_backward(t(dout), t(q), t(k), t(v), out, lse, None, None, None, *options, sinks,
                                               chunks)[:3]
        backward = launches_from_counters(fa.simulator_counters(reset=True))
    exact = [x.double().requires_grad_(True) for x in (q, k, v)]
    varlen = lambda x: x.transpose(1, 2).reshape(-1, x.shape[1], D)   # noqa: E731  [B, H, L, D] -> [B L, H, D]
    cu = torch.arange(B + 1, dtype=torch.int32) * n
    ref, _ = attention_reference(*map(varlen, exact), cu, cu, scale=scale_, causal=True, window=window, sinks=sinks)
    ref_grads = torch.autograd.grad(ref, exact, varlen(dout).double())
    errors = dict(forward=max_abs_err(out.transpose(1, 2), q, k, v, small, sinks),
                  backward=max((g.transpose(1, 2).double() - r).abs().max().item() for g, r in zip(grads, ref_grads)))
    return forward, backward, errors


# Training cases longer than TRAINING_WHOLE tokens (8k whole is beyond the simulator's budget here) are extrapolated
# in the sequence length n, exactly: at a fixed chunk count every counter of every launch is a quadratic polynomial
# in n (a multiple of the tiles): work per tile pair, per key or query block and per launch does not depend on n, and
# a causal band holds a quadratic number of tile pairs (the first query / key block, which differs, adds a
# constant). The slice is simulated whole at LAW_LENGTHS, the first three fit the polynomial in rationals, the last
# must agree with it, and it is evaluated at the case's length.
TRAINING_WHOLE = 2048
LAW_LENGTHS = (512, 1024, 1536, 2048)


def through(points, x):
    """The polynomial through points [(x_i, y_i)] at x, exactly (Lagrange, in Fractions)."""
    total = Fraction(0)
    for i, (xi, yi) in enumerate(points):
        term = Fraction(yi)
        for j, (xj, _) in enumerate(points):
            if j != i:
                term *= Fraction(x - xj, xi - xj)
        total += term
    return total


def extrapolate_length(runs, n):
    """{length: launches} -> the launches at length n, each extensive counter through the quadratic of the first three
    lengths; raises if the last length disagrees with it."""
    lengths = sorted(runs)
    fit, check = lengths[:3], lengths[-1]
    launches = []
    for j, first in enumerate(runs[fit[0]]):
        assert all(runs[m][j]["kernel"] == first["kernel"] for m in lengths), "the same launches at every length"
        at = lambda name, x: through([(m, runs[m][j]["counters"].get(name, 0)) for m in fit], x)   # noqa: E731
        wrong = {name: (v, float(at(name, check))) for name, v in runs[check][j]["counters"].items()
                 if name not in INTENSIVE and not agrees(name, float(at(name, check)), v)}
        if wrong:
            raise RuntimeError(f"{first['kernel']}: counters {wrong} at {check} tokens are off the quadratic law of "
                               f"{fit}; extrapolation would be inexact")
        launches.append(dict(kernel=first["kernel"], counters={name: v if name in INTENSIVE else float(at(name, n))
                                                               for name, v in first["counters"].items()}))
    return launches


def profile_backward(fa, c):
    """(forward, backward) records of ours on a prefill case: its one-KV-head slice simulated whole (every
    threadgroup, no query-block extrapolation; past TRAINING_WHOLE tokens at LAW_LENGTHS, extrapolated in n), scaled
    by B x Hkv. The slice runs the whole case's chunks of key blocks (backward_chunks; checked like decode's
    partitions). max_abs_err: of the longest length simulated."""
    small, factor = sampled(c)
    ops, n, D = fa._ops.ops, c["seqlen"], c["head_dim"]
    chunks = ops.backward_chunks(c["batch"], c["kv_heads"], D, 2, n, 0, 0)
    assert ops.backward_chunks(small["batch"], small["kv_heads"], D, 2, n, chunks, 0) == chunks, \
        "the slice must run the whole case's chunks"
    lengths = (n,) if n <= TRAINING_WHOLE else LAW_LENGTHS
    runs = {m: simulate_training(fa, {**c, "seqlen": m}, chunks) for m in lengths}
    forward, backward, errors = runs[max(lengths)]
    if n > TRAINING_WHOLE:
        forward = extrapolate_length({m: r[0] for m, r in runs.items()}, n)
        backward = extrapolate_length({m: r[1] for m, r in runs.items()}, n)
    records = []
    for name, launches, total_bytes in (("forward", forward, dram_bytes(c, "ours")),
                                        ("backward", backward, backward_bytes(c))):
        launches = scale(launches, factor)
        counters = summed(launches)
        records.append(dict(kernel="ours", case=c["case"], direction=name, counters=counters, launches=launches,
                            predicted_ms=predict(launches, total_bytes), device_bytes=device_bytes(counters),
                            minimal_bytes=total_bytes, max_abs_err=errors[name],
                            simulated=dict(batch=1, kv_heads=1, scale_factor=factor, query_blocks="all",
                                           lengths=list(lengths), chunks=chunks if name == "backward" else None)))
    return records


def extrapolate_check(fa, lib, c):
    """(whole, extrapolated) launches for ours and MLX on a case small enough to simulate whole."""
    small, factor = sampled(c, fa)
    result = {}
    for kernel, run in RUNNERS.items():
        _, whole = run(fa, lib, c, *inputs(c))
        part, _, _ = simulate(fa, lib, kernel, small, *inputs(small))
        result[kernel] = (whole, scale(part, factor))
    return result


# ------------------------------------------------------------------------------------------ calibration
# Published MLX measurement the model is checked against (PERFORMANCE.md, "Anchors"): Rapid-MLX PR #258, MLX SDPA
# causal, D=128, H=32, 4K tokens on M3 Ultra at 88% of a measured 17.4 TFLOPS matmul ceiling. The FLOP convention
# of that figure is not visible; with causal work counted (half of N^2) the achieved rate is 0.88 * 17.4 / 2.
CALIBRATION = dict(case=case("calibration: prefill 4k causal H32 D128 (M3 Ultra)", "prefill", 1, 32, 32, 128, 4096),
                   gpu="m3_ultra", tflops=0.88 * 17.4 / 2,
                   source="Rapid-MLX PR #258 (third party), as read in PERFORMANCE.md 'Anchors'; causal FLOP convention assumed")


def attention_flops(c):
    n, w = c["seqlen"], c["window"]
    visible = sum(min(i + 1, w) if w else i + 1 for i in range(n))
    return 4 * c["head_dim"] * c["heads"] * c["batch"] * visible


def calibrate(fa, lib, c=None):
    """MODEL vs measurement for MLX on the calibration case: predicted ms, measured ms, relative error."""
    c = c or CALIBRATION["case"]
    small, factor = sampled(c, fa)
    launches, _, _ = simulate(fa, lib, "mlx", small, *inputs(small))
    launches = scale(launches, factor)
    predicted = sum(cost_model.predict_ms(l["counters"], dram_bytes(c, "mlx"), CALIBRATION["gpu"]) for l in launches)
    measured = attention_flops(c) / (CALIBRATION["tflops"] * 1e12) * 1e3
    return dict(case=c["case"], gpu=CALIBRATION["gpu"], predicted_ms_model=predicted, measured_ms=measured,
                relative_error=predicted / measured - 1, source=CALIBRATION["source"])
