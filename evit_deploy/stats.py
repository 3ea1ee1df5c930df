"""Latency summaries, the same for `bench` and `loadtest`: mean and the percentiles trtexec and
perf_analyzer report (linear interpolation between ranks, numpy's default)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PERCENTILES = (50, 90, 99)


def latency_summary(ms: Sequence[float] | np.ndarray) -> dict[str, float]:
    """{'mean', 'p50', 'p90', 'p99'} of latencies in ms; NaN for no samples."""
    values = np.asarray(ms, dtype=np.float64)
    if values.size == 0:
        return {"mean": float("nan"), **{f"p{q}": float("nan") for q in PERCENTILES}}
    return {
        "mean": float(values.mean()),
        **{f"p{q}": float(np.percentile(values, q)) for q in PERCENTILES},
    }
