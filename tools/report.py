"""A self-contained HTML report of one run: per category, what the line did and what it flagged.

`write_report(path, results, prometheus_url, start, end)` writes one HTML file that needs nothing else:
no external file, no CDN, no JavaScript to display (a Content-Security-Policy forbids any fetch but
`data:` images). It holds

- a line-wide section: frames, alarms, unknown products, latency from the results, and plots over the
  run of throughput, end-to-end p95 and alarm rate from Prometheus `query_range`;
- per category (the ground-truth category where frames carry one, else the predicted one):
  - the operating point: frames, alarms, unknown, routed elsewhere, the threshold(s) in use, recall and
    false-alarm rate at that threshold and image AUROC where ground truth exists;
  - plots over the run (inline SVG): throughput = sum(rate(inspection_results_out_total{category}))
    and alarm rate = defective / all of that counter, from Prometheus; latency = each frame's
    end-to-end time from its result, with the line-wide Prometheus p95 drawn over it (the end-to-end
    histogram has no category label);
  - a gallery of the flagged frames (highest score first) and of the missed defects (ground truth
    anomalous, decided ok): each the frame with its anomaly map blended over it as a heat layer and its
    boxes drawn, downscaled to a thumbnail and embedded as a base64 data URI.

A plot whose metrics are missing (no Prometheus, unreachable, or no samples in the window) says
"no metrics" and why. Every text from a result or a label is HTML-escaped.

The only network code is `query_range` (urllib against Prometheus' HTTP API); nothing here talks to
Kafka. Frames come from `image_loader(result)`: by default the file named by the result's
`ground_truth.source` (the simulator puts the source path there), else a grey canvas at the map's size.

A small inline script counts the `<img>` elements that decoded (`complete && naturalWidth > 0`) into
`data-images-*` attributes of `<body>` after the load event; it changes nothing on the page and lets a
headless browser test check that every image loads.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from pipeline.data.metrics import latency_summary, roc_auc
from schemas.messages import Box, Decision, InspectionResult

THUMB_WIDTH = 256
THUMB_MAX_HEIGHT = 384
JPEG_QUALITY = 82
MAX_GALLERY = 12
MAX_PLOT_POINTS = 600
PLOT_STEPS = 240  # query_range points per series over the run
UNKNOWN_GROUP = "unknown"

RESULTS_OUT = "inspection_results_out_total"
END_TO_END = "inspection_end_to_end_seconds"


class PrometheusError(RuntimeError):
    """Prometheus could not be asked, or refused the query; the message says which and why."""


class Series(NamedTuple):
    labels: dict[str, str]
    points: list[tuple[float, float]]  # (unix seconds, value), finite values only


QueryRange = Callable[[str, str, float, float, float], list[Series]]
ImageLoader = Callable[[InspectionResult], "Image.Image | None"]


# ------------------------------------------------------------------------------------------ Prometheus
def query_range(prometheus_url: str, expr: str, start: float, end: float, step: float,
                timeout_s: float = 10.0) -> list[Series]:
    """`/api/v1/query_range` of `expr`: one Series per result, NaN/Inf samples dropped.

    Raises PrometheusError when Prometheus cannot be reached or answers with an error.
    """
    params = urllib.parse.urlencode({"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                     "step": f"{max(step, 0.001):g}"})
    url = f"{prometheus_url.rstrip('/')}/api/v1/query_range?{params}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            body = json.load(response)
    except urllib.error.HTTPError as exc:  # 400/422/503 carry a JSON error body
        try:
            detail = json.load(exc).get("error", exc.reason)
        except (ValueError, OSError):
            detail = exc.reason
        raise PrometheusError(f"Prometheus refused the query ({exc.code}): {detail}") from None
    except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections, bad JSON
        raise PrometheusError(f"Prometheus at {prometheus_url} unreachable: {exc}") from None
    if body.get("status") != "success":
        raise PrometheusError(f"Prometheus query failed: {body.get('error', body)}")
    data = body.get("data", {})
    if data.get("resultType") != "matrix":
        raise PrometheusError(f"expected a range vector, got {data.get('resultType')!r}")
    series = []
    for item in data.get("result", []):
        points = [(float(t), float(v)) for t, v in item.get("values", [])]
        series.append(Series(dict(item.get("metric", {})), [(t, v) for t, v in points if math.isfinite(v)]))
    return series


def _label_value(value: str) -> str:
    """A PromQL string literal's content."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def throughput_expr(category: str | None, window: str = "1m") -> str:
    """Results per second, of one predicted category (None: all)."""
    selector = f'{{category="{_label_value(category)}"}}' if category is not None else ""
    return f"sum(rate({RESULTS_OUT}{selector}[{window}]))"


def alarm_rate_expr(category: str | None, window: str = "1m") -> str:
    """Defective / all results (0 while results come but none is defective; no sample without results)."""
    label = f'category="{_label_value(category)}"' if category is not None else ""
    defective = ", ".join(x for x in ('decision="defective"', label) if x)
    everything = f"sum(rate({RESULTS_OUT}{{{label}}}[{window}]))" if label else f"sum(rate({RESULTS_OUT}[{window}]))"
    return f"(sum(rate({RESULTS_OUT}{{{defective}}}[{window}])) or {everything} * 0) / {everything}"


def latency_p95_expr(window: str = "1m") -> str:
    """End-to-end p95 of the whole line (the histogram has no category label)."""
    return f"histogram_quantile(0.95, sum by (le) (rate({END_TO_END}_bucket[{window}])))"


@dataclass
class Panel:
    """One plot: its series (legend, points, 'line' | 'points') or, instead, why there are none."""

    title: str
    unit: str  # "per_s", "ratio", "seconds"
    series: list[tuple[str, list[tuple[float, float]], str]] = field(default_factory=list)
    note: str | None = None
    expr: str | None = None


def _prometheus_panel(title: str, unit: str, expr: str, legend: str, prometheus_url: str | None,
                      start: float, end: float, step: float, query: QueryRange) -> Panel:
    panel = Panel(title, unit, expr=expr)
    if prometheus_url is None:
        panel.note = "no metrics: no Prometheus for this run (not installed or not given)"
        return panel
    try:
        found = query(prometheus_url, expr, start, end, step)
    except PrometheusError as exc:
        panel.note = f"no metrics: {exc}"
        return panel
    points = sorted(p for s in found for p in s.points)
    if not points:
        panel.note = "no metrics: Prometheus has no samples for this in the run's window"
    else:
        panel.series.append((legend, points, "line"))
    return panel


def fetch_panels(prometheus_url: str | None, categories: Sequence[str], start: float, end: float,
                 query: QueryRange = query_range) -> dict[str | None, dict[str, Panel]]:
    """Prometheus panels of the run: key None = the whole line, else one dict per category."""
    step = max(1.0, math.ceil((end - start) / PLOT_STEPS))
    window = f"{int(max(60, 4 * step))}s"
    args = (prometheus_url, start, end, step, query)
    panels: dict[str | None, dict[str, Panel]] = {
        None: {
            "throughput": _prometheus_panel("Throughput (results/s, all categories)", "per_s",
                                            throughput_expr(None, window), "results/s", *args),
            "latency": _prometheus_panel("End-to-end latency p95 (all categories)", "seconds",
                                         latency_p95_expr(window), "p95", *args),
            "alarm_rate": _prometheus_panel("Alarm rate (defective / all)", "ratio",
                                            alarm_rate_expr(None, window), "alarm rate", *args),
        }
    }
    for category in categories:
        panels[category] = {
            "throughput": _prometheus_panel("Throughput (results/s)", "per_s",
                                            throughput_expr(category, window), "results/s", *args),
            "alarm_rate": _prometheus_panel("Alarm rate (defective / all)", "ratio",
                                            alarm_rate_expr(category, window), "alarm rate", *args),
        }
    return panels


# ------------------------------------------------------------------------------------------- numbers
def group_of(result: InspectionResult) -> str:
    """The category a result is reported under: its true category where known, else the predicted one."""
    if result.ground_truth is not None:
        return result.ground_truth.category
    return result.category or UNKNOWN_GROUP


def _rate(flags: list[bool]) -> float:
    return float(np.mean(flags)) if flags else float("nan")


def operating_point(category: str, results: Sequence[InspectionResult]) -> dict:
    """What the deployed thresholds did on this category's frames (the demo's definitions: recall and
    false-alarm rate over frames that got a decision, unknown counted apart)."""
    labelled = [r for r in results if r.ground_truth is not None]
    decided = [r for r in labelled if r.decision != Decision.UNKNOWN]
    thresholds = sorted({r.threshold for r in results if r.threshold is not None and r.category == category})
    experts = sorted({r.expert for r in results if r.expert and r.category == category})
    numbers = {
        "frames": len(results),
        "alarms": sum(r.decision == Decision.DEFECTIVE for r in results),
        "ok": sum(r.decision == Decision.OK for r in results),
        "unknown": sum(r.decision == Decision.UNKNOWN for r in results),
        "routed_elsewhere": sum(r.category is not None and r.category != category for r in results),
        "labelled": len(labelled),
        "anomalous": sum(r.ground_truth.is_anomalous for r in labelled),
        "thresholds": thresholds,
        "experts": experts,
        "recall": _rate([r.decision == Decision.DEFECTIVE for r in decided if r.ground_truth.is_anomalous]),
        "false_alarm_rate": _rate([r.decision == Decision.DEFECTIVE for r in decided if not r.ground_truth.is_anomalous]),
        "image_auroc": float("nan"),
        "latency_ms": latency_summary([r.latency.end_to_end_ms for r in results]),
    }
    if labelled:
        # As the demo: a frame routed to no task or another task cannot be judged normal.
        scores = [r.score_raw if r.category == category and r.score_raw is not None else np.inf for r in labelled]
        numbers["image_auroc"] = roc_auc([r.ground_truth.is_anomalous for r in labelled], scores)
    return numbers


def _sort_score(result: InspectionResult) -> float:
    if result.score is not None:
        return result.score
    if result.score_raw is not None and result.threshold:
        return result.score_raw / result.threshold
    return -math.inf


def flagged_frames(results: Sequence[InspectionResult], limit: int = MAX_GALLERY) -> list[InspectionResult]:
    """Defective decisions, highest score first."""
    return sorted((r for r in results if r.decision == Decision.DEFECTIVE), key=_sort_score, reverse=True)[:limit]


def missed_defects(results: Sequence[InspectionResult], limit: int = MAX_GALLERY) -> list[InspectionResult]:
    """Frames whose ground truth is anomalous but were decided ok, nearest the threshold first."""
    missed = (r for r in results if r.ground_truth is not None and r.ground_truth.is_anomalous
              and r.decision == Decision.OK)
    return sorted(missed, key=_sort_score, reverse=True)[:limit]


# -------------------------------------------------------------------------------------------- images
def load_source_image(result: InspectionResult) -> Image.Image | None:
    """The frame's source file (ground_truth.source), decoded to RGB; None when absent or unreadable."""
    source = result.ground_truth.source if result.ground_truth is not None else None
    if not source or not os.path.isfile(source):
        return None
    try:
        with Image.open(source) as image:
            image.draft("RGB", (2 * THUMB_WIDTH, 2 * THUMB_WIDTH))  # JPEG: decode at a reduced scale
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _heat_lut() -> np.ndarray:
    """256 x 3 jet-like colours: blue (0) through green (mid-grey = the pixel threshold) to red (255)."""
    anchors = [(0.0, (0, 0, 143)), (0.125, (0, 0, 255)), (0.375, (0, 255, 255)), (0.5, (0, 255, 96)),
               (0.625, (255, 255, 0)), (0.875, (255, 0, 0)), (1.0, (128, 0, 0))]
    x = np.linspace(0.0, 1.0, 256)
    stops = np.array([a for a, _ in anchors])
    colours = np.array([c for _, c in anchors], dtype=np.float64)
    return np.stack([np.interp(x, stops, colours[:, k]) for k in range(3)], axis=1).astype(np.float32)


_HEAT = _heat_lut()


def _decode_map(png: bytes | None) -> Image.Image | None:
    if not png:
        return None
    try:
        with Image.open(io.BytesIO(png)) as image:
            return image.convert("L")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def overlay_thumbnail(frame: Image.Image | None, anomaly_map_png: bytes | None, boxes: Sequence[Box],
                      width: int = THUMB_WIDTH, max_height: int = THUMB_MAX_HEIGHT) -> bytes:
    """JPEG bytes: the frame (grey canvas if None) with the map blended as a heat layer and the boxes
    drawn, downscaled to at most `width` x `max_height` (boxes are in the map's = the frame's pixels)."""
    heat_map = _decode_map(anomaly_map_png)
    if heat_map is not None:
        full = heat_map.size
    elif frame is not None:
        full = frame.size
    else:
        full = (width, width)
    scale = min(1.0, width / full[0], max_height / full[1])
    size = (max(1, round(full[0] * scale)), max(1, round(full[1] * scale)))
    base = (frame.convert("RGB") if frame is not None else Image.new("RGB", full, (128, 128, 128)))
    rgb = np.asarray(base.resize(size, Image.Resampling.LANCZOS), dtype=np.float32)
    if heat_map is not None:
        values = np.asarray(heat_map.resize(size, Image.Resampling.BILINEAR), dtype=np.uint8)
        alpha = (0.12 + 0.43 * values.astype(np.float32) / 255.0)[..., None]  # the frame stays visible
        rgb = rgb * (1.0 - alpha) + _HEAT[values] * alpha
    thumb = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(thumb)
    sx, sy = size[0] / full[0], size[1] / full[1]
    for box in boxes:
        x0, y0 = box.x0 * sx, box.y0 * sy
        x1, y1 = max(x0, box.x1 * sx - 1), max(y0, box.y1 * sy - 1)  # x1/y1 are exclusive
        draw.rectangle([x0, y0, x1, y1], outline=(255, 255, 255), width=3)
        draw.rectangle([x0, y0, x1, y1], outline=(255, 0, 255), width=1)
    out = io.BytesIO()
    thumb.save(out, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return out.getvalue()


def data_uri(image_bytes: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{base64.b64encode(image_bytes).decode('ascii')}"


# --------------------------------------------------------------------------------------------- plots
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def _nice_step(span: float, ticks: int) -> float:
    raw = span / max(ticks, 1)
    if raw <= 0 or not math.isfinite(raw):
        return 1.0
    magnitude = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


def _format_value(value: float, unit: str) -> str:
    if unit == "ratio":
        return f"{100 * value:.0f}%" if value >= 0.1 or value == 0 else f"{100 * value:.1f}%"
    if unit == "seconds":
        return f"{1000 * value:.0f} ms" if value < 1 else f"{value:.3g} s"
    return f"{value:.3g}"


def _format_offset(seconds: float, span: float) -> str:
    return f"{seconds / 60:.3g} min" if span >= 600 else f"{seconds:.0f} s"


def _thin(points: list[tuple[float, float]], limit: int = MAX_PLOT_POINTS) -> list[tuple[float, float]]:
    if len(points) <= limit:
        return points
    keep = np.linspace(0, len(points) - 1, limit).round().astype(int)
    return [points[i] for i in keep]


def svg_plot(panel: Panel, start: float, end: float, width: int = 400, height: int = 170) -> str:
    """An inline SVG time series of `panel` over [start, end], or a box with its note."""
    title = html.escape(panel.title)
    left, right, top, bottom = 58, 10, 22, 30
    inner_w, inner_h = width - left - right, height - top - bottom
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{title}"><title>{title}</title>',
             f'<text x="{left}" y="14" class="ptitle">{title}</text>',
             f'<rect x="{left}" y="{top}" width="{inner_w}" height="{inner_h}" class="frame"/>']
    series = [(legend, _thin(points), kind) for legend, points, kind in panel.series if points]
    if not series:
        note = html.escape(panel.note or "no metrics")
        parts.append(f'<text x="{left + inner_w / 2:.1f}" y="{top + inner_h / 2:.1f}" class="nometrics" '
                     f'text-anchor="middle">{note[:90]}</text>')
        if len(note) > 90:
            parts.append(f'<text x="{left + inner_w / 2:.1f}" y="{top + inner_h / 2 + 14:.1f}" class="nometrics" '
                         f'text-anchor="middle">{note[90:180]}</text>')
        parts.append("</svg>")
        return "".join(parts)
    span = max(end - start, 1e-9)
    y_max = max(v for _, points, _ in series for _, v in points)
    if panel.unit == "ratio":
        y_max = max(y_max, 0.05)
    y_max = y_max * 1.1 if y_max > 0 else 1.0
    y_step = _nice_step(y_max, 4)
    y_max = y_step * math.ceil(y_max / y_step)

    def sx(t: float) -> float:
        return left + inner_w * min(max((t - start) / span, 0.0), 1.0)

    def sy(v: float) -> float:
        return top + inner_h * (1.0 - min(max(v / y_max, 0.0), 1.0))

    tick = 0.0
    while tick <= y_max + 1e-12:
        y = sy(tick)
        parts.append(f'<line x1="{left}" x2="{left + inner_w}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{_format_value(tick, panel.unit)}</text>')
        tick += y_step
    x_step = _nice_step(span, 5)
    tick = 0.0
    while tick <= span + 1e-9:
        x = sx(start + tick)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + inner_h}" y2="{top + inner_h + 4}" class="axis"/>'
                     f'<text x="{x:.1f}" y="{top + inner_h + 16}" text-anchor="middle">{_format_offset(tick, span)}</text>')
        tick += x_step
    for index, (legend, points, kind) in enumerate(series):
        colour = _COLOURS[index % len(_COLOURS)]
        if kind == "points":
            parts.append(f'<g fill="{colour}" fill-opacity="0.55">' + "".join(
                f'<circle cx="{sx(t):.1f}" cy="{sy(v):.1f}" r="2"/>' for t, v in points) + "</g>")
        else:
            # A gap of more than 3 steps (no samples: no results, or Prometheus down) breaks the line.
            gaps = np.diff([t for t, _ in points])
            limit = 3 * float(np.median(gaps)) if len(gaps) else 0.0
            runs, current = [], [points[0]]
            for (t0, _), (t1, v1) in zip(points, points[1:]):
                if t1 - t0 > limit:
                    runs.append(current)
                    current = []
                current.append((t1, v1))
            runs.append(current)
            for run in runs:
                if len(run) == 1:
                    parts.append(f'<circle cx="{sx(run[0][0]):.1f}" cy="{sy(run[0][1]):.1f}" r="2" fill="{colour}"/>')
                else:
                    coords = " ".join(f"{sx(t):.1f},{sy(v):.1f}" for t, v in run)
                    parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.6"/>')
        parts.append(f'<text x="{left + inner_w - 4}" y="{top + 12 + 12 * index}" text-anchor="end" '
                     f'fill="{colour}">{html.escape(legend)}</text>')
    if panel.note:
        parts.append(f'<text x="{left + 4}" y="{top + inner_h - 4}" class="nometrics">{html.escape(panel.note[:80])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def latency_panel(results: Sequence[InspectionResult], line_p95: Panel | None) -> Panel:
    """Each frame's end-to-end latency (from its result), with the line-wide Prometheus p95 over it."""
    points = sorted((r.processed_at.timestamp(), r.latency.end_to_end_ms / 1000.0) for r in results)
    panel = Panel("End-to-end latency (s)", "seconds")
    if points:
        panel.series.append(("per frame (results)", points, "points"))
    if line_p95 is not None and line_p95.series:
        panel.series.append(("line p95 (Prometheus)", line_p95.series[0][1], "line"))
    elif line_p95 is not None:
        panel.note = "line p95: " + (line_p95.note or "no metrics")
    if not panel.series:
        panel.note = "no results and " + (panel.note or "no metrics")
    return panel


# ---------------------------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;background:#fff}
h1{margin:0 0 4px}h2{margin:28px 0 8px;border-bottom:2px solid #ccc;padding-bottom:4px}h3{margin:18px 0 6px}
.meta{color:#555;font-size:13px}nav a{margin-right:12px}
table.op{border-collapse:collapse;font-size:14px}table.op th,table.op td{border:1px solid #ccc;padding:3px 8px;text-align:left}
table.op th{background:#f3f3f3;font-weight:600}
.plots{display:flex;flex-wrap:wrap;gap:12px}
svg.plot{background:#fafafa;font-size:10px;font-family:inherit}
svg.plot .ptitle{font-size:12px;font-weight:600}svg.plot .frame{fill:none;stroke:#999}
svg.plot .grid{stroke:#e4e4e4}svg.plot .axis{stroke:#999}svg.plot .nometrics{fill:#888;font-size:11px}
.gallery{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:260px;border:1px solid #ddd;padding:4px;background:#fafafa}
figure img{display:block;max-width:256px;height:auto}
figcaption{font-size:11px;line-height:1.35;word-break:break-all}
.note{color:#777;font-style:italic}
"""

# Instrumentation only (the page needs no script): how many images decoded, for a headless check.
_SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-total", String(images.length));
  document.body.setAttribute("data-images-loaded", String(loaded));
  document.body.setAttribute("data-images-broken", String(images.length - loaded));
});
"""

# No fetch of anything but data: images, inline style and the inline counter above.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def _fmt(value: float | int | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _caption(result: InspectionResult) -> str:
    e = html.escape
    truth = result.ground_truth
    lines = [
        f"<b>{e(result.frame_id[:40])}</b> &middot; {e(result.camera_id[:40])}",
        f"{e(result.decision.value)} as {e(result.category or 'no task')}, score {_fmt(result.score)} "
        f"(raw {_fmt(result.score_raw)} / thr {_fmt(result.threshold)})",
        f"boxes {len(result.boxes)}, end-to-end {result.latency.end_to_end_ms:.0f} ms",
    ]
    if truth is not None:
        lines.append(f"truth: {e(truth.category)} / {e(truth.defect)}"
                     + (f" &middot; {e(os.path.basename(truth.source))}" if truth.source else ""))
    return "<br>".join(lines)


def _gallery(results: Sequence[InspectionResult], image_loader: ImageLoader, kind: str) -> str:
    figures = []
    for result in results:
        try:
            frame = image_loader(result)
        except Exception:  # noqa: BLE001 - a custom loader's failure costs the frame, not the report
            frame = None
        uri = data_uri(overlay_thumbnail(frame, result.anomaly_map_png, result.boxes))
        figures.append(f'<figure class="{kind}"><img src="{uri}" alt="{html.escape(result.frame_id[:64])}">'
                       f"<figcaption>{_caption(result)}</figcaption></figure>")
    return f'<div class="gallery">{"".join(figures)}</div>'


def _operating_table(category: str, numbers: dict) -> str:
    e = html.escape
    has_truth = numbers["labelled"] > 0
    thresholds = numbers["thresholds"]
    if not thresholds:
        threshold = "n/a"
    elif len(thresholds) <= 3:
        threshold = ", ".join(f"{t:.4g}" for t in thresholds)
    else:
        threshold = f"{thresholds[0]:.4g} .. {thresholds[-1]:.4g} ({len(thresholds)} values: changed during the run)"
    latency = numbers["latency_ms"]
    no_truth = "n/a (no ground truth)"
    rows = [
        ("frames", numbers["frames"]),
        ("alarms (defective)", numbers["alarms"]),
        ("ok", numbers["ok"]),
        ("unknown (no task matched)", numbers["unknown"]),
        ("routed to another category", numbers["routed_elsewhere"]),
        ("expert", ", ".join(numbers["experts"]) or "n/a"),
        ("threshold (raw score)", threshold),
        ("frames with ground truth", f"{numbers['labelled']} ({numbers['anomalous']} anomalous)" if has_truth else no_truth),
        ("recall @ threshold", _fmt(numbers["recall"]) if has_truth else no_truth),
        ("false-alarm rate @ threshold", _fmt(numbers["false_alarm_rate"]) if has_truth else no_truth),
        ("image AUROC", _fmt(numbers["image_auroc"], 4) if has_truth else no_truth),
        ("end-to-end latency (results)", f"p50 {_fmt(latency['p50'], 0)} ms, p95 {_fmt(latency['p95'], 0)} ms, "
                                         f"max {_fmt(latency['max'], 0)} ms"),
    ]
    body = "".join(f"<tr><th>{e(name)}</th><td>{e(str(value))}</td></tr>" for name, value in rows)
    return f'<table class="op" data-category="{e(category)}">{body}</table>'


def render_report(results: Sequence[InspectionResult], prometheus_url: str | None, start: float | None = None,
                  end: float | None = None, *, image_loader: ImageLoader = load_source_image,
                  query: QueryRange = query_range, max_gallery: int = MAX_GALLERY,
                  title: str = "Inspection report") -> str:
    """The report's HTML text (see the module docstring). start/end: unix seconds of the run; None =
    from the results (first capture, last result), else the last 10 minutes."""
    results = list(results)
    now = datetime.now(timezone.utc).timestamp()
    if start is None:
        start = min((r.captured_at.timestamp() for r in results), default=now - 600)
    if end is None:
        end = max((r.processed_at.timestamp() for r in results), default=now)
    end = max(end, start + 1.0)
    groups: dict[str, list[InspectionResult]] = {}
    for result in results:
        groups.setdefault(group_of(result), []).append(result)
    categories = sorted(groups, key=lambda c: (c == UNKNOWN_GROUP, c))
    panels = fetch_panels(prometheus_url, categories, start, end, query)
    line = panels[None]
    e = html.escape

    out = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
           f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
           f'<meta name="viewport" content="width=device-width, initial-scale=1">'
           f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{e(title)}</h1>",
           f'<p class="meta">run {e(_when(start))} &ndash; {e(_when(end))} ({end - start:.0f} s); '
           f"{len(results)} results; metrics: {e(prometheus_url or 'no Prometheus')}; "
           f"generated {e(_when(now))}</p>"]
    if categories:
        out.append("<nav>" + "".join(f'<a href="#cat-{i}">{e(c)}</a>' for i, c in enumerate(categories)) + "</nav>")

    latency = latency_summary([r.latency.end_to_end_ms for r in results])
    out += ['<section id="line" class="line"><h2>Whole line</h2>',
            f'<p>{len(results)} frames, {sum(r.decision == Decision.DEFECTIVE for r in results)} alarms, '
            f'{sum(r.decision == Decision.UNKNOWN for r in results)} unknown; end-to-end latency from the results '
            f"p50 {_fmt(latency['p50'], 0)} ms, p95 {_fmt(latency['p95'], 0)} ms.</p>",
            '<div class="plots">' + "".join(svg_plot(line[k], start, end) for k in ("throughput", "latency", "alarm_rate"))
            + "</div></section>"]
    if not results:
        out.append('<p class="note">no results in this run</p>')

    for index, category in enumerate(categories):
        members = groups[category]
        numbers = operating_point(category, members)
        flagged, missed = flagged_frames(members, max_gallery), missed_defects(members, max_gallery)
        category_panels = panels[category]
        plots = [category_panels["throughput"], latency_panel(members, line["latency"]), category_panels["alarm_rate"]]
        out += [f'<section class="category" id="cat-{index}" data-category="{e(category)}">',
                f"<h2>Category {e(category)}</h2>",
                "<h3>Operating point</h3>", _operating_table(category, numbers),
                "<h3>Over the run</h3>", '<div class="plots">' + "".join(svg_plot(p, start, end) for p in plots) + "</div>",
                f'<h3>Flagged frames ({len(flagged)} of {numbers["alarms"]}, highest score first)</h3>']
        out.append(_gallery(flagged, image_loader, "flagged") if flagged else '<p class="note">no frame flagged</p>')
        if numbers["labelled"] == 0:
            out += ["<h3>Missed defects</h3>", '<p class="note">no ground truth for this category</p>']
        else:
            total_missed = sum(r.ground_truth.is_anomalous and r.decision == Decision.OK
                               for r in members if r.ground_truth is not None)
            out.append(f"<h3>Missed defects ({len(missed)} of {total_missed}: truly anomalous, decided ok)</h3>")
            out.append(_gallery(missed, image_loader, "missed") if missed else '<p class="note">no missed defect</p>')
        out.append("</section>")
    out.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(out)


def write_report(path: str | os.PathLike[str], results: Sequence[InspectionResult], prometheus_url: str | None,
                 start: float | None = None, end: float | None = None, *,
                 image_loader: ImageLoader = load_source_image, query: QueryRange = query_range,
                 max_gallery: int = MAX_GALLERY, title: str = "Inspection report") -> Path:
    """Write `render_report(...)` to `path` (parents created, written atomically); returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = render_report(results, prometheus_url, start, end, image_loader=image_loader, query=query,
                         max_gallery=max_gallery, title=title)
    partial = target.with_name(f".{target.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, target)
    return target
