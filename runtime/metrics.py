"""GET /metrics (with --metrics): the server's counters in Prometheus' text format, under
llama.cpp's names (tools/server's to_metrics), rendered by the `prometheus-client` package.

The counters add up every finished generation's timings (the engine thread reports them
with each "done" event); the two throughput gauges average over the window since the
previous scrape, as llama.cpp's do; the request gauges are read from the engine worker at
scrape time. llama.cpp's counters of its own internals (llama_decode calls, speculative
drafts) have no equivalent here and are left out rather than shown as zeros."""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """What the server has done since it started; thread-safe (HTTP threads record)."""

    def __init__(self, worker: Any):
        self.worker = worker
        self._lock = threading.Lock()
        self.prompt_tokens = self.predicted_tokens = 0
        self.prompt_seconds = self.predicted_seconds = 0.0
        self.n_tokens_max = 0
        self._window = [0, 0.0, 0, 0.0]  # prompt tokens, seconds, predicted tokens, seconds
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self)

    def record(self, timings: dict) -> None:
        """One finished generation's timings (runtime.worker: prompt_n, prompt_ms,
        predicted_n, predicted_ms)."""
        prompt_n, predicted_n = int(timings["prompt_n"]), int(timings["predicted_n"])
        prompt_s, predicted_s = timings["prompt_ms"] / 1000, timings["predicted_ms"] / 1000
        with self._lock:
            self.prompt_tokens += prompt_n
            self.prompt_seconds += prompt_s
            self.predicted_tokens += predicted_n
            self.predicted_seconds += predicted_s
            self.n_tokens_max = max(self.n_tokens_max, prompt_n + predicted_n)
            window = self._window
            window[0] += prompt_n
            window[1] += prompt_s
            window[2] += predicted_n
            window[3] += predicted_s

    def render(self) -> bytes:
        """The text a scrape gets (and the throughput window starts anew)."""
        return generate_latest(self._registry)

    def collect(self):
        """prometheus_client's collector protocol: the families, read now."""
        with self._lock:
            totals = (self.prompt_tokens, self.prompt_seconds, self.predicted_tokens,
                      self.predicted_seconds, self.n_tokens_max)
            window, self._window = self._window, [0, 0.0, 0, 0.0]
        slots = self.worker.slots_state() if self.worker.state == "ok" else []
        counters = (
            ("prompt_tokens", "Number of prompt tokens processed", totals[0]),
            ("prompt_seconds", "Total time spent processing prompts", totals[1]),
            ("tokens_predicted", "Number of generation tokens processed", totals[2]),
            ("tokens_predicted_seconds", "Total time spent generating tokens", totals[3]),
        )
        for name, text, value in counters:  # the family adds llama.cpp's "_total"
            yield CounterMetricFamily(f"llamacpp:{name}", text, value=value)
        gauges = (
            ("n_tokens_max", "Largest observed sequence length (prompt + generation)", totals[4]),
            ("prompt_tokens_seconds", "Average prompt throughput in tokens/s",
             window[0] / window[1] if window[1] > 0 else 0.0),
            ("predicted_tokens_seconds", "Average generation throughput in tokens/s",
             window[2] / window[3] if window[3] > 0 else 0.0),
            ("requests_processing", "Number of requests processing",
             sum(1 for s in slots if s.get("is_processing"))),
            ("requests_deferred", "Number of requests deferred", self.worker.n_waiting),
        )
        for name, text, value in gauges:
            yield GaugeMetricFamily(f"llamacpp:{name}", text, value=value)
