"""The benchmark harness runs (smoke configuration) and its counters prove the work story; memory grows O(n)."""
import json

import pytest

from tests.helpers import SIMULATED

pytestmark = pytest.mark.skipif(not SIMULATED, reason="the work counters exist only in the simulator build")


@pytest.fixture(scope="module")
def results(fa, tmp_path_factory):
    from benchmarks.run import main
    out = tmp_path_factory.mktemp("bench")
    results = main(["--smoke", "--out", str(out)])
    results["out"] = out
    return results


def test_prefill_tiles_equal_the_band(results):
    rows = [r for r in results["work"] if r["kind"] == "prefill"]
    assert rows and all(r["k_tiles"] == r["band_tiles"] for r in rows)   # ratio 1.00
    windowed = [r for r in rows if r["window"]]
    assert all(r["k_tiles"] < r["full_causal_tiles"] for r in windowed if r["tokens"] > 256)


def test_decode_partitions_and_bytes(results):
    rows = [r for r in results["work"] if r["kind"] == "decode"]
    assert rows and all(r["partitions_computed"] == r["partitions_intersecting"] for r in rows)
    assert any(r["partitions_skipped"] > 0 for r in rows)
    assert all(r["bytes_ratio"] <= 1.05 for r in rows)


def test_memory_is_linear_for_us_and_quadratic_for_eager(results):
    small, large = results["memory"][0], results["memory"][-1]
    growth = large["tokens"] / small["tokens"]
    assert large["ours_bytes"] / small["ours_bytes"] <= growth * 1.01
    assert large["eager_bytes"] / small["eager_bytes"] >= growth ** 2 * 0.9


def test_outputs_written(results):
    out = results["out"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["simulated"] is True and saved["timing"]   # smoke timing ran, labelled simulated
    quantized = [r for r in saved["timing"] if r["kind"] == "quantized_decode"]
    assert {(r["bits"], r["layout"]) for r in quantized} == {(8, "paged"), (8, "contiguous"), (4, "paged"),
                                                             (4, "contiguous")}
    assert all(isinstance(r["ms"], float) and r["ratio_to_fp16"] > 0 for r in quantized)   # ran, no failure string
    for name in ["work.png", "memory.png"]:
        assert (out / name).stat().st_size > 10_000
