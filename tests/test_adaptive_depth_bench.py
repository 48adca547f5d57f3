"""The pure helpers of bench/adaptive_depth.py: the threshold sweep, the random control's exit
probabilities and the reading of a loss curve (the numbers docs/RESULTS.md states)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
adaptive_depth = pytest.importorskip("adaptive_depth")


def test_sweep_spans_all_leave_to_none_leave_in_both_directions():
    values = np.random.default_rng(0).random((2, 500))
    thresholds = adaptive_depth.sweep_thresholds(values, 7)
    assert thresholds == sorted(thresholds) and len(thresholds) == 7
    # signal >= t: the lowest threshold lets every token leave, the highest none
    assert (values >= thresholds[0]).all() and not (values >= thresholds[-1]).any()
    # signal < t: the other way round
    assert (values < thresholds[-1]).all() and not (values < thresholds[0]).any()


def test_random_probabilities_give_evenly_spaced_expected_cycles():
    probabilities = adaptive_depth.random_probabilities(3, 5)
    cycles = [adaptive_depth.expected_cycles(p, 3) for p in probabilities]
    assert probabilities[0] == pytest.approx(0.0, abs=1e-6)
    assert probabilities[-1] == pytest.approx(1.0, abs=1e-6)
    assert cycles == pytest.approx([3.0, 2.5, 2.0, 1.5, 1.0], abs=1e-5)


def points(xs, ys):
    return [{"middle_applications": x, "loss": y} for x, y in zip(xs, ys)]


def test_fewest_applications_within_bound_interpolates_the_crossing():
    curve = points([2.0, 4.0, 6.0], [5.0, 4.2, 4.0])
    assert adaptive_depth.fewest_applications_within(curve, 4.04) == pytest.approx(5.6)
    assert adaptive_depth.fewest_applications_within(curve, 5.0) == pytest.approx(2.0)
    assert adaptive_depth.fewest_applications_within(curve, 3.9) is None


def test_loss_at_interpolates_inside_the_curve_only():
    curve = points([4.0, 2.0], [4.2, 5.0])  # unsorted on purpose
    assert adaptive_depth.loss_at(curve, 3.0) == pytest.approx(4.6)
    assert adaptive_depth.loss_at(curve, 6.5) is None
