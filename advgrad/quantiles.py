"""Exact quantiles of values that arrive in blocks, in memory bounded by the block.

A job's per-row results (a certified radius, a minimal eps) sit in a column of its output
file, which may hold millions of rows; their medians and quartiles are found by reading the
column a few times, block by block, instead of loading it. :func:`lower_quantiles` is a
radix selection: each value maps to a 64-bit key that sorts as the float does, and four
passes fix the key of each wanted order statistic 16 bits at a time, from a histogram of
65,536 counts of the keys still in the running. The result is exactly numpy's
``np.quantile(values, q, method="lower")``: each quantile is one of the values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

DIGIT_BITS = 16
PASSES = 64 // DIGIT_BITS
_SIGN = np.uint64(1 << 63)


def _keys(values: np.ndarray) -> np.ndarray:
    """uint64 keys in the order of the float64 ``values`` (negatives bit-flipped)."""
    bits = np.ascontiguousarray(values, dtype=np.float64).view(np.uint64)
    return np.where(bits & _SIGN, ~bits, bits | _SIGN)


def _value(key: int) -> float:
    """The float64 whose key (``_keys``) is ``key``."""
    key = np.uint64(key)
    bits = key & ~_SIGN if key & _SIGN else ~key
    return float(np.array([bits], dtype=np.uint64).view(np.float64)[0])


def lower_quantiles(
    blocks: Callable[[], Iterable[np.ndarray]], probabilities: Sequence[float]
) -> tuple[float, ...] | None:
    """Quantiles of the values of every block, as ``np.quantile(..., method="lower")``.

    Parameters
    ----------
    blocks : callable
        Returns a new iterable of 1-D float arrays (the values, in blocks) at each call; it
        is called ``PASSES`` (4) times and must give the same values every time. An array
        in memory is ``lambda: [values]``.
    probabilities : sequence of float in [0, 1]

    Returns
    -------
    tuple of float or None
        One value per probability (nan for all when any value is nan); None when there are
        no values.
    """
    q = np.asarray(probabilities, dtype=np.float64)
    n_values, has_nan = 0, False
    top = np.zeros(1 << DIGIT_BITS, dtype=np.int64)
    shift = 64 - DIGIT_BITS
    for block in blocks():
        keys = _keys(block)
        n_values += keys.size
        has_nan = has_nan or bool(np.isnan(block).any())
        top += np.bincount((keys >> np.uint64(shift)).astype(np.intp), minlength=top.size)
    if n_values == 0:
        return None
    if has_nan:
        return (float("nan"),) * len(q)
    ranks = np.floor(q * (n_values - 1)).astype(np.int64)  # numpy's "lower" index
    prefixes = []
    for i, rank in enumerate(ranks):
        digit, ranks[i] = _digit_at(top, rank)
        prefixes.append(digit)
    for _ in range(1, PASSES):
        shift -= DIGIT_BITS
        counts = np.zeros((len(q), 1 << DIGIT_BITS), dtype=np.int64)
        for block in blocks():
            keys = _keys(block)
            high = keys >> np.uint64(shift + DIGIT_BITS)
            digits = ((keys >> np.uint64(shift)) & np.uint64(0xFFFF)).astype(np.intp)
            for i, prefix in enumerate(prefixes):
                counts[i] += np.bincount(digits[high == prefix], minlength=counts.shape[1])
        for i in range(len(q)):
            digit, ranks[i] = _digit_at(counts[i], ranks[i])
            prefixes[i] = (prefixes[i] << DIGIT_BITS) | digit
    return tuple(_value(key) for key in prefixes)


def _digit_at(counts: np.ndarray, rank: int) -> tuple[int, int]:
    """The digit whose bin holds the ``rank``-th smallest key (from 0), and that key's rank
    among the keys of the bin."""
    below = np.cumsum(counts)
    digit = int(np.searchsorted(below, rank, side="right"))
    return digit, int(rank - (below[digit - 1] if digit else 0))


@dataclass(frozen=True)
class Spread:
    """Quartiles of a per-row result (numpy's "lower" method: each is one of the values,
    inf included) and the fraction of the values that are finite.

    A minimal eps is inf where no adversarial example was found up to eps_max, so
    ``found`` is the fraction of rows where one was found.
    """

    q25: float
    median: float
    q75: float
    found: float


def spread_of(blocks: Callable[[], Iterable[np.ndarray]]) -> Spread | None:
    """The ``Spread`` of the values of every block (see :func:`lower_quantiles`), or None
    when there are none."""
    quartiles = lower_quantiles(blocks, (0.25, 0.5, 0.75))
    if quartiles is None:
        return None
    finite = total = 0
    for block in blocks():
        finite += int(np.isfinite(block).sum())
        total += len(block)
    return Spread(*quartiles, found=finite / total)
