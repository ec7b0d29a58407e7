"""Simulator throughput: 64 threadgroups x 128 threads, 1 M fp32 FMAs per threadgroup, 8 barrier rounds."""
import struct
import time
from pathlib import Path

import numpy as np

import mslsim

KERNELS = Path(__file__).parent / "kernels"


def reference(threads, groups, phases, fmas):
    tid = np.arange(threads, dtype=np.float32)
    out = np.zeros((groups, threads), np.float32)
    for tg in range(groups):
        acc = tid * np.float32(1e-3)
        a, b = np.float32(0.999), np.float32(1e-4) * np.float32(tg + 1)
        for _ in range(phases):
            for _ in range(fmas):
                acc = (acc.astype(np.float64) * a + b).astype(np.float32)   # exact fp32 fma
            acc = np.float32(0.5) * (acc + np.roll(acc, -1))
        out[tg] = acc
    return out


def test_million_fmas_per_threadgroup_in_a_few_seconds():
    lib = mslsim.load(KERNELS / "speed.metal")
    threads, groups, phases = 128, 64, 8
    fmas = (1 << 20) // threads // phases           # 1 M FMAs per threadgroup
    out = np.zeros(groups * threads, np.float32)
    start = time.perf_counter()
    stats = lib.dispatch("fma_phases", groups, threads, {0: out, 1: struct.pack("2I", phases, fmas)})
    elapsed = time.perf_counter() - start
    print(f"\n64 threadgroups x 128 threads, 1 M FMAs + 16 barriers per threadgroup: {elapsed:.2f} s")
    assert stats.threadgroup_barriers == groups * threads * 2 * phases
    np.testing.assert_array_equal(out.reshape(groups, threads)[:2], reference(threads, 2, phases, fmas))
    assert elapsed < 10.0
