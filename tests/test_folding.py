"""binax.folding: a per-channel step function as one threshold compare (BN -> sign folding)."""

import numpy as np

from binax.folding import bisect_steps, scan_steps


def _value(steps, keys, never):
    return (keys >= steps.thresholds(never)) ^ steps.flips


def test_scan_finds_rising_falling_and_constant_channels():
    keys = np.arange(-5, 6)[:, None]
    values = np.stack([keys[:, 0] >= 2, keys[:, 0] < -3, np.ones(11, bool), np.zeros(11, bool)], axis=1)
    steps = scan_steps(values, -5)
    assert steps.monotone.all()
    np.testing.assert_array_equal(steps.changes, [True, True, False, False])
    np.testing.assert_array_equal(steps.threshold[:2], [2, -3])
    np.testing.assert_array_equal(steps.flip[:2], [False, True])
    np.testing.assert_array_equal(_value(steps, keys, -(2**30)), values)


def test_scan_reports_a_channel_that_changes_back():
    k = np.arange(-4, 5)
    values = np.stack([k >= 0, np.abs(k) <= 1], axis=1)  # the second is on, off, on again
    np.testing.assert_array_equal(scan_steps(values, -4).monotone, [True, False])
    # Leading axes (e.g. bit planes) are kept.
    assert scan_steps(np.stack([values, values]), -4).threshold.shape == (2, 2)


def test_bisection_agrees_with_the_scan_on_monotone_functions():
    rng = np.random.default_rng(0)
    c = 50
    cut, up = rng.integers(-1000, 1001, c), rng.random(c) < 0.5
    cut[:3] = [-1000, 1001, 5000]  # at the lowest key (constant), past the highest (constant)

    def fn(keys):
        keys = np.broadcast_to(keys, np.broadcast_shapes(np.shape(keys), (c,)))
        return np.where(up, keys >= cut, keys < cut)

    calls = []
    bisected = bisect_steps(lambda k: calls.append(k) or fn(k), -1000, 1000, c)
    scanned = scan_steps(fn(np.arange(-1000, 1001)[:, None]), -1000)
    for field in ("changes", "flips"):
        np.testing.assert_array_equal(getattr(bisected, field), getattr(scanned, field))
    np.testing.assert_array_equal(bisected.thresholds(-(2**30)), scanned.thresholds(-(2**30)))
    assert len(calls) <= 2 + 12  # two ends, then log2(2000) halvings
