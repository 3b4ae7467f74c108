"""Probability calibration: row-wise softmax, expected calibration error (ECE), the temperature
(and out-of-scope offset) fitted on held-out logits, and the out-of-scope threshold.

Pure NumPy on ``(n, k)`` logits / probabilities; training (``tasks.train``) fits with these and
evaluation (``tasks.evaluate``) reports ECE with them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import numpy as np

ECE_BINS = 15


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``(n, k)`` logits (shifted by the row maximum: no overflow)."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, *, bins: int = ECE_BINS
) -> float:
    """ECE with equal-width confidence bins: sum over bins of |accuracy - confidence| * share."""
    if len(confidence) == 0:
        return 0.0
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            ece += abs(float(correct[mask].mean()) - float(confidence[mask].mean())) * (mask.mean())
    return float(ece)


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature T > 0 minimising the NLL of ``softmax(logits / T)`` (1-D search on log T)."""
    if len(targets) == 0:
        return 1.0

    def nll(log_t: float) -> float:
        z = logits / np.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        logp = z[np.arange(len(targets)), targets] - np.log(np.exp(z).sum(axis=1))
        return float(-logp.mean())

    lo, hi = np.log(0.01), np.log(100.0)
    grid = np.linspace(lo, hi, 61)
    best = float(grid[int(np.argmin([nll(g) for g in grid]))])
    step = float(grid[1] - grid[0])
    a, b = best - step, best + step
    golden = (np.sqrt(5.0) - 1.0) / 2.0
    for _ in range(40):  # golden-section refinement inside the best grid cell
        c, d = b - golden * (b - a), a + golden * (b - a)
        if nll(c) < nll(d):
            b = d
        else:
            a = c
    return float(np.exp((a + b) / 2.0))


def _golden_min(f: Callable[[float], float], lo: float, hi: float, iterations: int = 50) -> float:
    """The minimiser of a unimodal ``f`` on [lo, hi] by golden-section search."""
    golden = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    for _ in range(iterations):
        c, d = b - golden * (b - a), a + golden * (b - a)
        if f(c) < f(d):
            b = d
        else:
            a = c
    return (a + b) / 2.0


def fit_temperature_and_offset(
    logits: np.ndarray, targets: np.ndarray, column: int, *, rounds: int = 6
) -> tuple[float, float]:
    """(T, beta) minimising the NLL of ``softmax(logits / T + beta * e_column)``.

    A temperature alone cannot fix a class that is over- or under-predicted as a whole: the
    out-of-scope class is the usual case (out-of-scope prompts land near in-scope intents and
    get confident in-scope predictions). The offset ``beta`` on that one column, fitted jointly
    with ``T`` on held-out data, corrects it; it folds into the head as ``b[column] += T * beta``.
    Coordinate descent (log T in [0.01, 100], beta in [-10, 10]), started from the
    temperature-only fit and never worse than it.
    """
    if len(targets) == 0:
        return 1.0, 0.0
    if not 0 <= column < logits.shape[1]:
        raise ValueError(f"column: expected 0..{logits.shape[1] - 1}, found {column}")
    onehot = np.zeros(logits.shape[1], dtype=np.float64)
    onehot[column] = 1.0

    def nll(t: float, beta: float) -> float:
        z = logits / t + beta * onehot
        z = z - z.max(axis=1, keepdims=True)
        logp = z[np.arange(len(targets)), targets] - np.log(np.exp(z).sum(axis=1))
        return float(-logp.mean())

    t0 = fit_temperature(logits, targets)
    t, beta = t0, 0.0
    log_lo, log_hi = float(np.log(0.01)), float(np.log(100.0))

    def nll_of_log_t(log_t: float, *, beta: float) -> float:
        return nll(float(np.exp(log_t)), beta)

    for _ in range(rounds):
        beta = _golden_min(partial(nll, t), -10.0, 10.0)
        t = float(np.exp(_golden_min(partial(nll_of_log_t, beta=beta), log_lo, log_hi)))
    if nll(t, beta) >= nll(t0, 0.0):
        return t0, 0.0
    return t, float(beta)


def choose_oos_threshold(
    probs: np.ndarray, labels: Sequence[str], y_true: Sequence[str], oos_label: str
) -> float | None:
    """The top-probability threshold maximising balanced accuracy on rows with ``oos_label``.

    Balanced accuracy = mean of in-scope accuracy (correct and above threshold) and out-of-scope
    recall (below threshold, or predicted ``oos_label``); it does not depend on the share of
    out-of-scope rows, so a validation set with few of them still gives a sensible threshold.
    Returns None when ``y_true`` has no out-of-scope rows.
    """
    truth = np.array(y_true, dtype=object)
    is_oos = truth == oos_label
    if not is_oos.any() or is_oos.all():
        return None
    top = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    pred = np.array(labels, dtype=object)[top]
    pred_oos = pred == oos_label
    correct_in = (pred == truth) & ~is_oos & ~pred_oos
    candidates = np.unique(np.concatenate([[0.0], conf]))
    best_t, best_score = 0.0, -1.0
    for t in candidates:
        above = conf >= t
        in_acc = (correct_in & above)[~is_oos].mean()
        oos_rec = (pred_oos | ~above)[is_oos].mean()
        score = (in_acc + oos_rec) / 2.0
        if score > best_score + 1e-12:
            best_t, best_score = float(t), float(score)
    return best_t
