"""Server metrics in the Prometheus text format (`GET /metrics`).

A few dozen lines instead of a client library: counters, gauges read at scrape time, and
histograms with fixed buckets. Updated from both the engine thread and the event loop,
so every update takes one lock (they are rare next to a decode step).
"""

from __future__ import annotations

import threading
from typing import Callable

_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


class Metrics:
    def __init__(self, prefix: str = "dsv2"):
        self.prefix = prefix
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}          # name -> (type, help)
        self._counters: dict[str, dict[tuple, float]] = {}
        self._gauges: dict[str, Callable[[], float]] = {}
        self._hists: dict[str, tuple[tuple, list[int], list[float]]] = {}   # buckets, counts(+inf), [sum]

    # ------------------------------------------------------------ declare
    def counter(self, name: str, help: str) -> None:
        self._help[name] = ("counter", help)
        self._counters[name] = {}

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        self._help[name] = ("gauge", help)
        self._gauges[name] = read

    def histogram(self, name: str, help: str, buckets=_LATENCY_BUCKETS_S) -> None:
        self._help[name] = ("histogram", help)
        self._hists[name] = (tuple(buckets), [0] * (len(buckets) + 1), [0.0])

    # ------------------------------------------------------------- update
    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._counters[name]
            series[key] = series.get(key, 0.0) + value

    def observe(self, name: str, value: float) -> None:
        buckets, counts, total = self._hists[name]
        i = next((i for i, b in enumerate(buckets) if value <= b), len(buckets))
        with self._lock:
            counts[i] += 1
            total[0] += value

    def value(self, name: str, **labels) -> float:
        """A counter's or gauge's current value (tests and logs read this)."""
        if name in self._gauges:
            return float(self._gauges[name]())
        return self._counters[name].get(tuple(sorted(labels.items())), 0.0)

    # ------------------------------------------------------------- export
    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, help) in self._help.items():
                full = f"{self.prefix}_{name}"
                lines += [f"# HELP {full} {help}", f"# TYPE {full} {kind}"]
                if kind == "counter":
                    series = self._counters[name] or {(): 0.0}
                    lines += [f"{full}{_labels(dict(k))} {v:g}" for k, v in series.items()]
                elif kind == "gauge":
                    lines.append(f"{full} {float(self._gauges[name]()):g}")
                else:
                    buckets, counts, total = self._hists[name]
                    cum = 0
                    for b, c in zip(buckets, counts):
                        cum += c
                        lines.append(f'{full}_bucket{{le="{b:g}"}} {cum}')
                    cum += counts[-1]
                    lines += [f'{full}_bucket{{le="+Inf"}} {cum}', f"{full}_sum {total[0]:g}", f"{full}_count {cum}"]
        return "\n".join(lines) + "\n"


def parse_prometheus(text: str) -> dict[str, float]:
    """`name{labels}` -> value for every sample line; used by tests and the load benchmark."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, val = line.rpartition(" ")
            out[key] = float(val)
    return out
