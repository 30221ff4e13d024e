"""A counter-based random generator for jitted code: Philox4x32-10 (Salmon et al., SC 2011,
"Parallel random numbers: as easy as 1, 2, 3"; the Random123 library's known answers hold).

A counter-based generator is a keyed bijection of a counter: the number at a counter
needs no state and no earlier draw, so a kernel draws the numbers of any row, query and
column in any order, on any thread, and gets bitwise the same ones. ``uniform`` keys it
by the project's convention for random choices, the seed, the stream (which draw of an
algorithm, e.g. Square's update i), the absolute row index and the column (the k-th number
that draw of that row takes):

    key = (seed mod 2**32, seed // 2**32)
    counter = (column, row, stream mod 2**32, stream // 2**32)
    u = (first output word * 2**32 + second output word) // 2**11 * 2**-53   in [0, 1)

Everything is ``@njit`` on unsigned 64-bit integers holding 32-bit words.
"""

import numpy as np
from numba import njit

PHILOX_ROUNDS = 10
PHILOX_M0 = np.uint64(0xD2511F53)
PHILOX_M1 = np.uint64(0xCD9E8D57)
"""The round multipliers."""
PHILOX_W0 = np.uint64(0x9E3779B9)
PHILOX_W1 = np.uint64(0xBB67AE85)
"""The key increments between rounds (the golden ratio and sqrt(3) - 1, as 32-bit fractions)."""
_LOW_32 = np.uint64(0xFFFFFFFF)
_32 = np.uint64(32)
_11 = np.uint64(11)
_2_TO_MINUS_53 = 2.0**-53


@njit(cache=True, error_model="numpy")
def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of the counter (c0, c1, c2, c3) under the key (k0, k1): four 32-bit
    words, each argument and result a uint64 below 2**32."""
    for _ in range(PHILOX_ROUNDS):
        product0 = PHILOX_M0 * c0
        product1 = PHILOX_M1 * c2
        c0, c1, c2, c3 = (
            (product1 >> _32) ^ c1 ^ k0,
            product1 & _LOW_32,
            (product0 >> _32) ^ c3 ^ k1,
            product0 & _LOW_32,
        )
        k0 = (k0 + PHILOX_W0) & _LOW_32
        k1 = (k1 + PHILOX_W1) & _LOW_32
    return c0, c1, c2, c3


@njit(cache=True, error_model="numpy")
def uniform(seed, stream, row, column):
    """A uniform float64 in [0, 1) (a multiple of 2**-53) keyed by ``seed`` in [0, 2**63),
    ``stream`` in [0, 2**63), ``row`` and ``column`` in [0, 2**32): see the module docstring."""
    seed, stream = np.uint64(seed), np.uint64(stream)
    w0, w1, _, _ = philox4x32(
        np.uint64(column),
        np.uint64(row),
        stream & _LOW_32,
        stream >> _32,
        seed & _LOW_32,
        seed >> _32,
    )
    return np.float64(((w0 << _32) | w1) >> _11) * _2_TO_MINUS_53


@njit(cache=True, error_model="numpy")
def uniforms_into(seed, stream, rows, out):
    """``out[i, k] = uniform(seed, stream, rows[i], k)`` for rows (N,) int64, out (N, K)
    float64."""
    for i in range(out.shape[0]):
        for k in range(out.shape[1]):
            out[i, k] = uniform(seed, stream, rows[i], k)
