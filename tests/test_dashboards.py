"""Grafana dashboards: generated JSON is what is committed, and every query works on the real Prometheus.

Grafana itself cannot run here. The integration test brings up a small line on the session's stack
(a control and an inference worker, one category added, labelled frames streamed, one corrupt frame).
It then sends every expression of every panel, template variables substituted the way Grafana would,
to the real Prometheus HTTP API. Each must return data, and the key panels the right numbers.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request

import pytest
import redis
import yaml

from pipeline.data.datasets import labeled_test_images, write_synthetic_category
from schemas.messages import AddCategory, EventKind, Frame
from tools.client import collect_results, read_dead_letters, send_commands, wait_for_outcomes
from tools.dashboards import BOARDS, DATASOURCE, OUT_DIR, build, expressions, substitute
from workers.kafka_io import make_producer, send_record
from tools.processes import spawn_worker, wait_for_store_version, wait_until
from tools.simulator import frame_of
from tools.stack import LocalStack

PROVISIONING = OUT_DIR.parent / "provisioning"
SCRAPE_INTERVAL_S = 2  # the local stack's Prometheus (tools/stack/prometheus_server.py)


@pytest.mark.parametrize("board", BOARDS, ids=lambda b: b.uid)
def test_committed_json_is_what_the_command_generates(board) -> None:
    committed = json.loads((OUT_DIR / f"{board.uid}.json").read_text())
    assert committed == build(board), "run `inspection dashboards` and commit the result"


@pytest.mark.parametrize("board", BOARDS, ids=lambda b: b.uid)
def test_every_panel_queries_the_provisioned_datasource(board) -> None:
    provisioned = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert [d["uid"] for d in provisioned] == [DATASOURCE.uid]
    model = build(board)
    assert [v["name"] for v in model["templating"]["list"]] == ["category"]
    panels = [p for p in model["panels"] if p["type"] != "row"]
    assert panels and all(p["datasource"]["uid"] == DATASOURCE.uid and p["targets"] for p in panels)


def _query(stack: LocalStack, expr: str) -> list:
    url = f"{stack.prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def _value(stack: LocalStack, expr: str) -> float | None:
    result = _query(stack, expr)
    return float(result[0]["value"][1]) if result else None


@pytest.fixture(scope="module")
def small_line(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory):
    """One category added and 12 labelled frames (plus a corrupt one) streamed, both workers scraped."""
    if stack.prometheus_url is None:
        pytest.skip("prometheus is not installed")
    data = tmp_path_factory.mktemp("dashboard-data")
    write_synthetic_category(data, "brick", "brick", n_train=24, n_test_good=6, n_test_defect=6, size=160)
    redis_url = stack.config.redis_url.rsplit("/", 1)[0] + "/2"
    redis.Redis.from_url(redis_url).flushdb()
    bootstrap, logs = stack.config.bootstrap_servers, stack.state_dir / "dashboard-logs"
    workers = [spawn_worker("control", "dash-control", bootstrap, redis_url, logs, threads=1,
                            extra_args=("--training-root", str(data))),
               spawn_worker("infer", "dash-infer", bootstrap, redis_url, logs, threads=1),
               spawn_worker("monitor", "dash-monitor", bootstrap, redis_url, logs, threads=1)]
    for worker in workers:
        stack.register_metrics_target(worker.name, f"127.0.0.1:{worker.metrics_port}")
    try:
        command = AddCategory(category="brick", train_dir=str(data / "brick" / "train" / "good"), expert="patchcore")
        outcome = wait_for_outcomes(bootstrap, stack.topics, send_commands(bootstrap, stack.topics, [command]),
                                    300)[command.command_id]
        assert outcome.kind == EventKind.FINISHED, outcome.message
        wait_for_store_version(workers[1:], outcome.store_version)  # inference and the monitor
        frames = [frame_of(item, "dash-cam", with_ground_truth=True) for item in labeled_test_images(data, "brick")]
        corrupt = Frame(camera_id="dash-cam", content_type="image/png", image=b"\x89PNG\r\n\x1a\n broken")
        producer = make_producer(bootstrap, stack.topics, client_id="dash-camera")
        for frame in [*frames, corrupt]:
            send_record(producer, stack.topics.frames, frame.to_record())
        producer.flush()
        producer.close()
        results, _ = collect_results(bootstrap, stack.topics, [f.frame_id for f in frames], 180)
        assert len(results) == len(frames)
        read_dead_letters(bootstrap, stack.topics, 60, until=lambda ls: any(l.frame_id == corrupt.frame_id for l in ls))
        # Scraped after the stream: the results counter has reached the frames sent.
        wait_until(lambda: _value(stack, 'sum(inspection_results_out_total{worker="dash-infer"})') == len(frames),
                   60, interval_s=1, what="Prometheus to scrape the results")
        # At least ours: records other tests left on the frames topic may be dead-lettered too.
        wait_until(lambda: (_value(stack, 'sum(inspection_errors_total{worker="dash-infer"})') or 0) >= 1, 30,
                   interval_s=1, what="the dead letter to be scraped")
        time.sleep(3 * SCRAPE_INTERVAL_S)  # rate() needs two samples of a series in its window, not one
        yield stack, len(frames)
    finally:
        for worker in workers:
            worker.stop()
            stack.unregister_metrics_target(worker.name)


@pytest.mark.integration
@pytest.mark.parametrize("board", BOARDS, ids=lambda b: b.uid)
def test_every_expression_of_every_panel_returns_data(small_line, board) -> None:
    stack, _ = small_line
    empty = [(title, expr) for title, expr in expressions(build(board)) if not _query(stack, substitute(expr))]
    assert not empty, f"panels without data: {empty}"


@pytest.mark.integration
def test_key_panels_show_the_right_numbers(small_line) -> None:
    stack, frames = small_line
    by_decision = _query(stack, 'sum by (category, decision) (inspection_results_out_total{worker="dash-infer"})')
    assert sum(float(r["value"][1]) for r in by_decision) == frames  # decisions add up to the frames sent
    assert {r["metric"]["category"] for r in by_decision} == {"brick"}
    assert _value(stack, 'max(inspection_tasks_known{worker="dash-infer"})') == 1  # the one category added
    # The monitor scored the task's audit set once, on the version published, and nothing is forgotten.
    assert _value(stack, 'max(inspection_forgetting{worker="dash-monitor", category="brick"})') == 0.0
    assert _value(stack, 'max(inspection_audit_task_version{worker="dash-monitor", category="brick"})') >= 1
    labelled = _value(stack, 'sum(inspection_labelled_frames_total{worker="dash-infer"})')
    assert labelled == frames  # every test frame carried ground truth
    assert (_value(stack, 'sum(inspection_errors_total{worker="dash-infer", reason="corrupt_image"})') or 0) \
        + (_value(stack, 'sum(inspection_errors_total{worker="dash-infer", reason="not_an_image"})') or 0) >= 1
