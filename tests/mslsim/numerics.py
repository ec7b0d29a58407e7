"""Independent reference rounding for the simulator's numeric tests (numpy bit manipulation and exact
rational arithmetic; nothing here shares code with the simulator)."""
from fractions import Fraction

import numpy as np


def round_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 (round to nearest even, NaN kept quiet), returned as float32 values."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = np.where(nan, (u | 0x400000) & 0xFFFF0000, rounded)
    return rounded.astype(np.uint32).view(np.float32)


FORMATS = {  # precision bits (with the implicit one), smallest normal exponent, largest exponent
    "float": (24, -126, 127),
    "half": (11, -14, 15),
    "bfloat": (8, -126, 127),
}


def round_exact(x: Fraction, fmt: str) -> float:
    """Correctly rounded (nearest even) value of the exact rational x in format fmt."""
    p, emin, emax = FORMATS[fmt]
    if x == 0:
        return 0.0
    sign, x = (-1 if x < 0 else 1), abs(x)
    e = x.numerator.bit_length() - x.denominator.bit_length()
    if Fraction(2) ** e > x:
        e -= 1
    e = max(e, emin)
    quantum = Fraction(2) ** (e - p + 1)
    q = x / quantum
    n = q.numerator // q.denominator
    rest = q - n
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and n % 2):
        n += 1
    value = n * quantum
    if value >= Fraction(2) ** (emax + 1):
        return sign * float("inf")
    return sign * float(value)


def mma_reference(A: np.ndarray, B: np.ndarray, fmt: str) -> np.ndarray:
    """C = A @ B the way mslsim's simdgroup_matrix<T> accumulates: per 8-wide k step, each output is an
    fp32 fused multiply-add chain starting from the T-valued accumulator, rounded once to T."""
    M, K = A.shape
    N = B.shape[1]
    C = np.zeros((M, N))
    for i in range(M):
        for j in range(N):
            acc = 0.0
            for k0 in range(0, K, 8):
                s = Fraction(acc)
                for k in range(k0, k0 + 8):
                    s = Fraction(round_exact(Fraction(float(A[i, k])) * Fraction(float(B[k, j])) + s, "float"))
                acc = round_exact(s, fmt)
            C[i, j] = acc
    return C
