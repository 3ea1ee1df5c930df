"""Numbers as every command reports them: latency summaries, the same for `bench` and `loadtest`
(mean and the percentiles trtexec and perf_analyzer report, linear interpolation between ranks,
numpy's default); shares printed so that a disagreement never rounds up to 100%; and the warning
for timings taken on a busy machine, the same for `bench` and the scripts in benchmarks/."""

from __future__ import annotations

import math
import os
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


def share_text(share: float, digits: int = 2) -> str:
    """A share as a percentage rounded down, so that anything short of all never reads 100%."""
    scale = 10 ** (digits + 2)
    return f"{math.floor(share * scale + 1e-9) / scale:.{digits}%}"


def load_warning() -> str | None:
    """Where the 1-minute load average is above the cores, what that does to timings; else None.
    Take it before the timed run's own work raises the load. Under load the timings come out
    slow and unevenly so (PyTorch more than ONNX Runtime), with nothing in them to show it."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average here (Windows)
        return None
    cores = os.cpu_count() or 1
    if load <= cores:
        return None
    return (
        f"the machine is busy (load average {load:.1f} on {cores} cores): other work shares the "
        "cores, so these timings come out slow and noisy"
    )
