"""Distributions of measurements: the figures every benchmark row reports."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between closest ranks
    (numpy's default, ``method="linear"``). Raises ValueError on an empty sequence."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not within 0-100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Summary:
    n: int
    min: float
    median: float
    p95: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        if not values:
            raise ValueError("summary of no values")
        return cls(len(values), min(values), percentile(values, 50), percentile(values, 95),
                   percentile(values, 99), max(values))

    def stat(self, name: str) -> float:
        """One of ``min``, ``median``, ``p95``, ``p99``, ``max`` by name."""
        if name not in ("min", "median", "p95", "p99", "max"):
            raise ValueError(f"no statistic named {name!r}")
        value: float = getattr(self, name)
        return value
