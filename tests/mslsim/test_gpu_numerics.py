"""GPU numerics (each kernel's twin compiled like Apple's default fast math): contraction and fast-math error
bounds are in effect, and a sample of the parity suites still passes with them; the tolerance margin each
case leaves is printed (pytest -s) in both modes."""
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import mslsim
import tests.reference
from tests import test_decode, test_prefill

KERNELS = Path(__file__).parent / "kernels"
PROJECT_SHADERS = Path(__file__).resolve().parents[2] / "metal-flash-sdpa"


@pytest.fixture(scope="module")
def features():
    return mslsim.load(KERNELS / "features.metal", include_dirs=[PROJECT_SHADERS / "common"])


def probe(features, a, b, c, gpu_numerics):
    out = np.zeros((len(a), 6), np.float32)
    features.dispatch("numerics_probe", len(a) // 64, 64, {0: a, 1: b, 2: c, 3: out}, gpu_numerics=gpu_numerics)
    return out


def test_contraction_and_fast_math_bounds(features):
    rng = np.random.default_rng(0)
    n = 4096
    a = rng.uniform(-10, 10, n).astype(np.float32)
    b = rng.uniform(0.1, 4, n).astype(np.float32)
    c = rng.uniform(-1, 1, n).astype(np.float32)
    a[0], b[0], c[0] = 1 + 2.0 ** -12, 1 + 2.0 ** -12, -(1 + 2.0 ** -11)   # a*b+c: 0 unfused, 2^-24 fused
    exact, gpu = probe(features, a, b, c, False), probe(features, a, b, c, True)
    assert exact[0, 0] == 0 and gpu[0, 0] == 2.0 ** -24
    fused = (a.astype(np.float64) * b + c).astype(np.float32)   # one rounding (exact product in float64)
    assert (gpu[:, 0] == fused).mean() > 0.999 and (exact[:, 0] == a * b + c).all()
    ulp = lambda x: np.spacing(np.abs(x).astype(np.float32)).astype(np.float64)   # noqa: E731
    exp_ulps = 3 + np.floor(np.abs(2 * a))
    refs = {1: np.exp(a.astype(np.float64)), 2: np.exp2(a.astype(np.float64)), 4: np.log(b.astype(np.float64))}
    bounds = {1: exp_ulps * ulp(refs[1]), 2: exp_ulps * ulp(refs[2]),
              4: np.where((b >= 0.5) & (b <= 2), 2.0 ** -21, 3 * ulp(refs[4]))}
    for col, ref in refs.items():
        err = np.abs(gpu[:, col] - ref)
        assert (err <= bounds[col] + ulp(ref)).all(), col          # within the bound (plus libm's own error)
        assert (err > ulp(ref)).mean() > 0.9, col                  # and at it, not libm-exact
        assert (np.abs(exact[:, col] - ref) <= ulp(ref)).all(), col
    np.testing.assert_array_equal(gpu[:, 3], exact[:, 3])   # precise:: stays accurate
    np.testing.assert_array_equal(gpu[:, 5], exact[:, 5])


def test_precise_divide_is_ieee_under_fast_math(features):
    """`/` may be a reciprocal multiply under GPU numerics (as Apple's fast math); precise::divide stays correctly
    rounded in both twins (what the KV quantization relies on to match mlx.core.quantize on a Mac: before it,
    quantize_kv in the GPU twin differed from the exact twin in 53 of 65,536 4-bit words of N(0, 1) rows;
    test_quantize_matches_mlx[gpu] covers that)."""
    rng = np.random.default_rng(1)
    n = 4096
    a, c = (rng.uniform(-10, 10, n).astype(np.float32) for _ in range(2))
    b = rng.uniform(0.1, 4, n).astype(np.float32)
    ieee = lambda x: (x.astype(np.float64) / b).astype(np.float32)   # noqa: E731  (correctly rounded)
    for gpu in (False, True):
        out = np.zeros((n, 4), np.float32)
        features.dispatch("division_probe", n // 64, 64, {0: a, 1: b, 2: c, 3: out}, gpu_numerics=gpu)
        np.testing.assert_array_equal(out[:, 2], ieee(a))
        np.testing.assert_array_equal(out[:, 3], ieee(c))
        if not gpu:   # the exact twin's `/` is IEEE too (the GPU twin's may be a reciprocal multiply)
            np.testing.assert_array_equal(out[:, 0], ieee(a))


# A sample of the parity suites: (test function, arguments), run in both modes through the torch ops.
PARITY_SAMPLE = [
    (test_prefill.test_dtypes_and_head_dims, dict(dtype=torch.float32, D=64)),
    (test_prefill.test_dtypes_and_head_dims, dict(dtype=torch.float16, D=128)),
    (test_prefill.test_dtypes_and_head_dims, dict(dtype=torch.bfloat16, D=256)),
    (test_prefill.test_masks_on_a_ragged_batch, dict(causal=True, window=(127, 0))),
    (test_prefill.test_sinks_and_softcap, dict(feature="sinks+softcap", causal=False, window=(64, 64))),
    (test_decode.test_ragged_batch_matrix, dict(dtype=torch.float32, H=8, Hkv=1, block_size=16)),
    (test_decode.test_sinks_and_softcap, dict(feature="sinks+softcap+window")),
    (test_decode.test_other_head_dims, dict(D=96)),
]


@pytest.mark.parametrize("case, kwargs", PARITY_SAMPLE,
                         ids=[f"{f.__module__.split('.')[-1]}.{f.__name__}[{','.join(map(str, kw.values()))}]"
                              for f, kw in PARITY_SAMPLE])
def test_parity_sample_passes_with_gpu_numerics(fa, monkeypatch, record_property, case, kwargs):
    checks = []   # (kernel error, allowed error) of every reference comparison the case makes

    def recording(*args, **kw):
        err, baseline = tests.reference.assert_matches_reference(*args, **kw)
        checks.append((err, 2 * baseline + 1e-5))
        return err, baseline

    for module in (test_prefill, test_decode):
        monkeypatch.setattr(module, "assert_matches_reference", recording)
    margins = {}
    for mode in ("0", "1"):   # read by the runtime at every launch
        monkeypatch.setenv("MSLSIM_GPU_NUMERICS", mode)
        checks.clear()
        case(fa, **kwargs)
        margins[mode] = max(err / allowed for err, allowed in checks)
    record_property("report", f"{case.__name__}{kwargs}: error / allowed = {margins['0']:.3f} exact, "
                              f"{margins['1']:.3f} GPU numerics")
    assert margins["1"] <= 1.0
