"""`benchmarks/run.py --profile --smoke`: the JSON's shape, MLX's outputs pass parity, and the extrapolation is
exact (a shape simulated whole equals its one-batch, one-KV-head slice scaled, with prefill query blocks summed
from the few column_plan simulates)."""
import json
import math

import pytest

from tests.helpers import SIMULATED

pytestmark = pytest.mark.skipif(not SIMULATED, reason="profiles exist only in the simulator build")


@pytest.fixture(scope="module")
def mlx_lib():
    from scripts.fetch_mlx_metal import FetchError
    from tests.mslsim.anchors import mlx
    try:
        return mlx.library()
    except FetchError as e:
        pytest.skip(f"MLX's Metal headers could not be fetched from PyPI (network unavailable?): {e}")


@pytest.fixture(scope="module")
def records(fa, mlx_lib, tmp_path_factory):
    from benchmarks.run import main
    out = tmp_path_factory.mktemp("profile")
    main(["--profile", "--smoke", "--out", str(out)])
    assert (out / "profile.png").exists()
    return json.loads((out / "profile.json").read_text())


def test_json_shape(records):
    from benchmarks.instrument import SMOKE_CASES
    assert [(r["kernel"], r["case"]) for r in records] == [(k, c["case"]) for c in SMOKE_CASES for k in ("ours", "mlx")]
    for r in records:
        assert set(r) >= {"kernel", "case", "shape", "counters", "predicted_ms", "max_abs_err", "device_bytes",
                          "minimal_bytes"}
        assert set(r["predicted_ms"]) == {"m3_max", "m4_max"}
        assert all(math.isfinite(v) and v > 0 for v in r["predicted_ms"].values())
        assert r["counters"]["fp32"] > 0 and r["counters"]["device_load_bytes"] > 0
        assert r["device_bytes"] == r["counters"]["device_load_bytes"] + r["counters"]["device_store_bytes"]
        # both read their parameters from `constant` arguments: constant-cache loads, not device bytes
        assert r["counters"]["constant_load_bytes"] > 0


def test_outputs_match_the_reference(records):
    # both within fp16 output rounding of the float64 reference (|out| < 4 here: half an fp16 ulp is <= 2^-10)
    assert all(r["max_abs_err"] < 2e-3 for r in records), [(r["kernel"], r["max_abs_err"]) for r in records]


# decode; prefill unaligned (query blocks simulated whole); prefill causal and window + sinks (query blocks
# extrapolated within the head: column_plan simulates blocks 0, 1 and the last of 8 for causal).
@pytest.mark.parametrize("kind, seqlen, head_dim, window", [("decode", 1100, 128, None), ("prefill", 100, 64, 32),
                                                            ("prefill", 256, 128, None), ("prefill", 320, 64, 64)])
def test_extrapolation_is_exact(fa, mlx_lib, kind, seqlen, head_dim, window):
    from benchmarks import instrument
    c = instrument.case("extrapolation", kind, 2, 4, 2, head_dim, seqlen, window=window, sinks=window is not None)
    for kernel, (whole, extrapolated) in instrument.extrapolate_check(fa, mlx_lib, c).items():
        assert [l["kernel"] for l in whole] == [l["kernel"] for l in extrapolated]
        for w, e in zip(whole, extrapolated):
            assert w["counters"].keys() == e["counters"].keys()
            for name, value in w["counters"].items():
                assert instrument.agrees(name, e["counters"][name], value), (kernel, name)


def test_column_plan_simulates_few_blocks():
    from benchmarks.instrument import column_plan
    plan, simulated = column_plan(8192, None, 32, 16)   # block 0 alone (first tile = diagonal), then one class
    assert simulated == [0, 1, 2, 255] and plan[100] == (1, 2)
    plan, simulated = column_plan(8192, 128, 32, 32)
    assert simulated == [0, 1, 2, 3, 4, 5, 255] and plan[100] == (4, 5)


def test_mlx_decode_pass1_routing():
    """MLX's gqa pass 1 is what the G = 8, 32k-key decode case compares against; G = 4 cases keep the generic one."""
    from benchmarks import instrument
    by_name = {c["case"]: c for c in instrument.CASES}
    assert instrument.mlx_pass1(by_name["decode B8 ctx32k Hq32/Hkv4 D128"]) == "sdpa_vector_2pass_1_gqa"
    assert instrument.mlx_pass1(by_name["decode B8 ctx8k Hq32/Hkv8 D128"]) == "sdpa_vector_2pass_1"


def test_registers_limit_residency(fa):
    """The cost model's register term: with an estimate, resident threadgroups are bounded by the register file;
    without one (decode), by threads alone. Our prefill's estimate stays within a thread's registers at every head
    dim (16-bit Q: at D = 256 fp32 Q and O alone would take 128; at 512 one simdgroup holds a quarter of them)."""
    from benchmarks import cost_model, instrument
    registers = 150
    assert cost_model.residency(128, 1024, registers) == cost_model.REGISTER_FILE_PER_CORE[0] // (4 * registers * 128) == 2
    assert cost_model.residency(128, 1024) == cost_model.MAX_THREADS_PER_CORE[0] // 128
    for D, DV in fa.FORWARD_HEAD_DIMS:   # wide heads: a quarter of Q and O per simdgroup (HEAD_PARTS)
        assert instrument.prefill_registers(fa, "ours", D, 2, DV) <= cost_model.MAX_REGISTERS_PER_THREAD[0], (D, DV)


def test_length_law_is_exact_and_checked():
    """Training cases past TRAINING_WHOLE: a quadratic counter is extrapolated exactly from the first three lengths;
    one off the law at the last length is refused."""
    from benchmarks import instrument
    law = lambda n: 3 * n * n + 2 * n + 7   # noqa: E731
    runs = {m: [dict(kernel="k", counters={"x": law(m), "threads_per_threadgroup": 128})]
            for m in instrument.LAW_LENGTHS}
    (launch,) = instrument.extrapolate_length(runs, 8192)
    assert launch["counters"] == {"x": law(8192), "threads_per_threadgroup": 128}
    runs[max(runs)][0]["counters"]["x"] += 1
    with pytest.raises(RuntimeError, match="off the quadratic law"):
        instrument.extrapolate_length(runs, 8192)


def test_saturation_is_the_hosts(fa):
    """The model's latency-hiding point is the one the backward's chunk count (backward.cpp) uses: both take params.h
    SATURATION_SIMDGROUPS, the model by reading the header, the op as compiled."""
    from benchmarks import cost_model
    assert cost_model.SATURATION_SIMDGROUPS[0] == fa._ops.ops.kernel_constants()["saturation_simdgroups"][0]
