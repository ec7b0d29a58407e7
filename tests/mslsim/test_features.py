"""Each simulator feature, executed as MSL and checked against numpy."""
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import mslsim
from tests.mslsim.numerics import mma_reference, round_to_bfloat16

KERNELS = Path(__file__).parent / "kernels"
PROJECT_SHADERS = Path(__file__).resolve().parents[2] / "metal-flash-sdpa"


@pytest.fixture(scope="module")
def features():
    return mslsim.load(KERNELS / "features.metal", include_dirs=[PROJECT_SHADERS / "common"])


@pytest.fixture(scope="module")
def mma():
    return mslsim.load(KERNELS / "mma.metal")


@pytest.mark.parametrize("threads", [32, 128, 1024])
@pytest.mark.parametrize("schedule", ["forward", "reverse", "random"])
def test_threadgroup_reduction(features, threads, schedule):
    rng = np.random.default_rng(threads)
    groups = 6
    x = rng.standard_normal(groups * threads).astype(np.float32)
    out = np.zeros(groups, np.float32)
    stats = features.dispatch("threadgroup_sum", groups, threads, {0: x, 1: out}, schedule=schedule, seed=3)
    # the same pairwise tree in float32
    partial = x.reshape(groups, threads).copy()
    stride = threads // 2
    while stride:
        partial[:, :stride] += partial[:, stride:2 * stride]
        stride //= 2
    np.testing.assert_array_equal(out, partial[:, 0])
    assert stats.threadgroups == groups
    assert stats.threadgroup_barriers == groups * threads * (1 + int(np.log2(threads)))
    assert stats.device_bytes_read[0] == x.nbytes and stats.device_bytes_written[1] == out.nbytes


def simd_reference(x, bits, active):
    """Expected outputs of simd_functions for one simdgroup whose first `active` lanes take part (shuffles run
    only in full simdgroups: their entries stay NaN otherwise)."""
    ref = np.full((len(x), 20), np.nan)
    xs, bs = x[:active].astype(np.float64), bits[:active]
    ref[:, 0], ref[:, 1], ref[:, 2], ref[:, 3] = xs.sum(), xs.prod(), xs.max(), xs.min()
    ref[:, 4] = np.bitwise_and.reduce(bs)
    ref[:, 5] = np.bitwise_or.reduce(bs)
    ref[:, 6] = np.bitwise_xor.reduce(bs)
    for lane in range(active):
        ref[lane, 7], ref[lane, 8] = xs[:lane + 1].sum(), xs[:lane].sum()
        ref[lane, 9], ref[lane, 10] = xs[:lane + 1].prod(), xs[:lane].prod()
        if active == 32:   # a source outside the simdgroup keeps the lane's own value
            for col, src in ((11, (lane * 7 + 3) % 32), (12, 5), (13, lane ^ 6), (14, lane + 3), (15, lane - 2)):
                ref[lane, col] = xs[src] if 0 <= src < 32 else xs[lane]
        ref[lane, 16] = xs[0]
        ref[lane, 17] = float((xs > -3).all()) + 2 * float((xs > 1.5).any())
        ref[lane, 18] = float(lane == 0)
        ref[lane, 19] = active
    return ref[:active]


@pytest.mark.parametrize("active", [32, 20, 6])
def test_every_simd_function(features, active):
    rng = np.random.default_rng(active)
    simdgroups = 3
    n = 32 * simdgroups
    x = rng.choice(np.array([0.5, 1.0, 2.0, -1.0, 0.25, 3.0], np.float32), n)  # exact sums and products
    bits = rng.integers(0, 1 << 20, n).astype(np.int32)
    out = np.full((n, 20), np.nan, np.float32)
    stats = features.dispatch("simd_functions", 1, n, {0: x, 1: bits, 2: out, 3: struct.pack("I", active)})
    for g in range(simdgroups):
        ref = simd_reference(x[32 * g:32 * g + 32], bits[32 * g:32 * g + 32], active)
        np.testing.assert_array_equal(out[32 * g:32 * g + active].astype(np.float64), ref)
        assert np.isnan(out[32 * g + active:32 * g + 32]).all()   # lanes that returned wrote nothing
    collectives_per_lane = 21 if active == 32 else 16
    assert stats.simd_collectives == simdgroups * active * collectives_per_lane


def test_simd_functions_in_divergent_code_reduce_the_active_lanes(features):
    out = np.zeros(32, np.float32)
    features.dispatch("divergent_reductions", 1, 32, {0: out})
    lane = np.arange(32)
    np.testing.assert_array_equal(out, np.where(lane < 12, lane[:12].sum(), 31) + 32000)


def test_threadgroup_declarator_list(features):
    out = np.zeros(64, np.float32)
    features.dispatch("declarator_list", 1, 64, {0: out})
    tid = np.arange(64, dtype=np.float32)
    np.testing.assert_array_equal(out, (63 - tid) + 2 * tid)


def test_struct_copies_are_traced(features):
    records = np.zeros((8, 7), np.float32)
    records[:, :6] = np.arange(48, dtype=np.float32).reshape(8, 6)
    records.view(np.int32)[:, 6] = np.arange(8)
    extra = np.zeros(7, np.float32)
    extra.view(np.int32)[6] = 100
    out = np.zeros_like(records)
    stats = features.dispatch("copy_records", 1, 8, {0: records, 1: extra, 2: out})
    np.testing.assert_array_equal(out[:, :6], records[:, :6])
    np.testing.assert_array_equal(out.view(np.int32)[:, 6], np.arange(8) + 100)
    assert stats.device_bytes_read[0] == records.nbytes and stats.device_bytes_written[2] == out.nbytes


@pytest.mark.parametrize("dtype", ["half", "bfloat", "float"])
def test_mul_add_chain_rounds_every_operation(features, dtype):
    rng = np.random.default_rng(0)
    n, steps = 4096, 24
    a = rng.uniform(-1.2, 1.2, n).astype(np.float32)
    b = rng.uniform(-1, 1, n).astype(np.float32)
    c = rng.uniform(-4, 4, n).astype(np.float32)
    if dtype == "half":
        a, b, c = (v.astype(np.float16) for v in (a, b, c))
        ref = c.copy()
        for _ in range(steps):
            ref = a * ref + b                       # numpy float16: each operation rounded to half
        got = c.copy()
    elif dtype == "bfloat":
        a, b, c = (round_to_bfloat16(v) for v in (a, b, c))
        ref = c.copy()
        for _ in range(steps):
            ref = round_to_bfloat16(round_to_bfloat16(a * ref) + b)
        # the simulator's bfloat buffers hold raw bfloat16 bits
        to_bits = lambda v: (v.view(np.uint32) >> 16).astype(np.uint16)
        a, b, got = to_bits(a), to_bits(b), to_bits(c)
    else:
        ref = c.copy()
        for _ in range(steps):
            ref = a * ref + b
        got = c.copy()
    features.dispatch(f"mul_add_chain_{dtype}", n // 256, 256, {0: a, 1: b, 2: got, 3: struct.pack("I", steps)})
    if dtype == "bfloat":
        got = (got.astype(np.uint32) << 16).view(np.float32)
        # the independent rounding agrees with torch's bfloat16 conversion on these values
        assert torch.equal(torch.from_numpy(ref).bfloat16().float(), torch.from_numpy(ref))
    np.testing.assert_array_equal(got, ref)


def test_conversions_round_to_nearest_even(features):
    specials = np.array([0.0, -0.0, 65504.0, 65520.0, 1e6, -1e6, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26,
                         1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, np.inf, -np.inf,
                         3.0e38, 1e-40], np.float32)
    x = np.concatenate([specials, np.random.default_rng(1).standard_normal(1024 - len(specials)).astype(np.float32)])
    h, bf = np.zeros(1024, np.float16), np.zeros(1024, np.uint16)
    features.dispatch("convert", 4, 256, {0: x, 1: h, 2: bf})
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(h, x.astype(np.float16))
    got_bf = (bf.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(got_bf, round_to_bfloat16(x))
    np.testing.assert_array_equal(got_bf, torch.from_numpy(x).bfloat16().float().numpy())


def test_function_constants_switch_code_paths(features):
    i = np.arange(64, dtype=np.float32)
    out = np.zeros(64, np.float32)
    features.dispatch("constant_paths", 1, 64, {0: out}, constants={0: True, 1: 3, 2: 0.5})
    np.testing.assert_array_equal(out, (i * i + 3) * 0.5)
    features.dispatch("constant_paths", 1, 64, {0: out}, constants={0: False, 1: -2, 2: 2.0, 3: True})
    np.testing.assert_array_equal(out, (-i - 2) * 2 + 0.5)
    features.dispatch("constant_paths", 1, 64, {0: out}, constants={0: False, 1: 0, 2: 1.0, 3: False})
    np.testing.assert_array_equal(out, -i)


def test_function_constant_types_are_checked(features):
    out = np.zeros(64, np.float32)
    with pytest.raises(TypeError, match="'use_square'.*bool"):
        features.dispatch("constant_paths", 1, 64, {0: out}, constants={0: 1, 1: 3, 2: 0.5})
    with pytest.raises(ValueError, match="function constant 9 is not declared"):
        features.dispatch("constant_paths", 1, 64, {0: out}, constants={9: True})


def test_work_counters(features):
    out = np.zeros(8 * 32, np.float32)
    stats = features.dispatch("count_work", 8, 32, {0: out})
    assert stats.counters == {"tiles_loaded": sum(range(1, 9)), "threadgroups_seen": 8}


def test_dynamic_threadgroup_memory_and_atomics(features):
    n = 96
    out = np.zeros(2 * n, np.float32)
    stats = features.dispatch("dynamic_and_atomics", 2, n, {0: out}, threadgroup_memory={0: n * 4})
    np.testing.assert_array_equal(out[0::2], np.full(n, 2.0 * (n - 1)))
    np.testing.assert_array_equal(out[1::2], np.full(n, n))
    assert stats.threadgroup_memory_peak >= n * 4 + 8


def test_two_workers_match_one(features):
    x = np.random.default_rng(5).standard_normal(64 * 128).astype(np.float32)
    one, two = np.zeros(64, np.float32), np.zeros(64, np.float32)
    s1 = features.dispatch("threadgroup_sum", 64, 128, {0: x, 1: one}, workers=1)
    s2 = features.dispatch("threadgroup_sum", 64, 128, {0: x, 1: two}, workers=2)
    np.testing.assert_array_equal(one, two)
    assert s1.threadgroups == s2.threadgroups == 64


def test_only_threadgroups_runs_a_subset(features, monkeypatch):
    x = np.random.default_rng(6).standard_normal(4 * 3 * 32).astype(np.float32)
    out = np.full(12, -1, np.float32)
    ids = mslsim.threadgroup_ids((4, 3), [1, 3])
    assert ids == [1, 3, 5, 7, 9, 11]
    # threadgroup_sum reads x by the threadgroup's x position only: a (12, 1) grid stands for (4, 3) here
    stats = features.dispatch("threadgroup_sum", 12, 32, {0: x, 1: out}, only_threadgroups=ids)
    assert stats.threadgroups == len(ids)
    np.testing.assert_allclose(out[ids], x.reshape(12, 32)[ids].sum(1), rtol=1e-5)
    assert (np.delete(out, ids) == -1).all()
    monkeypatch.setenv("MSLSIM_THREADGROUPS", "0,11")
    assert features.dispatch("threadgroup_sum", 12, 32, {0: x, 1: out}).threadgroups == 2
    monkeypatch.setenv("MSLSIM_THREADGROUPS", "12")
    with pytest.raises(mslsim.SimulationError, match="threadgroup id 12 selected; the grid"):
        features.dispatch("threadgroup_sum", 12, 32, {0: x, 1: out})


def test_fragment_ownership_matches_apple_layout(mma):
    out = np.zeros((8, 8), np.float32)
    mma.dispatch("fragment_owners", 1, 32, {0: out})
    for lane in range(32):  # MLX MMAFrag::get_coord, the layout Apple GPUs use
        q = lane // 4
        row, col = (q & 4) + (lane // 2) % 4, (q & 2) * 2 + (lane % 2) * 2
        assert out[row, col] == lane * 2 and out[row, col + 1] == lane * 2 + 1


@pytest.mark.parametrize("dtype", ["half", "bfloat", "float"])
def test_simdgroup_matrix_gemm_matches_exact_rounding(mma, dtype):
    M, N, K = 16, 64, 24
    rng = np.random.default_rng(7)
    A, B = rng.standard_normal((M, K)).astype(np.float32), rng.standard_normal((K, N)).astype(np.float32)
    if dtype == "half":
        A, B = A.astype(np.float16), B.astype(np.float16)
        a_buf, b_buf, c_buf = A, B, np.zeros((M, N), np.float16)
    elif dtype == "bfloat":
        A, B = round_to_bfloat16(A), round_to_bfloat16(B)
        a_buf, b_buf = ((v.view(np.uint32) >> 16).astype(np.uint16) for v in (A, B))
        c_buf = np.zeros((M, N), np.uint16)
    else:
        a_buf, b_buf, c_buf = A, B, np.zeros((M, N), np.float32)
    mma.dispatch(f"mma_gemm_{dtype}", (N // 32, M // 8), 128, {0: a_buf, 1: b_buf, 2: c_buf,
                                                               3: struct.pack("4I", M, N, K, 0)})
    got = (c_buf.astype(np.uint32) << 16).view(np.float32) if dtype == "bfloat" else c_buf.astype(np.float32)
    ref = mma_reference(A.astype(np.float32), B.astype(np.float32), dtype)
    np.testing.assert_array_equal(got.astype(np.float64), ref)
    assert np.abs(ref - A.astype(np.float64) @ B.astype(np.float64)).max() < {"half": 0.05, "bfloat": 0.3, "float": 1e-5}[dtype]


def test_aliasing_buffers_share_memory(features):
    """Two bindings of one array (as views of one MTLBuffer would be) see one copy, not two."""
    rng = np.random.default_rng(9)
    a = rng.uniform(-1, 1, 512).astype(np.float32)
    b = rng.uniform(-1, 1, 512).astype(np.float32)
    expected = a.copy()
    for _ in range(3):
        expected = a * expected + b
    features.dispatch("mul_add_chain_float", 2, 256, {0: a, 1: b, 2: a, 3: struct.pack("I", 3)})
    np.testing.assert_array_equal(a, expected)


@pytest.mark.parametrize("use_big_tiles", [True, False])
@pytest.mark.parametrize("has_bias", [True, False])
def test_atomics_ballots_rotations_and_function_constant_arguments(features, has_bias, use_big_tiles):
    n = 64
    total, counter, out = np.zeros(1, np.float32), np.zeros(1, np.uint32), np.zeros((n, 5), np.float32)
    bias = np.arange(n, dtype=np.float32)
    buffers = {0: total, 1: counter, 2: out, **({3: bias} if has_bias else {})}   # no buffer 3 when absent
    features.dispatch("more_features", 1, n, buffers, constants={10: has_bias, 11: use_big_tiles})
    lane = np.arange(n) % 32
    assert total[0] == 1.5 * n and counter[0] == 2 * n
    assert (out[:, 0] == sum(1 << i for i in range(0, 32, 3))).all()
    np.testing.assert_array_equal(out[:, 1], (lane + 5) % 32)
    np.testing.assert_array_equal(out[:, 2], (lane - 5) % 32)
    np.testing.assert_array_equal(out[:, 3], (bias if has_bias else 0) + (32 if use_big_tiles else 16))
    assert (out[:, 4] == 0.5 * n).all()


def test_derived_constant_needs_its_function_constant(features):
    with pytest.raises(mslsim.SimulationError, match="function constant 'use_big_tiles' is used but no value was set"):
        features.dispatch("more_features", 1, 32, {0: np.zeros(1, np.float32), 1: np.zeros(1, np.uint32),
                                                   2: np.zeros(32 * 5, np.float32)}, constants={10: False})
    with pytest.raises(mslsim.SimulationError, match=r"no buffer was bound at index 3"):
        features.dispatch("more_features", 1, 32, {0: np.zeros(1, np.float32), 1: np.zeros(1, np.uint32),
                                                   2: np.zeros(32 * 5, np.float32)}, constants={10: True, 11: True})
