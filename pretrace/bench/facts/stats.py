"""Uncertainty of fact-tracing metrics: means with bootstrap intervals, and paired differences between methods.

Two methods rank the same queries, so their difference is measured per query and resampled as pairs (the
queries are the unit of sampling): the interval of the mean difference is far narrower than the two means'
intervals would suggest, and a difference counts as significant only when its 95% interval excludes zero.
Percentile bootstrap (Efron & Tibshirani 1993) with a fixed seed, so a re-run gives the same intervals.
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
    """The mean over queries and its 95% percentile-bootstrap interval."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise PretraceError("no per-query values to summarise.")
    low, high = np.quantile(_resampled_means(values, resamples, seed), [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return {"mean": float(values.mean()), "low": float(low), "high": float(high), "n": int(values.size)}


def paired_difference(first: Sequence[float], second: Sequence[float], resamples: int = 10_000, seed: int = 0) -> dict:
    """first − second over the same queries: the mean difference, its 95% paired-bootstrap interval, how many
    queries each side wins (ties: equal values), and whether the interval excludes zero."""
    a, b = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise PretraceError(f"paired differences need two equally long, non-empty lists of per-query values, got {a.shape} and {b.shape}.")
    difference = a - b
    summary = mean_interval(difference, resamples, seed)
    return {**summary, "wins": int((difference > 0).sum()), "ties": int((difference == 0).sum()), "losses": int((difference < 0).sum()),
            "significant": bool(summary["low"] > 0 or summary["high"] < 0)}


def verdict(difference: dict, first: str, second: str) -> str:
    """The difference in words, claiming only what the interval supports."""
    if not difference["significant"]:
        return f"no significant difference between {first} and {second}"
    better, worse = (first, second) if difference["mean"] > 0 else (second, first)
    return f"{better} better than {worse}"
