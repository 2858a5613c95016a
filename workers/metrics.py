"""Prometheus metrics of the workers. Each worker owns its registry (no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server

STAGES = ("decode", "features", "task_id", "expert", "encode")
# Up to 30 minutes: a backlog after an outage makes end-to-end latency minutes long, and a quantile
# can never exceed the top finite bucket (a 30 s top bucket reported 30 s for a real p95 of 52 s).
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120,
                    300, 600, 1800)


class ConsumerMetrics:
    """What every Kafka-consuming worker reports about its consumer: liveness and restarts."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        ProcessCollector(registry=registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        self.last_poll = Gauge(
            "inspection_last_poll_timestamp_seconds", "Unix time the consumer's last poll returned (liveness)",
            registry=registry,
        )
        self.consumer_restarts = Counter(
            "inspection_consumer_restarts_total", "Consumers found stuck and restarted", registry=registry
        )


class InferenceMetrics(ConsumerMetrics):
    def __init__(self, registry: CollectorRegistry):
        super().__init__(registry)
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
            "inspection_consumer_lag", "Frames not yet consumed (end offset - position), per assigned partition",
            ["partition"], registry=registry,
        )
        # Drift and live quality, per product (bounded labels: categories, two truths, three decisions).
        self.calibrated_score = Histogram(
            "inspection_calibrated_score", "Calibrated image score per predicted category (1 = the threshold)",
            ["category"], buckets=(0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2, 3, 5, 10), registry=registry,
        )
        self.labelled_frames = Counter(
            "inspection_labelled_frames_total", "Frames carrying ground truth (evaluation / QA), by true category, "
            "truth (normal|anomalous) and decision", ["category", "truth", "decision"], registry=registry,
        )
        self.false_alarm_target = Gauge(
            "inspection_false_alarm_target_ratio", "False-alarm rate each task's threshold was calibrated for",
            ["category"], registry=registry,
        )
        self.transactions = Counter(
            "inspection_transactions_total", "Result transactions, by outcome (committed, aborted)", ["outcome"],
            registry=registry,
        )

    def set_false_alarm_targets(self, targets: dict[str, float]) -> None:
        """Exactly the tasks served now (a removed task's series goes)."""
        self.false_alarm_target.clear()
        for category, target in targets.items():
            self.false_alarm_target.labels(category).set(target)

    def set_lag(self, lag: dict[int, int]) -> None:
        """Lag of exactly the partitions assigned now: a revoked partition's series is removed, so the sum
        over workers never counts a partition twice."""
        for labels in list(self.consumer_lag._metrics):  # noqa: SLF001 - prometheus_client has no public listing
            if int(labels[0]) not in lag:
                self.consumer_lag.remove(*labels)
        for partition, value in lag.items():
            self.consumer_lag.labels(str(partition)).set(value)


class ControlMetrics(ConsumerMetrics):
    def __init__(self, registry: CollectorRegistry):
        super().__init__(registry)
        self.commands = Counter(
            "inspection_control_commands_total", "Control commands handled", ["action", "outcome"], registry=registry
        )
        self.training_seconds = Histogram(
            "inspection_training_seconds", "Time to train one task", ["expert"],
            buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800), registry=registry,
        )
        self.tasks_known = Gauge("inspection_tasks_known", "Tasks in the store", registry=registry)
        self.busy = Gauge("inspection_control_busy", "1 while a command is being carried out", registry=registry)
        self.task_bytes = Gauge("inspection_task_store_bytes", "Stored bytes per task", ["category"], registry=registry)
        self.store_used_bytes = Gauge("inspection_store_used_bytes", "Memory Redis uses", registry=registry)
        self.store_limit_bytes = Gauge("inspection_store_limit_bytes", "Redis' maxmemory (0: unbounded)",
                                       registry=registry)


def serve(registry: CollectorRegistry, host: str, port: int) -> int:
    """Expose the registry on http://host:port/metrics in a daemon thread; returns the bound port."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server.server_port


class MonitorMetrics:
    """The forgetting monitor's view of every task's audit set (pipeline/core/audit.py)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        ProcessCollector(registry=registry)
        self.audit_value = Gauge(
            "inspection_audit_value", "A task's quality on its audit set through the live path, by metric "
            "(image_auroc, pixel_auroc, task_id_accuracy, false_alarm_rate, recall)", ["category", "metric"],
            registry=registry,
        )
        self.forgetting = Gauge(
            "inspection_forgetting", "Best earlier audit value minus the current one, since the task's own last "
            "change (for false_alarm_rate: current minus best); 0 = nothing forgotten", ["category", "metric"],
            registry=registry,
        )
        self.audit_task_version = Gauge("inspection_audit_task_version", "Task version the audit values are of",
                                        ["category"], registry=registry)
        self.store_version = Gauge("inspection_store_version", "Store version served", registry=registry)
        self.pass_seconds = Histogram("inspection_audit_pass_seconds", "Time to score every audit set once",
                                      buckets=(0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600), registry=registry)
        self.frames_scored = Counter("inspection_audit_frames_total", "Audit frames scored, by stage (routing: "
                                     "every frame each pass; expert: only where routing or the task changed)",
                                     ["stage"], registry=registry)

    def publish(self, reports) -> None:
        """Exactly the categories reported now: a removed task's series go."""
        for gauge in (self.audit_value, self.forgetting, self.audit_task_version):
            gauge.clear()
        for report in reports:
            self.audit_task_version.labels(report.category).set(report.task_version)
            for name, value in report.values.items():
                self.audit_value.labels(report.category, name).set(value)
            for name, value in report.forgetting.items():
                self.forgetting.labels(report.category, name).set(value)
            self.frames_scored.labels("routing").inc(report.frames)
            self.frames_scored.labels("expert").inc(report.expert_frames_run)
