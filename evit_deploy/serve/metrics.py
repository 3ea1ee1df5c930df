"""The few Prometheus metrics Triton does not keep itself: the size of each batch the dynamic
batcher formed (Triton only reports totals), and the REST front's requests and latency.

Rendered in the Prometheus text format and appended to Triton's own metrics on the front's
/metrics, so one scrape has requests, queue time and latency (Triton's nv_inference_*) and the
batch-size histogram (evit_batch_size)."""

from __future__ import annotations

import threading
from collections.abc import Sequence


class Histogram:
    """A cumulative Prometheus histogram (thread-safe)."""

    def __init__(self, name: str, help_text: str, buckets: Sequence[float], labels: str = ""):
        self.name = name
        self.help = help_text
        self.buckets = sorted(buckets)
        self.labels = labels  # e.g. 'model="evit"'
        self._counts = [0] * len(self.buckets)
        self._count = 0
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._count += 1
            self._sum += value
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self._counts[i] += 1

    def snapshot(self) -> tuple[list[int], int, float]:
        with self._lock:
            return list(self._counts), self._count, self._sum

    def render(self) -> str:
        counts, count, total = self.snapshot()
        sep = "," if self.labels else ""
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for bound, n in zip(self.buckets, counts):
            lines.append(f'{self.name}_bucket{{{self.labels}{sep}le="{_fmt(bound)}"}} {n}')
        lines.append(f'{self.name}_bucket{{{self.labels}{sep}le="+Inf"}} {count}')
        suffix = f"{{{self.labels}}}" if self.labels else ""
        lines.append(f"{self.name}_sum{suffix} {_fmt(total)}")
        lines.append(f"{self.name}_count{suffix} {count}")
        return "\n".join(lines) + "\n"


class Counter:
    """A Prometheus counter with one label (thread-safe)."""

    def __init__(self, name: str, help_text: str, label: str, base_labels: str = ""):
        self.name = name
        self.help = help_text
        self.label = label
        self.base_labels = base_labels
        self._values: dict[str, float] = {}
        self._lock = threading.Lock()

    def inc(self, value: str, amount: float = 1) -> None:
        with self._lock:
            self._values[value] = self._values.get(value, 0) + amount

    def get(self, value: str) -> float:
        with self._lock:
            return self._values.get(value, 0)

    def render(self) -> str:
        with self._lock:
            items = sorted(self._values.items())
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        prefix = f"{self.base_labels}," if self.base_labels else ""
        for value, amount in items:
            lines.append(f'{self.name}{{{prefix}{self.label}="{value}"}} {_fmt(amount)}')
        return "\n".join(lines) + "\n"


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to max_batch (and max_batch itself)."""
    buckets, size = [], 1
    while size < max_batch:
        buckets.append(size)
        size *= 2
    return [*buckets, max_batch]


LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServeMetrics:
    """What evit-deploy adds to Triton's metrics for one served model."""

    def __init__(self, model_name: str, max_batch: int):
        labels = f'model="{model_name}"'
        self.batch_size = Histogram(
            "evit_batch_size",
            "Images per model execution, as formed by Triton's dynamic batcher.",
            batch_buckets(max_batch),
            labels,
        )
        self.batch_requests = Histogram(
            "evit_batch_requests",
            "Client requests merged into one model execution.",
            batch_buckets(max_batch),
            labels,
        )
        self.nonfinite_inputs = Counter(
            "evit_nonfinite_inputs_total",
            "Images with NaN/Inf values (answered with NaN logits, never run).",
            "model",
        )
        self.model_name = model_name
        self.rest_requests = Counter(
            "evit_rest_requests_total", "REST front requests by HTTP status.", "code", labels
        )
        self.backend_restarts = Counter(
            "evit_backend_restarts_total",
            "Times the model backend died and serve started Triton again.",
            "model",
        )
        self.rest_latency = Histogram(
            "evit_rest_request_duration_seconds",
            "REST front image requests, upload to answer (decode, preprocess, queue, inference).",
            LATENCY_BUCKETS_S,
            labels,
        )

    def observe_batch(self, images: int, requests: int, nonfinite: int = 0) -> None:
        self.batch_size.observe(images)
        self.batch_requests.observe(requests)
        if nonfinite:
            self.nonfinite_inputs.inc(self.model_name, nonfinite)

    def render(self) -> str:
        return "".join(
            m.render()
            for m in (
                self.batch_size,
                self.batch_requests,
                self.nonfinite_inputs,
                self.backend_restarts,
                self.rest_requests,
                self.rest_latency,
            )
        )


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
