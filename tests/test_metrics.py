"""Hand-computed values of every continual-learning metric."""
import numpy as np
import pytest

from cmm_utils.core import metrics

R = np.array([[0.9, np.nan, np.nan],
              [0.7, 0.8, np.nan],
              [0.6, 0.5, 0.9]])


def test_seen_task_accuracy_and_final():
    np.testing.assert_allclose(metrics.seen_task_accuracy(R), [0.9, 0.75, (0.6 + 0.5 + 0.9) / 3])
    assert metrics.final_average_accuracy(R) == pytest.approx(2.0 / 3)


def test_forgetting_max_vs_diagonal():
    # max reference: task0 max(0.9, 0.7) - 0.6 = 0.3 ; task1 0.8 - 0.5 = 0.3
    assert metrics.forgetting(R) == pytest.approx(0.3)
    R2 = np.array([[0.5, 0, 0], [0.9, 0.8, 0], [0.6, 0.5, 0.9]])
    assert metrics.forgetting(R2, "max") == pytest.approx(((0.9 - 0.6) + (0.8 - 0.5)) / 2)
    assert metrics.forgetting(R2, "diagonal") == pytest.approx(((0.5 - 0.6) + (0.8 - 0.5)) / 2)
    with pytest.raises(ValueError, match="reference"):
        metrics.forgetting(R, "min")


def test_backward_transfer_and_single_task():
    assert metrics.backward_transfer(R) == pytest.approx(((0.6 - 0.9) + (0.5 - 0.8)) / 2)
    assert metrics.forgetting([[0.7]]) == 0.0 and metrics.backward_transfer([[0.7]]) == 0.0


def test_average_incremental_accuracy():
    assert metrics.average_incremental_accuracy([0.9, 0.7, 0.5]) == pytest.approx(0.7)
    with pytest.raises(ValueError):
        metrics.average_incremental_accuracy([])


def test_class_metrics():
    y, p = [0, 0, 0, 1], [0, 0, 0, 0]
    assert metrics.mean_class_recall(y, p) == pytest.approx(0.5)
    assert metrics.macro_f1(y, p) == pytest.approx((6 / 7 + 0) / 2)
    assert metrics.quadratic_kappa([0, 1, 2, 3], [0, 1, 2, 3]) == pytest.approx(1.0)


def test_shape_is_checked():
    with pytest.raises(ValueError, match="T x T"):
        metrics.forgetting(np.zeros((2, 3)))
