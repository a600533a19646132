"""
Percentiles of measured durations.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p999", 0.999))


def percentile(ordered: list[int], fraction: float) -> int:
    """
    Return the nearest-rank percentile of an ascending, non-empty list.
    """
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize_ns(values: Iterable[int]) -> dict[str, float | int | None]:
    """
    Summarize durations in nanoseconds as a count and percentiles in milliseconds.

    The percentiles are None when there are no values.
    """
    ordered = sorted(values)
    summary: dict[str, float | int | None] = {"count": len(ordered)}
    for name, fraction in PERCENTILES:
        summary[f"{name}_ms"] = percentile(ordered, fraction) / 1e6 if ordered else None
    summary["max_ms"] = ordered[-1] / 1e6 if ordered else None
    return summary
