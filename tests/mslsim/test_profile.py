"""Profile counters (dispatch(..., profile=True)) on kernels whose counts are known by hand."""
import re
import struct
from pathlib import Path

import numpy as np
import pytest

import mslsim
from mslsim import ir_mix

KERNELS = Path(__file__).parent / "kernels"


@pytest.fixture(scope="module")
def lib():
    return mslsim.load(KERNELS / "profile.metal")


def nonzero(profile):
    return {k: v for k, v in profile.items() if v}


def test_arithmetic_classes(lib):
    inputs = struct.pack("<4fe6xQQii", 1.0, 2.0, 3.0, 4.0, 1.5, 3, 5, 7, 2)
    out = np.zeros(6, np.float32)
    stats = lib.dispatch("arithmetic", 1, 1, {0: inputs, 1: out}, profile=True)
    np.testing.assert_allclose(out, [2.0, 0.5, 2.25, 15.0, 3.0, 3.0], rtol=1e-5)
    arithmetic = {k: v for k, v in nonzero(stats.profile).items() if k in ir_mix.CLASSES}
    # one of each line's operation; the select of c or d is one variable address offset (int64_add)
    assert arithmetic == {"transcendental": 1, "fp32": 1, "fp16": 1, "int64_mul": 1, "int_div": 1, "convert": 3,
                          "compare_select": 2, "int64_add": 1}
    assert stats.profile["device_load_2"] == 1 and stats.profile["device_load_8"] == 2   # h; l and m
    assert stats.profile["device_store_4"] == 6 and stats.profile["device_store_bytes"] == 24


def test_division_by_a_constant_is_a_multiply(lib):
    inputs = struct.pack("<4fe6xQQii", 1.0, 2.0, 3.0, 4.0, 1.5, 95, 5, 100, 41)
    out = np.zeros(3, np.float32)
    stats = lib.dispatch("constant_divisors", 1, 1, {0: inputs, 1: out}, profile=True)
    np.testing.assert_array_equal(out, [100 // 7, 41 % 18, 95 // 10])
    arithmetic = {k: v for k, v in nonzero(stats.profile).items() if k in ir_mix.CLASSES}
    assert arithmetic.get("int_div", 0) == 0 and arithmetic["int32_mul"] >= 2 and arithmetic["int64_mul"] >= 1


def test_memory_matrix_simd_and_barriers(lib):
    a, c = np.arange(64, dtype=np.float32), np.zeros(65, np.float32)
    stats = lib.dispatch("matrix", 1, 32, {0: a, 1: c}, profile=True)
    p = stats.profile
    per_thread = {"device_load_4": 3, "threadgroup_store_4": 2, "matrix_load_threadgroup": 1, "matrix_store_device": 1,
                  "matrix_multiply_accumulate": 1, "simd_function": 1, "threadgroup_barrier": 1}
    assert {k: p[k] for k in per_thread} == {k: 32 * n for k, n in per_thread.items()}
    assert p["device_store_4"] == 1                            # lane 0 only
    assert p["threadgroup_load_4"] == 0                        # the matrix load's element reads are not plain loads
    assert p["device_load_bytes"] == 3 * 32 * 4 and p["threadgroup_store_bytes"] == 64 * 4
    assert (p["threadgroups"], p["threads_per_threadgroup"], p["threadgroup_memory"]) == (1, 32, 256)
    m = a.reshape(8, 8)
    np.testing.assert_allclose(c[:64].reshape(8, 8), m @ m + m, rtol=1e-6)


@pytest.mark.parametrize("kernel", ["affine_constant", "affine_device"])
def test_constant_arguments_count_as_constant_loads(lib, kernel):
    """Per lane: x[lane] (4 B, device), p.scale (4 B), p.shift (8 B) and bias (4 B, a conditional argument) from
    the parameter buffers: constant loads when they are `constant` arguments, device loads when `const device`."""
    x, out = np.arange(32, dtype=np.float32), np.zeros(32, np.float32)
    params, bias = struct.pack("<fiQ", 0.5, 0, 3), struct.pack("<f", 0.25)
    stats = lib.dispatch(kernel, 1, 32, {0: x, 1: params, 2: out, 3: bias}, constants={0: True}, profile=True)
    np.testing.assert_array_equal(out, x * 0.5 + 3.25)
    params_loads = {"load_4": 2 * 32, "load_8": 32, "load_bytes": 16 * 32}
    space = "constant" if kernel == "affine_constant" else "device"
    expected = {f"{space}_{k}": v for k, v in params_loads.items()}
    for k, v in {"device_load_4": 32, "device_load_bytes": 4 * 32}.items():
        expected[k] = expected.get(k, 0) + v
    memory = {k: v for k, v in nonzero(stats.profile).items() if k.startswith(("device_load", "constant_load"))}
    assert memory == expected
    assert stats.profile["device_store_4"] == 32 and stats.profile["device_store_bytes"] == 4 * 32
    # the per-buffer byte counts do not depend on the address space
    assert stats.device_bytes_read == {0: 4 * 32, 1: 12 * 32, 2: 0, 3: 4 * 32}


def test_profile_is_opt_in(lib):
    a, c = np.arange(64, dtype=np.float32), np.zeros(65, np.float32)
    assert lib.dispatch("matrix", 1, 32, {0: a, 1: c}).profile == {}
    # GPU numerics run the twin that counts (build.py): it reports nothing unless asked, and computes what the
    # profiled launch computes.
    gpu = np.zeros(65, np.float32)
    assert lib.dispatch("matrix", 1, 32, {0: a, 1: gpu}, gpu_numerics=True).profile == {}
    profiled = np.zeros(65, np.float32)
    assert lib.dispatch("matrix", 1, 32, {0: a, 1: profiled}, profile=True).profile["matrix_multiply_accumulate"] > 0
    np.testing.assert_array_equal(gpu, profiled)


def test_classes_come_from_the_runtime_header(lib):
    names = lib.profile_counters
    assert names[-len(ir_mix.CLASSES):] == ir_mix.CLASSES


def arithmetic(profile):
    return {k: v for k, v in nonzero(profile).items() if k in ir_mix.CLASSES}


def test_vector_constructor_conversions_count_as_scalar_casts(lib):
    x = np.arange(64, dtype=np.float16).reshape(32, 2)
    counts = {}
    for kernel in ("vector_convert", "scalar_convert"):
        out = np.zeros((32, 2), np.float32)
        counts[kernel] = arithmetic(lib.dispatch(kernel, 1, 32, {0: x, 1: out}, profile=True).profile)
        np.testing.assert_array_equal(out, x.astype(np.float32))
    # the same instructions either way: two converts a lane, and the same address arithmetic of x[lane], out[lane]
    assert counts["vector_convert"] == counts["scalar_convert"] and counts["vector_convert"]["convert"] == 2 * 32
    copy = np.zeros((32, 4), np.float16)
    stats = lib.dispatch("vector_copy", 1, 32, {0: x, 1: copy}, profile=True)
    np.testing.assert_array_equal(copy, np.concatenate([x, x[:, ::-1]], axis=1))
    assert "convert" not in arithmetic(stats.profile)


def test_matrix_conversions_inside_the_shim_are_free(lib):
    a, c = (np.arange(64) % 7).astype(np.float16), np.zeros(64, np.float32)
    stats = lib.dispatch("half_matrix", 1, 32, {0: a, 1: c}, profile=True)
    m = a.astype(np.float64).reshape(8, 8)
    np.testing.assert_array_equal(c.reshape(8, 8), m @ m)
    assert stats.profile["matrix_multiply_accumulate"] == 32
    assert "convert" not in arithmetic(stats.profile)


# (kernel, element dtype, elements, reference on float64 a, b, c, expected arithmetic for one thread)
MATH_FUNCTIONS = [
    ("max_float", np.float32, 1, lambda a, b, c: np.maximum(a, b), {"compare_select": 1}),
    ("max_float4", np.float32, 4, lambda a, b, c: np.maximum(a, b), {"compare_select": 4}),
    ("max_float4_scalar", np.float32, 4, lambda a, b, c: np.maximum(a, b[0]), {"compare_select": 4}),
    ("fast_max_float4", np.float32, 4, lambda a, b, c: np.maximum(a, b), {"compare_select": 4}),
    ("min_int4", np.int32, 4, lambda a, b, c: np.minimum(a, b), {"compare_select": 4}),
    ("fmin_half", np.float16, 1, lambda a, b, c: np.minimum(a, b), {"compare_select": 1}),
    ("fma_float", np.float32, 1, lambda a, b, c: a * b + c, {"fp32": 1}),
    ("fma_float4", np.float32, 4, lambda a, b, c: a * b + c, {"fp32": 4}),
    ("fma_half4", np.float16, 4, lambda a, b, c: a * b + c, {"fp16": 4}),
    ("clamp_float", np.float32, 1, lambda a, b, c: np.minimum(np.maximum(a, b), c), {"compare_select": 2}),
    ("clamp_float4", np.float32, 4, lambda a, b, c: np.minimum(np.maximum(a, b), c), {"compare_select": 8}),
    ("abs_float4", np.float32, 4, lambda a, b, c: np.abs(a), {"fp32": 4}),
    ("abs_int", np.int32, 1, lambda a, b, c: np.abs(a), {"compare_select": 1}),
    ("saturate_float", np.float32, 1, lambda a, b, c: np.clip(a, 0, 1), {"compare_select": 2}),
    ("floor_half", np.float16, 1, lambda a, b, c: np.floor(a), {"fp16": 1}),
    ("mix_float", np.float32, 1, lambda a, b, c: a + (b - a) * c, {"fp32": 2}),   # a sub and a contracted FMA
    ("sign_float", np.float32, 1, lambda a, b, c: np.sign(a), {"compare_select": 2}),
    ("divide_float", np.float32, 1, lambda a, b, c: a / b, {"fp32": 1}),
    ("fast_divide_float4", np.float32, 4, lambda a, b, c: a / b, {"fp32": 4}),
    ("precise_divide_float", np.float32, 1, lambda a, b, c: a / b, {"fp32": 1}),
    ("precise_divide_half4", np.float16, 4, lambda a, b, c: a / b, {"fp16": 4}),
]


@pytest.mark.parametrize("kernel, dtype, n, reference, expected", MATH_FUNCTIONS, ids=[m[0] for m in MATH_FUNCTIONS])
def test_math_functions_count_as_the_kernels_arithmetic(lib, kernel, dtype, n, reference, expected):
    """One call from kernel code costs what an Apple GPU executes per element (ir_mix's math_functions.h rule)."""
    v = np.array([[-1.5, 0.25, 3.0, -0.0], [0.5, 2.0, -4.0, 0.75], [0.125, 1.0, 2.5, -2.0]])[:, :n]
    if dtype == np.int32:
        v = (v * 4).astype(np.int32)
    v = v.astype(dtype)
    out = np.zeros(n, dtype)
    stats = lib.dispatch(kernel, 1, 1, {0: v, 1: out}, profile=True)
    np.testing.assert_array_equal(out, reference(*v.astype(np.float64)).astype(dtype))
    assert arithmetic(stats.profile) == expected


def test_math_functions_inside_the_shim_are_free(lib):
    v, profiles = np.arange(32, dtype=np.float32)[::-1].copy(), {}
    for kernel, expected in (("simd_max_lanes", 31.0), ("simd_sum_lanes", 496.0)):
        out = np.zeros(32, np.float32)
        profiles[kernel] = lib.dispatch(kernel, 1, 32, {0: v, 1: out}, profile=True).profile
        np.testing.assert_array_equal(out, np.full(32, expected))
        assert profiles[kernel]["simd_function"] == 32
    # the reduction's 31 max calls a lane would be 31 x 32 compare_selects if they were counted
    assert arithmetic(profiles["simd_max_lanes"]) == arithmetic(profiles["simd_sum_lanes"])


# Contraction: a (contract) multiply with one use, an add or subtract in its block, is one FMA (ir_mix's rule).
E = 2.0 ** -12
A, C = 1 + E, -(1 + 2 * E)   # A * A + C: 0 with the product rounded (ties to even), 2^-24 fused


def fused(a, b, c):
    """One rounding of a * b + c (float32 operands: the product and the sum are exact in float64 here)."""
    return (np.float64(a) * np.float64(b) + np.float64(c)).astype(np.float32)


def unfused(a, b, c):
    return (np.float32(a) * np.float32(b)).astype(np.float32) + np.float32(c)


def run_twins(lib, kernel, buffers, outputs):
    """(exact twin's outputs, profiled GPU twin's outputs, its arithmetic) of one thread."""
    results = []
    for profile in (False, True):
        outs = {i: np.zeros_like(o) for i, o in outputs.items()}
        stats = lib.dispatch(kernel, 1, 1, {**buffers, **outs}, profile=profile)
        results.append(outs)
    return results[0], results[1], arithmetic(stats.profile)


def test_contracted_multiply_add_is_one_fma(lib):
    v = np.array([A, A, C, -C, A, A, A, A, -C], np.float32)
    exact, gpu, counts = run_twins(lib, "fma_pairs", {0: v}, {1: np.zeros(3, np.float32)})
    np.testing.assert_array_equal(gpu[1], [2.0 ** -24, -2.0 ** -24, 2.0 ** -24])   # fused, as the count says
    np.testing.assert_array_equal(exact[1], [0, 0, 0])                              # the exact twin does not fuse
    assert counts == {"fp32": 3}                                                    # three FMAs (was 6)


def test_contracted_vector_multiply_add_counts_per_element(lib):
    v = np.array([[A] * 4, [A] * 4, [C, C, 0.5, -1.0]], np.float32)
    h = np.array([[1 + 2 ** -6] * 4, [1 + 2 ** -6] * 4, [-(1 + 2 ** -5)] * 4], np.float16)
    exact, gpu, counts = run_twins(lib, "fma_vectors", {0: v, 1: h}, {2: np.zeros(4, np.float32),
                                                                      3: np.zeros(4, np.float16)})
    np.testing.assert_array_equal(gpu[2], fused(*v))
    np.testing.assert_array_equal(exact[2], unfused(*v))
    assert gpu[2][0] != exact[2][0]
    # half: 2^-12 fused; x86 has no half FMA, so even the GPU twin computes it unfused (0), yet an Apple GPU fuses
    # it (FFMA16) and it counts as such
    np.testing.assert_array_equal(exact[3], [0, 0, 0, 0])
    assert counts == {"fp32": 4, "fp16": 4}                                         # 4 FMAs of each (was 8)


def test_accumulating_loop_is_one_fma_an_iteration(lib):
    rng = np.random.default_rng(3)
    n = 64
    a = rng.uniform(0.5, 1, n).astype(np.float32)
    # 12 bits and alternating signs: |acc| stays small, and every fused sum is exact in float64 (< 2^3, lsb 2^-36)
    b = (rng.integers(2048, 4096, n) / 4096 * np.where(np.arange(n) % 2, -1, 1)).astype(np.float32)
    references = {}
    for name, step in (("fused", fused), ("unfused", unfused)):
        acc = np.float32(0)
        for i in range(n):
            acc = step(a[i], b[i], acc)
        references[name] = acc
    assert references["fused"] != references["unfused"]
    exact, gpu, counts = run_twins(lib, "fma_loop", {0: a, 1: b, 3: struct.pack("<I", n)},
                                   {2: np.zeros(1, np.float32)})
    assert gpu[2][0] == references["fused"] and exact[2][0] == references["unfused"]
    assert counts["fp32"] == n                                                       # (was 2 n)


def test_a_product_used_twice_is_not_fused(lib):
    v = np.array([A, A, C, C], np.float32)
    exact, gpu, counts = run_twins(lib, "shared_product", {0: v}, {1: np.zeros(2, np.float32)})
    np.testing.assert_array_equal(gpu[1], [0, 0])   # unfused in the GPU twin as well
    np.testing.assert_array_equal(exact[1], [0, 0])
    assert counts == {"fp32": 3}                     # a multiply and two adds


def test_a_product_hoisted_out_of_its_loop_is_not_fused(lib):
    """The add's multiply is in another block (executed once, not every iteration): the backend cannot fuse them,
    and the add counts every iteration."""
    n = 16
    v = np.array([A, A, C], np.float32)
    exact, gpu, counts = run_twins(lib, "invariant_product_loop", {0: v, 2: struct.pack("<I", n)},
                                   {1: np.zeros(1, np.float32)})
    acc = v[2]
    for _ in range(n):
        acc = unfused(v[0], v[1], acc)
    assert gpu[1][0] == acc and exact[1][0] == acc
    assert counts["fp32"] == 1 + n


def test_unlocated_instructions_of_the_shim_are_free():
    """An instruction without a debug location (hoisted or merged by the optimiser) counts as kernel code unless it is
    the shim's: every use shim code and every operand a value of shim code, directly or through other unlocated
    instructions (ir_mix's docstring)."""
    shim = ir_mix.INCLUDE_DIR / "mslsim"
    ir = "\n".join([
        "define void @k(ptr %p, i32 %i) !dbg !10 {",
        "entry:",
        "  %s = add i32 %i, 1, !dbg !20",                             # shim code (a lane's element index): free
        "  %a = sext i32 %s to i64",                                  # from and for the shim (through %b): free
        "  %b = or disjoint i64 %a, 8",                               # free
        "  %g = getelementptr float, ptr %p, i64 %b, !dbg !20",       # shim code: free
        "  %k = add i32 %i, 2, !dbg !21",                             # kernel code: int32_add 1
        "  %f = sext i32 %k to i64",                                  # a kernel value for the shim: int64_add 1
        "  %w = getelementptr float, ptr %p, i64 %f, !dbg !20",
        "  %c = sext i32 %s to i64",                                  # kernel code uses it: 1
        "  %h = getelementptr float, ptr %p, i64 %c, !dbg !21",       # kernel code: 1
        "  %d = sext i32 %s to i64",                                  # shim and kernel code use it: 1
        "  %u = getelementptr float, ptr %p, i64 %d, !dbg !20",
        "  %v = getelementptr float, ptr %p, i64 %d, !dbg !21",       # 1
        "  %e = sext i32 %s to i64",                                  # unused: kernel code, 1
        "  store float 0.0, ptr %g, !dbg !20",
        "  store float 0.0, ptr %w, !dbg !20",
        "  ret void",
        "}",
        '!1 = !DIFile(filename: "kernel.metal", directory: "/k")',
        f'!2 = !DIFile(filename: "shim.h", directory: "{shim}")',
        '!10 = distinct !DISubprogram(name: "k", scope: !1, file: !1, line: 1)',
        '!11 = distinct !DISubprogram(name: "s", scope: !2, file: !2, line: 1)',
        "!20 = !DILocation(line: 5, column: 1, scope: !11)",
        "!21 = !DILocation(line: 7, column: 1, scope: !10)",
    ])
    mixes = re.findall(r"@mslsim_mix\.\d+ = private unnamed_addr constant \[\d+ x i32\] \[(.*)\]", ir_mix.instrument(ir))
    assert len(mixes) == 1
    counts = [int(value.split()[1]) for value in mixes[0].split(", ")]
    assert {c: n for c, n in zip(ir_mix.CLASSES, counts) if n} == {"int32_add": 1, "int64_add": 6}
