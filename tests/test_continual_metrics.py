"""Metrics on hand-built accuracy matrices; expected values computed by hand in the comments."""
import numpy as np
import pytest

from fastcur.continual.metrics import (average_accuracy, average_accuracy_curve, backward_transfer, forgetting,
                                       retention, retention_curve)

# After task 0: 0.8 on task 0. After task 1: task 0 fell to 0.5, task 1 at 0.9.
# After task 2: task 0 at 0.4, task 1 at 0.6, task 2 at 0.7.
ACC = [[0.8, 0.1, 0.0],
       [0.5, 0.9, 0.2],
       [0.4, 0.6, 0.7]]


def test_average_accuracy_is_mean_of_last_row():
    assert average_accuracy(ACC) == pytest.approx((0.4 + 0.6 + 0.7) / 3)  # 0.5667
    assert average_accuracy(np.array(ACC)) == pytest.approx(1.7 / 3)


def test_backward_transfer():
    # ((0.4 - 0.8) + (0.6 - 0.9)) / 2 = (-0.4 - 0.3) / 2 = -0.35
    assert backward_transfer(ACC) == pytest.approx(-0.35)
    # no forgetting, a gain: ((1.0 - 0.5)) / 1 = +0.5
    assert backward_transfer([[0.5, 0.0], [1.0, 0.9]]) == pytest.approx(0.5)
    assert backward_transfer([[0.3]]) == 0.0


def test_forgetting_uses_the_best_earlier_accuracy():
    # task 0: max(0.8, 0.5) - 0.4 = 0.4; task 1: max(0.1, 0.9) - 0.6 = 0.3; mean 0.35
    assert forgetting(ACC) == pytest.approx(0.35)
    # task 0 peaked after task 1 (0.9), ends at 0.7: 0.2; task 1: max(0.0, 0.6) - 0.6 = 0
    assert forgetting([[0.5, 0.0, 0.0], [0.9, 0.6, 0.0], [0.7, 0.6, 0.8]]) == pytest.approx(0.1)
    assert forgetting([[0.3]]) == 0.0


def test_average_accuracy_curve():
    # [0.8, (0.5 + 0.9) / 2, (0.4 + 0.6 + 0.7) / 3]
    assert average_accuracy_curve(ACC) == pytest.approx([0.8, 0.7, 1.7 / 3])


def test_retention():
    assert retention(0.3, 0.6) == pytest.approx(0.5)
    assert retention(0.9, 0.6) == pytest.approx(1.5)
    assert retention(0.0, 0.0) is None and retention(0.2, 0.0) is None  # base knew nothing: n/a
    assert retention_curve([0.6, 0.3, 0.15], 0.6) == pytest.approx([1.0, 0.5, 0.25])
    with pytest.raises(ValueError, match="base_probe_acc must be an accuracy"):
        retention(0.5, 1.5)
    with pytest.raises(ValueError, match="probe_acc must be an accuracy"):
        retention(float("nan"), 0.5)


@pytest.mark.parametrize("bad", [[0.1, 0.2], [[0.1, 0.2]], [], [[0.1, float("nan")], [0.2, 0.3]]])
def test_bad_matrices_are_named(bad):
    with pytest.raises(ValueError, match="acc must be"):
        average_accuracy(bad)
