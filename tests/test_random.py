"""The counter-based generator (advgrad.kernels.random): Random123's known answers, equal to
an independent NumPy implementation, uniform, and a function of its key alone."""

from __future__ import annotations

import numpy as np
import pytest
import reference_random

from advgrad.kernels.random import philox4x32, uniform, uniforms_into


@pytest.mark.parametrize(
    ("counter", "key", "expected"),
    [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((2**32 - 1,) * 4, (2**32 - 1,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_gives_random123s_known_answers(counter, key, expected):
    words = philox4x32(*(np.uint64(w) for w in counter), *(np.uint64(w) for w in key))
    assert tuple(int(w) for w in words) == expected
    assert tuple(int(w[()]) for w in reference_random.philox(counter, key)) == expected


@pytest.mark.parametrize(
    ("seed", "stream"), [(0, 0), (5, 2**32), (2**63 - 1, 2**32 + 5000), (12345, 2**63 - 1)]
)
def test_uniforms_equal_the_numpy_reference(seed, stream):
    rows = np.array([0, 1, 255, 256, 7, 2**31 - 1], dtype=np.int64)
    out = np.empty((len(rows), 9))
    uniforms_into(seed, stream, rows, out)
    np.testing.assert_array_equal(out, reference_random.uniforms(seed, stream, rows, 9))
    assert out[2, 4] == uniform(seed, stream, 255, 4)


def test_uniforms_are_uniform_in_the_unit_interval():
    out = np.empty((4000, 50))
    uniforms_into(7, 2**32 + 1, np.arange(4000, dtype=np.int64), out)
    assert out.min() >= 0.0 and out.max() < 1.0
    assert np.all(out * 2.0**53 == np.floor(out * 2.0**53))  # multiples of 2**-53
    counts = np.bincount((out * 100).astype(np.int64).ravel(), minlength=100)
    chi2 = ((counts - out.size / 100) ** 2 / (out.size / 100)).sum()
    assert chi2 < 160  # 99 degrees of freedom: P(chi2 > 160) < 1e-4
    assert abs(out.mean() - 0.5) < 0.002 and abs(out.var() - 1 / 12) < 0.001
    # neighbouring rows, columns and streams are uncorrelated
    for a, b in [(out[1:], out[:-1]), (out[:, 1:], out[:, :-1])]:
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.01
    other = np.empty_like(out)
    uniforms_into(7, 2**32 + 2, np.arange(4000, dtype=np.int64), other)
    assert abs(np.corrcoef(out.ravel(), other.ravel())[0, 1]) < 0.01


def test_a_rows_numbers_do_not_depend_on_the_batch():
    everything = np.empty((600, 5))
    uniforms_into(3, 9, np.arange(600, dtype=np.int64), everything)
    rows = np.array([599, 3, 256, 255], dtype=np.int64)
    some = np.empty((4, 5))
    uniforms_into(3, 9, rows, some)
    np.testing.assert_array_equal(some, everything[rows])
    wider = np.empty((4, 8))
    uniforms_into(3, 9, rows, wider)
    np.testing.assert_array_equal(wider[:, :5], some)
    uniforms_into(4, 9, rows, wider)
    assert not np.isin(wider, everything).any()
