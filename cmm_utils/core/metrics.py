"""Continual-learning metrics over the accuracy matrix, each definition pinned.

``R[t, i]`` is the accuracy on task ``i``'s test data after training (and merging) task ``t``,
``t, i = 0..T-1``. Entries with ``i > t`` (tasks not seen yet) are allowed but never used here.
The field names different quantities alike; each function says which one it is and who uses it.
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score, f1_score


def _square(R) -> np.ndarray:
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(f"the accuracy matrix must be T x T, got shape {R.shape}")
    return R


def seen_task_accuracy(R) -> np.ndarray:
    """``A_t = mean_{i<=t} R[t, i]``: after task t, accuracy averaged over the tasks seen so far
    (task-averaged, as Mammoth and Avalanche's stream accuracy over seen experiences)."""
    R = _square(R)
    return np.array([R[t, : t + 1].mean() for t in range(len(R))])


def final_average_accuracy(R) -> float:
    """``A_T = mean_i R[T-1, i]``: the last row's mean (task-averaged "final/last accuracy").

    MagMax reports instead the accuracy over the pooled test set of all classes, which weights
    tasks by their test size; chapters report that number separately as "final accuracy (pooled)".
    """
    return float(seen_task_accuracy(R)[-1])


def average_incremental_accuracy(accuracies_after_each_task) -> float:
    """``(1/T) sum_t A_t``, with ``A_t`` the accuracy on all classes seen after task t
    (Rebuffi et al., iCaRL; PyCIL's and DynaMMo's "average accuracy"). Pass the vector ``A_t``;
    for the task-averaged variant pass ``seen_task_accuracy(R)``."""
    a = np.asarray(accuracies_after_each_task, dtype=float)
    if a.ndim != 1 or not len(a):
        raise ValueError(f"expected a non-empty vector of per-task accuracies, got shape {a.shape}")
    return float(a.mean())


def forgetting(R, reference: str = "max") -> float:
    """Average forgetting of the tasks before the last.

    ``reference="max"`` (Chaudhry et al. 2018; Mammoth, PyCIL): ``f_i = max_{t<T-1} R[t,i] - R[T-1,i]``.
    ``reference="diagonal"`` (Avalanche's ``forgetting``): ``f_i = R[i,i] - R[T-1,i]``.
    Returns 0.0 for a single task.
    """
    R = _square(R)
    T = len(R)
    if T == 1:
        return 0.0
    if reference == "max":
        f = [R[i:T - 1, i].max() - R[T - 1, i] for i in range(T - 1)]
    elif reference == "diagonal":
        f = [R[i, i] - R[T - 1, i] for i in range(T - 1)]
    else:
        raise ValueError(f"unknown forgetting reference {reference!r}; valid: 'max', 'diagonal'")
    return float(np.mean(f))


def backward_transfer(R) -> float:
    """BWT (Lopez-Paz & Ranzato 2017, GEM): ``mean_{i<T-1} R[T-1,i] - R[i,i]``; negative = forgetting.
    FusionBench's ``compute_backward_transfer`` is the same when given tasks 0..T-2."""
    R = _square(R)
    T = len(R)
    return 0.0 if T == 1 else float(np.mean([R[T - 1, i] - R[i, i] for i in range(T - 1)]))


def macro_f1(y_true, y_pred) -> float:
    """Unweighted mean of per-class F1 over the classes present in ``y_true`` or ``y_pred``
    (scikit-learn ``average="macro"``); MedMerge's headline metric."""
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def mean_class_recall(y_true, y_pred) -> float:
    """Mean of per-class recall = balanced accuracy (DynaMMo's ``mcr`` for skin lesions), over the
    classes present in ``y_true``. Predicting a class that has no test image is an ordinary error of
    a model scored on part of its label space (a task's images, a resample), so scikit-learn's
    warning about it is silenced; the value is scikit-learn's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(balanced_accuracy_score(y_true, y_pred))


def quadratic_kappa(y_true, y_pred) -> float:
    """Cohen's kappa with quadratic weights, the standard score for retinopathy grading (APTOS)."""
    return float(cohen_kappa_score(y_true, y_pred, weights="quadratic"))


def summarize(R, accuracies_after_each_task=None) -> dict[str, float]:
    """The book's standard row: final average accuracy, average incremental accuracy,
    forgetting (max reference), backward transfer."""
    after = seen_task_accuracy(R) if accuracies_after_each_task is None else accuracies_after_each_task
    return {"final_avg_acc": final_average_accuracy(R),
            "avg_incremental_acc": average_incremental_accuracy(after),
            "forgetting": forgetting(R), "bwt": backward_transfer(R)}
