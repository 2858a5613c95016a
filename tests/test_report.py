"""The HTML run report (tools/report.py): content from synthetic results and fake Prometheus points,
the real Prometheus of the session stack, and a render in headless Chromium.

The Chromium check: the report carries a tiny inline script that, on the window's load event, writes
into <body> how many <img> elements decoded (`complete && naturalWidth > 0`) and how many did not.
`chromium --headless --dump-dom` prints the DOM after the load event, so those attributes are the
browser's own verdict on every image; the test compares them with the number of <img> tags in the
file and, as a control that the check can fail, renders a copy with one image corrupted. A screenshot
of the same file must exist and not be blank (more than one colour, with gallery colours in it).
"""

from __future__ import annotations

import base64
import html
import io
import re
import shutil
import subprocess
import time
import uuid
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from schemas.messages import Box, Decision, GroundTruth, InspectionResult, StageLatency
from tools import report
from tools.report import Series, query_range, write_report

T0 = 1_700_000_000.0
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")


# ------------------------------------------------------------------------------------------ fixtures
def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


def _frame_file(folder: Path, name: str, hw: tuple[int, int], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    base = np.linspace(40, 200, hw[1], dtype=np.float32)[None, :, None] + rng.normal(0, 12, (*hw, 3))
    path = folder / f"{name}.png"
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(path)
    return path


def _map_png(hw: tuple[int, int], box: tuple[int, int, int, int] | None) -> bytes:
    values = np.full(hw, 30, dtype=np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        values[y0:y1, x0:x1] = 230
    return _png(values)


def _result(index: int, category: str | None, decision: Decision, score: float, truth: GroundTruth | None,
            hw: tuple[int, int] = (96, 128), box: tuple[int, int, int, int] | None = None) -> InspectionResult:
    captured = datetime.fromtimestamp(T0 + 2 * index, timezone.utc)
    known = decision != Decision.UNKNOWN
    return InspectionResult(
        frame_id=f"frame-{index:03d}", camera_id="cam-<1>", captured_at=captured,
        processed_at=captured + timedelta(milliseconds=150 + 10 * index), worker_id="w-1",
        category=category if known else None, task_confidence=0.5, task_distance=1.0 if known else None,
        expert="patchcore" if known else None, score_raw=2.0 * score if known else None,
        score=score if known else None, threshold=2.0 if known else None, decision=decision,
        anomaly_map_png=_map_png(hw, box) if known else None, map_max_score=4.0 if known else None,
        boxes=[Box(x0=box[0], y0=box[1], x1=box[2], y1=box[3], area=(box[2] - box[0]) * (box[3] - box[1]),
                   peak_score=3.0)] if box else [],
        latency=StageLatency(decode_ms=1, features_ms=5, task_id_ms=1, expert_ms=20, encode_ms=2,
                             end_to_end_ms=150 + 10 * index),
        store_version=3, task_version=1, ground_truth=truth,
    )


@pytest.fixture
def synthetic_results(tmp_path: Path) -> list[InspectionResult]:
    """'brick' (ground truth: 3 caught defects, 2 missed, 1 false alarm, 4 correct normals, 1 unknown),
    'tile' without ground truth (3 alarms, 2 ok: no source file, so a grey canvas under the map)."""
    results, index = [], 0

    def add(category, decision, score, anomalous=None, defect="good", source=True, box=None, true_category=None):
        nonlocal index
        truth = None
        if anomalous is not None:
            path = _frame_file(tmp_path, f"f{index}", (96, 128), index) if source else None
            truth = GroundTruth(category=true_category or category, is_anomalous=anomalous, defect=defect,
                                source=str(path) if path else None)
        results.append(_result(index, category, decision, score, truth, box=box))
        index += 1

    for score in (3.0, 2.0, 1.5):
        add("brick", Decision.DEFECTIVE, score, anomalous=True, defect="crack", box=(20, 30, 60, 70))
    add("brick", Decision.OK, 0.9, anomalous=True, defect="<scratch>")
    add("brick", Decision.OK, 0.4, anomalous=True, defect="hole")
    add("brick", Decision.DEFECTIVE, 1.2, anomalous=False, box=(5, 5, 20, 15))
    for score in (0.1, 0.2, 0.3, 0.5):
        add("brick", Decision.OK, score, anomalous=False)
    add("brick", Decision.UNKNOWN, 0.0, anomalous=True, defect="crack")
    for score, decision in ((2.5, Decision.DEFECTIVE), (1.1, Decision.DEFECTIVE), (0.2, Decision.OK), (0.3, Decision.OK)):
        truthless = _result(index, "tile", decision, score, None, box=(10, 10, 40, 40) if score > 1 else None)
        results.append(truthless)
        index += 1
    results.append(_result(index, "tile", Decision.DEFECTIVE, 1.05, None, box=(0, 0, 128, 96)))
    return results


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.external: list[str] = []
        self.sections: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.srcs.append(attrs.get("src") or "")
        for name in ("src", "href"):
            value = attrs.get(name)
            if value and not value.startswith(("data:", "#")):
                self.external.append(value)
        if tag == "link" or (tag == "script" and attrs.get("src")):
            self.external.append(tag)
        if tag == "section":
            self.sections.append(attrs.get("data-category", attrs.get("id", "")))


def _parse(text: str) -> _Images:
    parser = _Images()
    parser.feed(text)
    return parser


def _decode_uri(uri: str) -> Image.Image:
    match = re.fullmatch(r"data:image/(jpeg|png);base64,([A-Za-z0-9+/=]+)", uri)
    assert match, uri[:80]
    image = Image.open(io.BytesIO(base64.b64decode(match.group(2), validate=True)))
    image.load()
    return image


def _sections(text: str) -> dict[str, str]:
    """Each <section>'s HTML by its data-category (the line-wide one as "line")."""
    sections = {}
    for attributes, body in re.findall(r"<section ([^>]*)>(.*?)</section>", text, flags=re.S):
        name = re.search(r'data-category="([^"]*)"', attributes)
        sections[html.unescape(name.group(1)) if name else "line"] = body
    return sections


def _plots(section: str) -> dict[str, str]:
    """Each inline SVG plot of a section by its title."""
    return {m.group(1): m.group(0) for m in re.finditer(r'<svg[^>]*aria-label="([^"]+)".*?</svg>', section, flags=re.S)}


class FakePrometheus:
    """query_range stand-in: a ramp for every expression except those naming `empty`; records calls."""

    def __init__(self, empty: str = "tile") -> None:
        self.calls: list[tuple[str, float, float, float]] = []
        self.empty = empty

    def __call__(self, url, expr, start, end, step):
        self.calls.append((expr, start, end, step))
        if f'category="{self.empty}"' in expr:
            return []
        times = np.arange(start, end + step, step)
        values = 0.5 + 0.4 * np.sin(np.linspace(0, 3, len(times)))
        return [Series({}, [(float(t), float(v)) for t, v in zip(times, values)])]


# ------------------------------------------------------------------------------------------ unit
def test_report_has_sections_operating_points_and_decodable_images(tmp_path, synthetic_results) -> None:
    prometheus = FakePrometheus(empty="tile")
    path = write_report(tmp_path / "out" / "report.html", synthetic_results, "http://prom.invalid:9090",
                        T0, T0 + 60, query=prometheus, max_gallery=12)
    text = path.read_text()
    parsed = _parse(text)
    assert parsed.sections == ["line", "brick", "tile"]
    assert parsed.external == [], "the report must not fetch anything"
    # brick: 4 flagged (3 defects + 1 false alarm), 2 missed; tile: 3 flagged, no ground truth.
    assert len(parsed.srcs) == 4 + 2 + 3
    sizes = {_decode_uri(src).size for src in parsed.srcs}
    assert sizes == {(128, 96)}, sizes  # frames smaller than the thumbnail width keep their size
    assert "Flagged frames (4 of 4, highest score first)" in text
    assert "Missed defects (2 of 2: truly anomalous, decided ok)" in text
    assert "no ground truth for this category" in text  # tile
    # Operating point of brick: recall 3/5 over decided defects, false-alarm rate 1/5, one unknown.
    sections = _sections(text)
    brick, tile = sections["brick"], sections["tile"]
    assert "<th>recall @ threshold</th><td>0.600</td>" in brick
    assert "<th>false-alarm rate @ threshold</th><td>0.200</td>" in brick
    assert "<th>unknown (no task matched)</th><td>1</td>" in brick
    assert "<th>threshold (raw score)</th><td>2</td>" in brick
    # Flagged frames in score order: frame-000 (3.0) before frame-001 (2.0) before frame-005 (1.2).
    order = [brick.index(f"<b>frame-{i:03d}</b>") for i in (0, 1, 5)]
    assert order == sorted(order)
    # Plots: Prometheus series drawn where the fake has points, "no metrics" where it has none.
    assert text.count("<svg") == 3 + 2 * 3
    plots = {"Throughput (results/s)", "End-to-end latency (s)", "Alarm rate (defective / all)"}
    assert set(_plots(brick)) == set(_plots(tile)) == plots
    assert all("<polyline" in svg for svg in _plots(sections["line"]).values())
    assert all("<polyline" in svg for svg in _plots(brick).values())  # the latency plot: the line's p95
    assert _plots(brick)["End-to-end latency (s)"].count("<circle") == 11  # one point per brick frame
    for title in ("Throughput (results/s)", "Alarm rate (defective / all)"):
        assert "no metrics: Prometheus has no samples" in _plots(tile)[title]
        assert "<polyline" not in _plots(tile)[title]
    exprs = [call[0] for call in prometheus.calls]
    assert 'sum(rate(inspection_results_out_total{category="brick"}[60s]))' in exprs
    assert any("histogram_quantile(0.95" in expr and "inspection_end_to_end_seconds_bucket" in expr for expr in exprs)
    assert all(call[1:3] == (T0, T0 + 60) for call in prometheus.calls)
    # Every text from a result is escaped.
    assert "cam-&lt;1&gt;" in text and "&lt;scratch&gt;" in text and "<scratch>" not in text
    assert len(text) < 1_000_000


def test_overlay_draws_heat_and_boxes_on_the_source_frame(tmp_path) -> None:
    frame = Image.new("RGB", (512, 256), (100, 100, 100))
    heat = np.zeros((256, 512), dtype=np.uint8)
    heat[:, 256:] = 255
    thumb = Image.open(io.BytesIO(report.overlay_thumbnail(
        frame, _png(heat), [Box(x0=40, y0=40, x1=200, y1=200, area=1, peak_score=1.0)])))
    assert thumb.size == (256, 128)  # 256 wide, aspect kept
    pixels = np.asarray(thumb.convert("RGB"), dtype=int)
    cold, hot = pixels[64, 60], pixels[64, 200]
    assert hot[0] > hot[2] + 50 and cold[2] > cold[0] + 10  # red where the map is high, a blue tint where low
    assert pixels[60, 20].tolist() != pixels[60, 22].tolist()  # the box's left edge at x = 20
    grey = Image.open(io.BytesIO(report.overlay_thumbnail(None, _png(heat[:100, :100]), [])))
    assert grey.size == (100, 100)


def test_no_prometheus_and_no_results_still_render(tmp_path) -> None:
    text = write_report(tmp_path / "empty.html", [], None, T0, T0 + 30).read_text()
    assert text.count("no metrics: no Prometheus for this run") == 3
    assert "no results in this run" in text and "<img" not in text
    refused = write_report(tmp_path / "down.html", [], "http://127.0.0.1:9", T0, T0 + 30).read_text()
    assert refused.count("unreachable") == 3


def test_query_range_reports_an_unreachable_server() -> None:
    with pytest.raises(report.PrometheusError, match="unreachable"):
        query_range("http://127.0.0.1:9", "up", T0, T0 + 10, 1)


# ------------------------------------------------------------------------------------------ integration
@pytest.mark.integration
def test_report_from_the_stacks_prometheus(stack, tmp_path, free_ports, synthetic_results) -> None:
    """query_range against the real Prometheus: a category nothing reports gives "no metrics"; one whose
    results counter a probe target exports (scraped every 2 s) gives a plotted series."""
    if stack.prometheus_url is None:
        pytest.skip("prometheus is not installed")
    from prometheus_client import CollectorRegistry, Counter, start_http_server

    category = f"reportprobe{uuid.uuid4().hex[:8]}"
    registry = CollectorRegistry()
    counter = Counter("inspection_results_out", "probe", ["category", "decision"], registry=registry)
    (port,) = free_ports(1)
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    name = f"report-probe-{uuid.uuid4().hex[:6]}"
    start = time.time()
    expr = f'count_over_time(inspection_results_out_total{{category="{category}",decision="ok"}}[1m])'
    try:
        stack.register_metrics_target(name, f"127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            counter.labels(category, "ok").inc(5)
            counter.labels(category, "defective").inc(1)
            found = query_range(stack.prometheus_url, expr, time.time() - 5, time.time(), 1)
            if found and found[0].points and found[0].points[-1][1] >= 4:
                break
            time.sleep(0.5)
        else:
            pytest.fail("Prometheus did not scrape the probe 4 times within 60 s")
        end = time.time()
    finally:
        stack.unregister_metrics_target(name)
        server.shutdown()
        thread.join(timeout=5)

    # Names no other test's workers use (test_dashboards streams "brick" into the same Prometheus).
    silent = f"reportsilent{uuid.uuid4().hex[:8]}"
    probed = [r.model_copy(update={"category": category}) for r in synthetic_results if r.category == "tile"]
    quiet = [r.model_copy(update={"category": silent, "ground_truth": r.ground_truth.model_copy(update={"category": silent})})
             for r in synthetic_results[:10]]
    text = write_report(tmp_path / "live.html", quiet + probed, stack.prometheus_url, start, end).read_text()
    sections = _sections(text)
    assert set(_plots(sections[category])) == {"Throughput (results/s)", "End-to-end latency (s)",
                                               "Alarm rate (defective / all)"}
    for title in ("Throughput (results/s)", "Alarm rate (defective / all)"):
        assert "<polyline" in _plots(sections[category])[title], title  # drawn from the scraped probe
        assert "no metrics: Prometheus has no samples" in _plots(sections[silent])[title], title
        assert "<polyline" not in _plots(sections[silent])[title]
    points = query_range(stack.prometheus_url, report.alarm_rate_expr(category), start, end, 1)[0].points
    assert points and all(0.1 < v < 0.25 for _, v in points[-2:]), points[-3:]  # 1 defective per 5 ok


# ------------------------------------------------------------------------------------------ chromium
def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    command = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--no-default-browser-check", f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def _images_verdict(html_path: Path, profile: Path) -> dict[str, int]:
    done = _chromium("--virtual-time-budget=5000", "--dump-dom", html_path.as_uri(), profile=profile)
    assert done.returncode == 0, done.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", done.stdout)
    assert body, done.stdout[:2000]
    found = dict(re.findall(r'data-images-(total|loaded|broken)="(\d+)"', body.group(1)))
    assert set(found) == {"total", "loaded", "broken"}, f"the load-event script did not run: {body.group(0)}"
    found = {k: int(v) for k, v in found.items()}
    found["dom_data_imgs"] = len(re.findall(r'<img src="data:image/', done.stdout))
    return found


@needs_chromium
def test_chromium_renders_the_report_and_loads_every_image(tmp_path, synthetic_results) -> None:
    path = write_report(tmp_path / "report.html", synthetic_results, "http://prom.invalid:9090", T0, T0 + 60,
                        query=FakePrometheus())
    expected = len(_parse(path.read_text()).srcs)
    assert expected == 9
    verdict = _images_verdict(path, tmp_path / "profile")
    assert verdict == {"total": expected, "loaded": expected, "broken": 0, "dom_data_imgs": expected}

    screenshot = tmp_path / "report.png"
    done = _chromium(f"--screenshot={screenshot}", "--window-size=1280,2000", "--hide-scrollbars",
                     path.as_uri(), profile=tmp_path / "profile")
    assert done.returncode == 0 and screenshot.is_file(), done.stderr[-2000:]
    shot = Image.open(screenshot).convert("RGB")
    assert shot.size == (1280, 2000)
    colours = shot.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "the screenshot is blank"

    # Control: the same report with one image's bytes corrupted must be caught by the same check.
    text = path.read_text()
    first = text.index('src="data:image/jpeg;base64,') + len('src="data:image/jpeg;base64,')
    broken = tmp_path / "broken.html"
    broken.write_text(text[:first] + base64.b64encode(b"not a jpeg at all").decode() + '"'
                      + text[text.index('"', first) + 1:])
    assert _images_verdict(broken, tmp_path / "profile")["broken"] == 1
