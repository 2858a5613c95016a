"""The main job: a real end-to-end run on the local stack, ending with a table of measured numbers.

Stack up -> control worker + N inference workers (real processes) -> one `add_category` command per
category on the control topic -> cameras stream the categories' test images, mixed -> results read
back from the results topic -> per-category image AUROC, task-identification accuracy, throughput,
latency. Without the shared datasets it synthesises categories from CC0 textures, so it always runs.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.datasets import SYNTHETIC_TEXTURES, discover_categories, write_synthetic_category
from pipeline.data.metrics import latency_summary, roc_auc
from schemas.config import StackConfig, TopicsConfig
from schemas.messages import AddCategory, Decision, InspectionResult
from tools.client import collect_results, read_dead_letters, send_commands, wait_for_outcomes
from tools.progress import fraction_bar
from tools.report import write_report
from tools.processes import WorkerProcess, spawn_worker, wait_for_store_version
from tools.simulator import dataset_stream, publish
from tools.stack import ALERT_RULES, LocalStack

DASHBOARDS_DIR = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards"

log = logging.getLogger(__name__)
DEFAULT_CATEGORIES = ("magnetic_tile", "ball_screw")


@dataclass(frozen=True)
class DemoOptions:
    stack: StackConfig
    dataset_root: Path
    categories: list[str] | None
    workers: int
    rate_fps: float
    limit_per_category: int | None
    max_train_images: int
    keep_running: bool
    report_path: Path | None


def run_demo(options: DemoOptions) -> int:
    topics = TopicsConfig()
    stack = LocalStack(options.stack, topics)
    root, categories = _dataset(options, stack.state_dir)
    _say(f"dataset root {root}, categories {categories}")
    _say("starting a fresh local stack (Kafka KRaft + Redis AOF + Prometheus) ...")
    stack.down(wipe=True)
    status = stack.up()
    workers: list[WorkerProcess] = []
    try:
        workers = _start_workers(stack, options.workers, root)
        training = _train(stack, topics, root, categories, options.max_train_images)
        serving = [w for w in workers if w.kind in ("infer", "monitor")]
        wait_for_store_version(serving, max(e["store_version"] for e in training.values()), timeout_s=600)
        audit = _audit(next(w for w in workers if w.kind == "monitor"))
        report, results, started = _stream_and_measure(stack, topics, root, categories, options)
        report.update(training=training, audit=audit, stack=status, workers={w.name: w.metrics_url for w in workers})
        time.sleep(2 * 2.0)  # two scrape intervals: Prometheus holds the stream's last samples
        report["html_report"] = str(write_report(stack.state_dir / "report.html", results, stack.prometheus_url,
                                                 started, time.time()))
        _print_report(report)
        if options.report_path:
            options.report_path.write_text(json.dumps(report, indent=2, default=str))
        return 0
    finally:
        if options.keep_running:
            _say("left running; stop with: inspection stack down (and kill the workers: see their pids above)")
        else:
            for worker in workers:
                worker.stop()
                stack.unregister_metrics_target(worker.name)
            stack.down()


def _dataset(options: DemoOptions, state_dir: Path) -> tuple[Path, list[str]]:
    wanted = options.categories or list(DEFAULT_CATEGORIES)
    root = options.dataset_root.expanduser().resolve()
    if root.is_dir() and set(wanted) <= set(discover_categories(root)):
        return root, wanted
    synthetic_root = state_dir.parent / ".demo-data"
    _say(f"{root} lacks {wanted}: synthesising texture categories under {synthetic_root}")
    names = [f"synthetic_{texture}" for texture in SYNTHETIC_TEXTURES[:2]]
    for name, texture in zip(names, SYNTHETIC_TEXTURES):
        write_synthetic_category(synthetic_root, name, texture, n_train=80, n_test_good=30, n_test_defect=30)
    return synthetic_root, names


def _start_workers(stack: LocalStack, count: int, training_root: Path) -> list[WorkerProcess]:
    log_dir = stack.state_dir / "logs"
    common = dict(bootstrap=stack.config.bootstrap_servers, redis_url=stack.config.redis_url, log_dir=log_dir)
    # One torch thread per inference worker: N single-threaded workers beat N oversubscribed ones.
    workers = [spawn_worker("control", "control-0", extra_args=("--training-root", str(training_root)), **common)]
    workers += [spawn_worker("infer", f"infer-{i}", threads=1, **common) for i in range(count)]
    workers.append(spawn_worker("monitor", "monitor-0", threads=1, **common))  # audit sets after every store change
    for worker in workers:
        stack.register_metrics_target(worker.name, f"127.0.0.1:{worker.metrics_port}")
        _say(f"{worker.name} (pid {worker.popen.pid}) metrics {worker.metrics_url}, log {worker.log_path}")
    return workers


def _train(stack: LocalStack, topics: TopicsConfig, root: Path, categories: list[str], max_train: int) -> dict:
    commands = [
        AddCategory(category=c, train_dir=str(root / c / "train" / "good"), max_train_images=max_train)  # expert and spec: the automatic choice
        for c in categories
    ]
    _say(f"control topic: add_category x{len(commands)}; training one task at a time ...")
    started = time.monotonic()
    ids = send_commands(stack.config.bootstrap_servers, topics, commands)
    with fraction_bar("training") as on_progress:
        outcomes = wait_for_outcomes(stack.config.bootstrap_servers, topics, ids, 3600,
                                     on_event=_overall_progress(ids, on_progress))
    training = {}
    for command in commands:
        event = outcomes[command.command_id]
        if event.kind.value != "finished":
            raise RuntimeError(f"training {command.category} failed: {event.message}")
        training[command.category] = {"store_version": event.store_version, **event.details}
        _say(f"  {command.category}: {event.message} ({event.details.get('training_seconds')} s)")
    _say(f"all categories live after {time.monotonic() - started:.0f}s")
    return training


def _audit(monitor: WorkerProcess) -> dict[str, dict[str, float]]:
    """Per category: the monitor's audit values and forgetting once every task is live (after the last
    add, so the first category's forgetting says what adding the others did to it)."""
    audit: dict[str, dict[str, float]] = {}
    for name, prefix in (("inspection_audit_value", ""), ("inspection_forgetting", "forgetting_")):
        for labels, value in monitor.samples(name):
            audit.setdefault(labels["category"], {})[prefix + labels["metric"]] = value
    return audit


def _overall_progress(command_ids: list[str], on_progress):
    """Training events of several commands (run one after another) as one fraction."""
    position = {command_id: index for index, command_id in enumerate(command_ids)}

    def on_event(event) -> None:
        done = 1.0 if event.kind.value in ("finished", "failed") else (event.progress or 0.0)
        on_progress((position[event.command_id] + done) / len(command_ids), f"{event.category}: {event.message}")

    return on_event


def _stream_and_measure(stack, topics, root: Path, categories: list[str], options: DemoOptions
                        ) -> tuple[dict, list[InspectionResult], float]:
    """The stream's numbers, its results in publishing order, and when publishing started (Unix time)."""
    items = dataset_stream(root, categories, options.limit_per_category, seed=0)
    _say(f"cameras: publishing {len(items)} test frames at {options.rate_fps:g} frames/s ...")
    started = time.time()
    sent = publish(stack.config.bootstrap_servers, topics, items, options.rate_fps)
    results, duplicates = collect_results(stack.config.bootstrap_servers, topics, [f.frame_id for f in sent], 600)
    dead = read_dead_letters(stack.config.bootstrap_servers, topics, 2)
    ordered = [results[f.frame_id] for f in sent if f.frame_id in results]
    finished = max(r.processed_at.timestamp() for r in ordered) if ordered else time.time()
    return ({
        "frames_published": len(sent),
        "results": len(ordered),
        "missing_results": len(sent) - len(ordered),
        "duplicate_results": duplicates,
        "dead_letters": len(dead),
        "frames_per_second": len(ordered) / max(finished - started, 1e-9),
        "latency_ms": latency_summary([r.latency.end_to_end_ms for r in ordered]),
        "stage_ms": {
            stage: float(np.mean([getattr(r.latency, f"{stage}_ms") for r in ordered]))
            for stage in ("decode", "features", "task_id", "expert", "encode")
        },
        "categories": {c: _category_numbers(c, [r for r in ordered if r.ground_truth.category == c]) for c in categories},
        "metrics_urls": {"prometheus": stack.prometheus_url},
    }, ordered, started)


def _category_numbers(category: str, results: list[InspectionResult]) -> dict:
    labels = [r.ground_truth.is_anomalous for r in results]
    # A frame routed to no task or to the wrong task cannot be judged normal: score it as anomalous.
    scores = [r.score_raw if r.category == category and r.score_raw is not None else np.inf for r in results]
    decided = [r for r in results if r.decision != Decision.UNKNOWN]
    return {
        "frames": len(results),
        "anomalous": int(sum(labels)),
        "image_auroc": roc_auc(labels, scores),
        "task_id_accuracy": float(np.mean([r.category == category for r in results])) if results else float("nan"),
        "unknown": sum(r.decision == Decision.UNKNOWN for r in results),
        "defect_recall": _rate([r.decision == Decision.DEFECTIVE for r in decided if r.ground_truth.is_anomalous]),
        "false_alarm_rate": _rate([r.decision == Decision.DEFECTIVE for r in decided if not r.ground_truth.is_anomalous]),
    }


def _rate(flags: list[bool]) -> float:
    return float(np.mean(flags)) if flags else float("nan")


def _print_report(report: dict) -> None:
    rows = [
        "| category | frames | anomalous | image AUROC | task-ID acc. | unknown | recall @thr | false alarms @thr |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, c in report["categories"].items():
        rows.append(
            f"| {name} | {c['frames']} | {c['anomalous']} | {c['image_auroc']:.4f} | {c['task_id_accuracy']:.4f} "
            f"| {c['unknown']} | {c['defect_recall']:.3f} | {c['false_alarm_rate']:.3f} |"
        )
    latency, stages = report["latency_ms"], report["stage_ms"]
    rows += [
        "",
        f"frames published {report['frames_published']}, results {report['results']} "
        f"(missing {report['missing_results']}, duplicates {report['duplicate_results']}), dead letters {report['dead_letters']}",
        f"throughput {report['frames_per_second']:.2f} frames/s; end-to-end latency p50 {latency['p50']:.0f} ms, "
        f"p95 {latency['p95']:.0f} ms, max {latency['max']:.0f} ms",
        "mean stage ms (batched stages per batch): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()),
        "training (automatic choice): " + "; ".join(
            f"{name}: {t.get('expert')} @ {t.get('input_spec')}, {t.get('expert_ms_per_frame')} ms/frame, "
            f"{t['training_seconds']} s, {t['stored_bytes'] / 1e6:.2f} MB stored" for name, t in report["training"].items()
        ),
        "audit sets (forgetting monitor, after every add): " + "; ".join(
            f"{name}: image AUROC {a.get('image_auroc', float('nan')):.4f}, task-ID {a.get('task_id_accuracy', float('nan')):.3f}, "
            f"forgetting max {max((v for k, v in a.items() if k.startswith('forgetting_')), default=0.0):.4f}"
            for name, a in report["audit"].items()) if report.get("audit") else "audit sets: none reported",
        f"metrics: Prometheus {report['metrics_urls']['prometheus'] or '(not installed)'}; workers "
        + ", ".join(report["workers"].values()),
        f"dashboards: {DASHBOARDS_DIR}/*.json (provisioned by {DASHBOARDS_DIR.parent / 'provisioning'}); "
        f"alert rules: {ALERT_RULES} (loaded by the Prometheus above)",
        f"HTML report: {report['html_report']}",
    ]
    print("\n".join(rows), flush=True)


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)
