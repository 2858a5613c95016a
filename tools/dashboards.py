"""Grafana dashboards as code (grafana-foundation-sdk): the line, the models, the workers.

`inspection dashboards` writes them to deploy/grafana/dashboards/*.json, which Grafana provisions
(deploy/grafana/provisioning/). Grafana cannot run on the build machines, so every query is kept here
as data (`Panel.queries`) and the suite runs each one, template variables substituted, against the real
Prometheus of the test stack (tests/test_dashboards.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

DATASOURCE = DataSourceRef(type_val="prometheus", uid="inspection-prometheus")  # provisioned with this uid
OUT_DIR = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards"
CATEGORY = 'category=~"$category"'
RATE = "$__rate_interval"


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[tuple[str, str], ...]  # (PromQL, legend)
    unit: str = "short"
    kind: str = "timeseries"  # or "stat"
    description: str = ""


@dataclass(frozen=True)
class Board:
    uid: str
    title: str
    description: str
    rows: tuple[tuple[str, tuple[Panel, ...]], ...]

    def panels(self) -> Iterator[Panel]:
        for _title, panels in self.rows:
            yield from panels


def _quantiles(metric: str, by: str = "") -> tuple[tuple[str, str], ...]:
    labels = f"le{', ' + by if by else ''}"
    legend = f"{{{{{by}}}}} " if by else ""
    return tuple((f"histogram_quantile({q}, sum by ({labels}) (rate({metric}_bucket[{RATE}])))", f"{legend}p{int(q * 100)}")
                 for q in (0.5, 0.95, 0.99))


def _ratio(numerator: str, denominator: str, by: str) -> str:
    """numerator / denominator by label, 0 (not empty) where the numerator has no series yet."""
    return (f"(sum by ({by}) (rate({numerator}[{RATE}])) or sum by ({by}) (rate({denominator}[{RATE}])) * 0)"
            f" / sum by ({by}) (rate({denominator}[{RATE}]))")


LINE = Board(
    uid="inspection-line", title="Inspection: line overview",
    description="Throughput, latency, lag, decisions, dead letters and unknown products of the whole line.",
    rows=(
        ("Flow", (
            Panel("Results per second", ((f"sum by (category) (rate(inspection_results_out_total{{{CATEGORY}}}[{RATE}]))",
                                          "{{category}}"),), "reqps"),
            Panel("End-to-end latency (capture to result)", _quantiles("inspection_end_to_end_seconds"), "s"),
            Panel("Frames waiting (consumer lag)", (("sum by (worker) (inspection_consumer_lag)", "{{worker}}"),)),
            Panel("Results so far", (("sum(inspection_results_out_total)", "results"),), kind="stat"),
        )),
        ("Decisions", (
            Panel("Decisions by category", ((f"sum by (category, decision) (rate(inspection_results_out_total{{{CATEGORY}}}[{RATE}]))",
                                             "{{category}} {{decision}}"),), "reqps"),
            Panel("Alarm rate by category", ((_ratio(f'inspection_results_out_total{{decision="defective", {CATEGORY}}}',
                                                     f"inspection_results_out_total{{{CATEGORY}}}", "category"),
                                              "{{category}}"),), "percentunit"),
            Panel("Unknown products", ((_ratio('inspection_results_out_total{decision="unknown"}',
                                               "inspection_results_out_total", "job"), "unknown share"),), "percentunit"),
            Panel("Dead letters by reason", ((f"sum by (reason) (rate(inspection_errors_total[{RATE}]))", "{{reason}}"),),
                  "reqps"),
        )),
        ("Labelled frames (evaluation / QA)", (
            Panel("Live recall at the threshold", ((_ratio(
                f'inspection_labelled_frames_total{{truth="anomalous", decision="defective", {CATEGORY}}}',
                f'inspection_labelled_frames_total{{truth="anomalous", {CATEGORY}}}', "category"), "{{category}}"),),
                "percentunit", description="Share of labelled defective frames flagged."),
            Panel("Live false-alarm rate vs target", (
                (_ratio(f'inspection_labelled_frames_total{{truth="normal", decision="defective", {CATEGORY}}}',
                        f'inspection_labelled_frames_total{{truth="normal", {CATEGORY}}}', "category"), "{{category}}"),
                (f"max by (category) (inspection_false_alarm_target_ratio{{{CATEGORY}}})", "{{category}} target"),
            ), "percentunit"),
        )),
    ),
)

MODELS = Board(
    uid="inspection-models", title="Inspection: models and forgetting",
    description="Per task: audit quality through the live path and forgetting, calibration, drift, training.",
    rows=(
        ("Forgetting and audit quality (monitor)", (
            Panel("Forgetting (best earlier - current, since the task's own last change)",
                  ((f"max by (category, metric) (inspection_forgetting{{{CATEGORY}}})", "{{category}} {{metric}}"),),
                  description="0 = nothing forgotten. Alert above 0.005."),
            Panel("Audit quality: AUROC, task-ID accuracy, recall, false-alarm rate",
                  ((f"max by (category, metric) (inspection_audit_value{{{CATEGORY}}})", "{{category}} {{metric}}"),),
                  "percentunit", description="Each task's audit set (never trained on) scored after every store change."),
            Panel("Audit task version", ((f"max by (category) (inspection_audit_task_version{{{CATEGORY}}})",
                                          "{{category}}"),)),
            Panel("Audit cost", (("max(inspection_audit_pass_seconds_sum / inspection_audit_pass_seconds_count)",
                                  "mean seconds per pass"),
                                 ("sum by (stage) (inspection_audit_frames_total)", "frames through {{stage}}"))),
        )),
        ("Tasks", (
            Panel("Tasks known", (("max(inspection_tasks_known)", "tasks"),), kind="stat"),
            Panel("Store version served", (("min by (worker) (inspection_store_version)", "{{worker}}"),)),
            Panel("Stored bytes per task", ((f"max by (category) (inspection_task_store_bytes{{{CATEGORY}}})",
                                             "{{category}}"),), "bytes"),
            Panel("False-alarm target per task", ((f"max by (category) (inspection_false_alarm_target_ratio{{{CATEGORY}}})",
                                                   "{{category}}"),), "percentunit"),
        )),
        ("Drift without labels", (
            Panel("Calibrated score (1 = threshold)", tuple(
                (f"histogram_quantile({q}, sum by (le, category) (rate(inspection_calibrated_score_bucket{{{CATEGORY}}}[{RATE}])))",
                 f"{{{{category}}}} p{int(q * 100)}") for q in (0.5, 0.95)),
                description="A shift of the median or the tail is drift, before any label says so."),
        )),
        ("Training", (
            Panel("Training time per task", ((f"sum by (expert) (rate(inspection_training_seconds_sum[{RATE}])) "
                                              f"/ sum by (expert) (rate(inspection_training_seconds_count[{RATE}]))",
                                              "{{expert}}"),
                                             ("max by (expert) (inspection_training_seconds_sum / inspection_training_seconds_count)",
                                              "{{expert}} mean so far")), "s"),
            Panel("Commands by outcome", (("sum by (action, outcome) (inspection_control_commands_total)",
                                           "{{action}} {{outcome}}"),)),
        )),
    ),
)

WORKERS = Board(
    uid="inspection-workers", title="Inspection: workers",
    description="Per worker: stage latency, batches, liveness, transactions, CPU and memory.",
    rows=(
        ("Stages", (
            Panel("Stage latency p95", ((f"histogram_quantile(0.95, sum by (le, stage) (rate(inspection_stage_seconds_bucket[{RATE}])))",
                                         "{{stage}}"),), "s"),
            Panel("Mean batch size", ((f"sum by (worker) (rate(inspection_batch_size_sum[{RATE}])) "
                                       f"/ sum by (worker) (rate(inspection_batch_size_count[{RATE}]))", "{{worker}}"),)),
        )),
        ("Health", (
            Panel("Seconds since last poll (liveness)", (("time() - inspection_last_poll_timestamp_seconds", "{{worker}}"),), "s"),
            Panel("Consumer restarts", (("sum by (worker) (inspection_consumer_restarts_total)", "{{worker}}"),)),
            Panel("Transactions", ((f"sum by (worker, outcome) (rate(inspection_transactions_total[{RATE}]))",
                                    "{{worker}} {{outcome}}"),), "reqps"),
            Panel("CPU", ((f'rate(process_cpu_seconds_total{{job="inspection"}}[{RATE}])', "{{worker}}"),), "percentunit"),
            Panel("Resident memory", (('process_resident_memory_bytes{job="inspection"}', "{{worker}}"),), "bytes"),
        )),
    ),
)

BOARDS = (LINE, MODELS, WORKERS)


# ------------------------------------------------------------------------------------- building
def build(board: Board) -> dict:
    """The Grafana dashboard JSON model of `board`."""
    builder = (
        dashboard.Dashboard(board.title).uid(board.uid).description(board.description)
        .tags(["inspection"]).refresh("10s").time("now-30m", "now").timezone("browser")
        .with_variable(_category_variable())
    )
    for title, panels in board.rows:
        builder = builder.with_row(dashboard.Row(title))
        for panel in panels:
            builder = builder.with_panel(_panel(panel))
    return json.loads(json.dumps(builder.build(), cls=JSONEncoder))


def _category_variable() -> dashboard.QueryVariable:
    return (dashboard.QueryVariable("category").label("Category").datasource(DATASOURCE)
            .query("label_values(inspection_results_out_total, category)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).multi(True).include_all(True).all_value(".*"))


def _panel(panel: Panel):
    kind = stat if panel.kind == "stat" else timeseries
    builder = (kind.Panel().title(panel.title).datasource(DATASOURCE).unit(panel.unit)
               .height(6 if panel.kind == "stat" else 8).span(6 if panel.kind == "stat" else 12))
    if panel.description:
        builder = builder.description(panel.description)
    for index, (expr, legend) in enumerate(panel.queries):
        builder = builder.with_target(prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(chr(65 + index)))
    return builder


def write_all(out_dir: Path = OUT_DIR) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for board in BOARDS:
        path = out_dir / f"{board.uid}.json"
        path.write_text(json.dumps(build(board), indent=2, sort_keys=True) + "\n")
        paths.append(path)
    return paths


def expressions(board_json: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel in a dashboard's JSON."""
    return [(panel.get("title", ""), target["expr"]) for panel in board_json.get("panels", [])
            for target in panel.get("targets", []) if "expr" in target]


def substitute(expr: str, rate_interval: str = "1m", category: str = ".*") -> str:
    """What Grafana sends for `expr`: template variables and $__rate_interval filled in."""
    return expr.replace("$__rate_interval", rate_interval).replace("$category", category)
