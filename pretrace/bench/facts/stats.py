"""Uncertainty of fact-tracing metrics: means with bootstrap intervals, and paired differences between methods.

Two methods rank the same queries, so their difference is measured per query and resampled as pairs (the
queries are the unit of sampling): the interval of the mean difference is far narrower than the two means'
intervals would suggest. Percentile bootstrap (Efron & Tibshirani 1993) with a fixed seed, so a re-run gives
the same intervals. Many pairs are compared at once, so a difference is called significant only when its
bootstrap p-value stays below 0.05 after Holm's correction over the pairs compared together (`holm`); each
interval on its own is an uncorrected 95% one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pretrace.errors import PretraceError

LEVEL = 0.95


def _resampled_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # 1,000 resamples at a time: memory stays at 1,000 × n
        count = min(1000, resamples - start)
        means[start:start + count] = values[rng.integers(0, len(values), (count, len(values)))].mean(1)
    return means


def mean_interval(values: Sequence[float], resamples: int = 10_000, seed: int = 0) -> dict:
    """The mean over queries, its 95% percentile-bootstrap interval and the two-sided bootstrap p-value of mean = 0."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise PretraceError("no per-query values to summarise.")
    means = _resampled_means(values, resamples, seed)
    low, high = np.quantile(means, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    p_value = min(1.0, 2 * min(float((means <= 0).mean()), float((means >= 0).mean())))
    return {"mean": float(values.mean()), "low": float(low), "high": float(high), "n": int(values.size), "p_value": p_value}


def paired_difference(first: Sequence[float], second: Sequence[float], resamples: int = 10_000, seed: int = 0) -> dict:
    """first − second over the same queries: the mean difference, its 95% paired-bootstrap interval and p-value,
    how many queries each side wins (ties: equal values), and `significant` (the interval excludes zero; `holm`
    replaces it by the corrected verdict when several pairs are compared)."""
    a, b = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise PretraceError(f"paired differences need two equally long, non-empty lists of per-query values, got {a.shape} and {b.shape}.")
    difference = a - b
    summary = mean_interval(difference, resamples, seed)
    return {**summary, "wins": int((difference > 0).sum()), "ties": int((difference == 0).sum()), "losses": int((difference < 0).sum()),
            "significant": bool(summary["low"] > 0 or summary["high"] < 0)}


def holm(differences: list[dict], level: float = 1 - LEVEL) -> None:
    """Holm's step-down correction over differences compared together: adds `p_holm` to each and sets
    `significant` to p_holm < level (the family-wise error rate stays below `level`)."""
    order = sorted(range(len(differences)), key=lambda i: differences[i]["p_value"])
    running = 0.0
    for position, i in enumerate(order):
        running = max(running, min(1.0, (len(differences) - position) * differences[i]["p_value"]))
        differences[i]["p_holm"] = running
        differences[i]["significant"] = running < level


def verdict(difference: dict, first: str, second: str) -> str:
    """The difference in words, claiming only what the interval supports."""
    if not difference["significant"]:
        return f"no significant difference between {first} and {second}"
    better, worse = (first, second) if difference["mean"] > 0 else (second, first)
    return f"{better} better than {worse}"
