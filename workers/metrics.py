"""Prometheus metrics of the workers. Each worker owns its registry (no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

STAGES = ("decode", "features", "task_id", "expert", "encode")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class InferenceMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.frames_in = Counter("inspection_frames_in_total", "Frame records consumed", registry=registry)
        self.results_out = Counter(
            "inspection_results_out_total", "Results produced", ["category", "decision"], registry=registry
        )
        self.errors = Counter("inspection_errors_total", "Records dead-lettered, by reason", ["reason"], registry=registry)
        self.stage_seconds = Histogram(
            "inspection_stage_seconds", "Wall time per stage", ["stage"], buckets=_LATENCY_BUCKETS, registry=registry
        )
        self.end_to_end_seconds = Histogram(
            "inspection_end_to_end_seconds", "Capture timestamp to result produced", buckets=_LATENCY_BUCKETS, registry=registry
        )
        self.batch_size = Histogram(
            "inspection_batch_size", "Frames per micro-batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry
        )
        self.tasks_known = Gauge("inspection_tasks_known", "Tasks loaded from the store", registry=registry)
        self.store_version = Gauge("inspection_store_version", "Store version served", registry=registry)
        self.consumer_lag = Gauge(
            "inspection_consumer_lag", "Frames not yet consumed, per assigned partition", ["partition"], registry=registry
        )


class ControlMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.commands = Counter(
            "inspection_control_commands_total", "Control commands handled", ["action", "outcome"], registry=registry
        )
        self.training_seconds = Histogram(
            "inspection_training_seconds", "Time to train one task", ["expert"],
            buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800), registry=registry,
        )
        self.tasks_known = Gauge("inspection_tasks_known", "Tasks in the store", registry=registry)
        self.task_bytes = Gauge("inspection_task_store_bytes", "Stored bytes per task", ["category"], registry=registry)


def serve(registry: CollectorRegistry, host: str, port: int) -> int:
    """Expose the registry on http://host:port/metrics in a daemon thread; returns the bound port."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server.server_port
