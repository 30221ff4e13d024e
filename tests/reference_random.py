"""Philox4x32-10 in NumPy uint64 array arithmetic, written from the paper's definition
(Salmon et al. 2011) apart from ``advgrad.kernels.random``: the uniform numbers that
Square draws, for whole arrays of rows and columns at once."""

from __future__ import annotations

import numpy as np

MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
WEYL = (0x9E3779B9, 0xBB67AE85)
WORD = 2**32


def philox(counter, key):
    """Philox4x32-10: counter, a 4-tuple of uint64 arrays of 32-bit words, and key, a
    2-tuple, broadcast together; returns the four output words."""
    x = [np.asarray(word, dtype=np.uint64) for word in counter]
    k = [np.asarray(word, dtype=np.uint64) for word in key]
    for _ in range(10):
        high_low = [np.uint64(m) * x[j] for m, j in zip(MULTIPLIERS, (0, 2), strict=True)]
        x = [
            (high_low[1] // np.uint64(WORD)) ^ x[1] ^ k[0],
            high_low[1] % np.uint64(WORD),
            (high_low[0] // np.uint64(WORD)) ^ x[3] ^ k[1],
            high_low[0] % np.uint64(WORD),
        ]
        k = [(k[j] + np.uint64(WEYL[j])) % np.uint64(WORD) for j in range(2)]
    return x


def uniforms(seed, stream, rows, columns):
    """Uniform [0, 1) numbers (len(rows), columns) float64: row i, column k keyed by
    (seed, stream, rows[i], k)."""
    rows = np.asarray(rows, dtype=np.uint64)[:, None]
    column = np.arange(columns, dtype=np.uint64)[None, :]
    counter = (column, rows, np.uint64(stream % WORD), np.uint64(stream // WORD))
    words = philox(counter, (np.uint64(seed % WORD), np.uint64(seed // WORD)))
    top53 = (words[0] * np.uint64(2**21)) + (words[1] // np.uint64(2**11))
    return top53.astype(np.float64) / 2.0**53
