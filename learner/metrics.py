"""Per-step learner metrics: a JSON-lines file the audit view reads, and optional Prometheus.

Every step appends one line to ``<work_dir>/<run>/metrics.jsonl``: step, policy version, loss
parts, reward mean, advantage and ratio statistics, clip fraction, KL, entropy, tokens/s,
staleness verdicts and the lag histogram. With a port, the same numbers are exported as
Prometheus gauges labelled by run (each sink has its own registry, so several sinks can live
in one process). Knows nothing about training or Kafka.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricsSink:
    def __init__(self, path: Path, run: str, port: int | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, start_http_server

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.run = run
        self.registry = CollectorRegistry()
        self._gauges: dict[str, Any] = {}
        self._steps = Counter("nextstate_learner_optimizer_steps", "optimizer steps taken", ["run"],
                              registry=self.registry)
        self._samples = Counter("nextstate_learner_samples_seen", "samples seen by verdict",
                                ["run", "verdict"], registry=self.registry)
        self.server = start_http_server(port, registry=self.registry) if port else None

    def _gauge(self, name: str) -> Any:
        from prometheus_client import Gauge

        gauge = self._gauges.get(name)
        if gauge is None:
            gauge = Gauge(f"nextstate_learner_{name}", f"learner step metric {name}", ["run"],
                          registry=self.registry)
            self._gauges[name] = gauge
        return gauge

    def record(self, step: int, version: int, metrics: dict[str, float],
               verdicts: dict[str, int], lag_histogram: dict[str, int]) -> dict[str, Any]:
        line = {"time": time.time(), "run": self.run, "step": step, "version": version,
                **metrics, "verdicts": verdicts, "staleness": lag_histogram}
        with self.path.open("a") as fh:
            fh.write(json.dumps(line) + "\n")
        self._steps.labels(self.run).inc()
        for name, value in metrics.items():
            self._gauge(name).labels(self.run).set(value)
        for verdict, n in verdicts.items():
            self._samples.labels(self.run, verdict).inc(n)
        for bucket, n in lag_histogram.items():
            self._gauge(f"staleness_{bucket}").labels(self.run).set(n)
        return line

    def record_checkpoint(self, version: int, step: int, seconds: float, uri: str) -> None:
        """A published checkpoint and the time from the end of its step to its event."""
        line = {"time": time.time(), "run": self.run, "event": "checkpoint", "version": version,
                "step": step, "checkpoint_s": seconds, "uri": uri}
        with self.path.open("a") as fh:
            fh.write(json.dumps(line) + "\n")
        self._gauge("checkpoint_s").labels(self.run).set(seconds)
        self._gauge("version").labels(self.run).set(version)

    def close(self) -> None:
        if self.server is not None:
            server, thread = self.server
            server.shutdown()
            thread.join(timeout=5)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
