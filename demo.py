"""Main job: run Metal shaders on this Linux machine through the mslsim simulator and check them
against numpy. (Becomes the sliding-window + sinks attention demo once the attention kernels land.)"""
import struct
import time
from pathlib import Path

import numpy as np

import mslsim

ROOT = Path(__file__).resolve().parent
KERNELS = ROOT / "tests" / "mslsim" / "kernels"


def main():
    rng = np.random.default_rng(0)
    print("mslsim: Metal compute kernels executed on the CPU (simulated; no Apple GPU involved)\n")

    mma = mslsim.load(KERNELS / "mma.metal")
    M, N, K = 32, 64, 64
    A = rng.standard_normal((M, K)).astype(np.float32)
    B = rng.standard_normal((K, N)).astype(np.float32)
    C = np.zeros((M, N), np.float32)
    t = time.perf_counter()
    stats = mma.dispatch("mma_gemm_float", (N // 32, M // 8), 128, {0: A, 1: B, 2: C, 3: struct.pack("4I", M, N, K, 0)})
    ms = (time.perf_counter() - t) * 1e3
    gemm_err = np.abs(C - A.astype(np.float64) @ B.astype(np.float64)).max()
    print(f"simdgroup_matrix GEMM {M}x{N}x{K} fp32: max |C - numpy float64| = {gemm_err:.2e}  "
          f"({stats.threadgroups} threadgroups, {stats.simd_collectives} SIMD collectives, {ms:.0f} ms)")

    features = mslsim.load(KERNELS / "features.metal", include_dirs=[ROOT / "metal-flash-sdpa"])
    x = rng.standard_normal(64 * 256).astype(np.float32)
    out = np.zeros(64, np.float32)
    stats = features.dispatch("threadgroup_sum", 64, 256, {0: x, 1: out})
    err = np.abs(out - x.reshape(64, 256).astype(np.float64).sum(1)).max()
    print(f"threadgroup reduction 64 x 256: max |sum - numpy float64| = {err:.2e}  "
          f"(device bytes read {stats.total_device_bytes_read}, barriers {stats.threadgroup_barriers})")
    ok = gemm_err < 1e-4 and err < 1e-4
    print("\nPASS" if ok else "\nFAIL")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
