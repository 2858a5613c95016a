"""Live forgetting and quality: each task's audit set, scored through the inspector as live frames are.

The audit set is made at training time from the task's audit split, normal images that the task never
fitted, validated or calibrated on. It holds those normals and one synthetic anomaly per normal, with
its mask, from the validation family (cracks, noise regions, warps, spots) that no expert trains on.
It is stored with the task (blob "audit"), so it is addressed by content hash like the rest.

`AuditMonitor.score(inspector)` routes every task's audit frames and runs experts only for frames
whose routed task changed since the last pass (a cache keyed by the task's blobs). Adding a task
therefore costs one routing pass over all audit frames, plus expert passes only where routing moved.
Per category it reports image AUROC, pixel AUROC, task-ID accuracy, false-alarm rate and recall at
the threshold. Forgetting is the best earlier value minus the current one (the current minus the best,
for the false-alarm rate), over the task's own version only. A replace, a new expert or a new threshold
gives a new task version and restarts the baseline: forgetting measures what *other* tasks did to it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from pipeline.common.serialization import pack, unpack
from pipeline.core.inspector import Inspection, Inspector
from pipeline.data.metrics import resize_to, roc_auc
from pipeline.data.validation_anomalies import make_validation_anomalies
from pipeline.features.geometry import resize_uint8
from pipeline.features.imaging import decode_image, encode_jpeg, encode_png
from schemas.spec import InputSpec

AUDIT_MAX_NORMALS = 16  # per task: 16 normals + 16 anomalies
AUDIT_JPEG_QUALITY = 95
METRICS = ("image_auroc", "pixel_auroc", "task_id_accuracy", "false_alarm_rate", "recall")
LOWER_IS_BETTER = frozenset({"false_alarm_rate"})
_MAX_PIXELS = 40_000_000


@dataclass(frozen=True)
class AuditSet:
    """Frames as PNG bytes (decoded by the live decoder) and, for anomalies, their defect masks."""

    frames: tuple[bytes, ...]
    masks: tuple[np.ndarray | None, ...]  # bool H x W for an anomaly, None for a normal frame

    @property
    def anomalous(self) -> list[bool]:
        return [mask is not None for mask in self.masks]

    def images(self) -> list[np.ndarray]:
        return [decode_image(frame, _MAX_PIXELS) for frame in self.frames]

    def to_bytes(self) -> bytes:
        """Masks as bits (8 pixels a byte) with their shapes: a byte a pixel was most of a task's store."""
        arrays = {f"frame_{i:03d}": np.frombuffer(f, dtype=np.uint8) for i, f in enumerate(self.frames)}
        for i, mask in enumerate(self.masks):
            if mask is not None:
                arrays[f"mask_{i:03d}"] = np.packbits(mask.ravel())
                arrays[f"mask_shape_{i:03d}"] = np.asarray(mask.shape, dtype=np.int64)
        return pack({"count": len(self.frames), "mask_format": "bits"}, arrays)

    @classmethod
    def from_bytes(cls, data: bytes) -> "AuditSet":
        """Either layout: bits (current), or a byte a pixel (sets stored before, kept byte-identical)."""
        meta, arrays = unpack(data)
        count = int(meta["count"])
        frames = tuple(arrays[f"frame_{i:03d}"].tobytes() for i in range(count))
        return cls(frames, tuple(_mask(arrays, i, meta.get("mask_format")) for i in range(count)))


def _mask(arrays: dict[str, np.ndarray], index: int, mask_format: str | None) -> np.ndarray | None:
    stored = arrays.get(f"mask_{index:03d}")
    if stored is None:
        return None
    if mask_format != "bits":
        return stored.astype(bool)
    shape = tuple(int(side) for side in arrays[f"mask_shape_{index:03d}"])
    return np.unpackbits(stored, count=int(np.prod(shape))).reshape(shape).astype(bool)


def make_audit_set(normals: list[np.ndarray], seed: int, spec: InputSpec | None = None) -> AuditSet | None:
    """The audit normals (at most AUDIT_MAX_NORMALS) and one validation-family anomaly of each; None
    when the audit split is empty.

    Stored compactly, since every task's set lives in Redis: with a resized `spec` (squeeze, letterbox)
    the normals are first shrunk to the size at which the expert sees them (its canvas; never enlarged),
    and each frame is kept as whichever of PNG and JPEG (quality 95) is smaller. Tiles see native
    pixels, so their frames keep their size."""
    normals = [_at_canvas(np.asarray(image, dtype=np.uint8), spec) for image in normals[:AUDIT_MAX_NORMALS]]
    if not normals:
        return None
    altered, masks = make_validation_anomalies(normals, seed)
    frames = tuple(_smallest_encoding(image) for image in [*normals, *altered])
    return AuditSet(frames, tuple([None] * len(normals) + [np.asarray(m) > 0 for m in masks]))


def _at_canvas(image: np.ndarray, spec: InputSpec | None) -> np.ndarray:
    if spec is None or spec.resize == "tiles":
        return image
    height, width = image.shape[:2]
    scale = max(spec.height / height, spec.width / width) if spec.resize == "squeeze" else \
        min(spec.height / height, spec.width / width)
    if scale >= 1.0:
        return image
    return resize_uint8(image, max(1, round(height * scale)), max(1, round(width * scale)))


def _smallest_encoding(image: np.ndarray) -> bytes:
    return min(encode_png(image, compress_level=9), encode_jpeg(image, quality=AUDIT_JPEG_QUALITY), key=len)


# ------------------------------------------------------------------------------------------- scoring
@dataclass
class AuditReport:
    category: str
    task_version: int
    values: dict[str, float]
    forgetting: dict[str, float]
    frames: int
    expert_frames_run: int  # frames whose expert output was computed in this pass (the rest: cached)


@dataclass
class _Cached:
    key: tuple  # (routed category, that task's blob digests)
    inspection: Inspection


@dataclass
class AuditMonitor:
    """Keeps the expert-output cache and every task's best values per task version."""

    cache: dict[tuple[str, int], _Cached] = field(default_factory=dict)  # (category, frame index) -> output
    best: dict[str, tuple[int, dict[str, float]]] = field(default_factory=dict)  # category -> (version, bests)
    images: dict[str, tuple[str, list[np.ndarray]]] = field(default_factory=dict)  # category -> (digest, frames)

    def score(self, inspector: Inspector) -> list[AuditReport]:
        reports = []
        for category in sorted(inspector.tasks):
            audit = inspector.tasks[category].artifacts.audit
            if audit is not None:
                reports.append(self._score_task(inspector, category, AuditSet.from_bytes(audit)))
        for gone in set(self.best) - set(inspector.tasks):
            self.forget(gone)
        return reports

    def forget(self, category: str) -> None:
        self.best.pop(category, None)
        self.images.pop(category, None)
        self.cache = {k: v for k, v in self.cache.items() if k[0] != category}

    def _score_task(self, inspector: Inspector, category: str, audit: AuditSet) -> AuditReport:
        images = self._decoded(category, audit)
        routing, matches = inspector.route(images)
        keys = [(m.category, _task_key(inspector, m.category)) for m in matches]
        stale = [i for i, key in enumerate(keys) if self.cache.get((category, i), _Cached((), None)).key != key]
        for row, inspection in zip(stale, inspector.run_experts(images, routing, matches, stale)):
            self.cache[(category, row)] = _Cached(keys[row], inspection)
        inspections = [self.cache[(category, i)].inspection for i in range(len(images))]
        version = inspector.tasks[category].entry.task_version
        values = audit_values(category, audit, images, inspections)
        return AuditReport(category, version, values, self._forgetting(category, version, values), len(images),
                           len(stale))

    def _decoded(self, category: str, audit: AuditSet) -> list[np.ndarray]:
        digest = hashlib.sha256(b"".join(audit.frames)).hexdigest()
        if self.images.get(category, ("",))[0] != digest:
            self.images[category] = (digest, audit.images())
            self.cache = {k: v for k, v in self.cache.items() if k[0] != category}
        return self.images[category][1]

    def _forgetting(self, category: str, version: int, values: dict[str, float]) -> dict[str, float]:
        """Best earlier value minus the current one, since this task version was published."""
        known_version, best = self.best.get(category, (None, {}))
        if known_version != version:  # the task itself changed: a new baseline, not forgetting
            best = {}
        forgetting = {}
        for name, value in values.items():
            if np.isnan(value):
                continue
            better = min if name in LOWER_IS_BETTER else max
            previous = best.get(name, value)
            forgetting[name] = (value - previous) if name in LOWER_IS_BETTER else (previous - value)
            best[name] = better(previous, value)
        self.best[category] = (version, best)
        return {name: max(0.0, f) for name, f in forgetting.items()}


def _task_key(inspector: Inspector, category: str | None) -> tuple:
    if category is None:
        return ()
    return tuple(sorted(inspector.tasks[category].entry.blobs.items()))


def audit_values(category: str, audit: AuditSet, images: list[np.ndarray], inspections: list[Inspection]) -> dict[str, float]:
    """The live path's quality on the audit frames. A frame routed elsewhere or to no task counts as
    routed wrongly; for the scores, a frame given to no task is scored as flagged (the line does not
    pass it as ok), one given to another task by that task's calibrated score."""
    anomalous = audit.anomalous
    scores = [np.inf if i.score is None else i.score for i in inspections]
    flagged = [i.is_defective is not False for i in inspections]  # unknown frames are not passed as ok
    normals = [f for f, a in zip(flagged, anomalous) if not a]
    defects = [f for f, a in zip(flagged, anomalous) if a]
    return {
        "image_auroc": roc_auc(anomalous, np.nan_to_num(scores, posinf=1e9)) if len(set(anomalous)) == 2 else float("nan"),
        "pixel_auroc": _pixel_auroc(audit, images, inspections),
        "task_id_accuracy": float(np.mean([i.match.category == category for i in inspections])),
        "false_alarm_rate": float(np.mean(normals)) if normals else float("nan"),
        "recall": float(np.mean(defects)) if defects else float("nan"),
    }


def _pixel_auroc(audit: AuditSet, images: list[np.ndarray], inspections: list[Inspection]) -> float:
    """Over frames that reached an expert; maps in units of each task's pixel threshold, so frames
    scored by different tasks compare."""
    labels, values = [], []
    for image, mask, inspection in zip(images, audit.masks, inspections):
        if inspection.score_map is None or not inspection.pixel_threshold:
            continue
        score_map = resize_to(inspection.score_map, image.shape[:2]) / inspection.pixel_threshold
        truth = mask if mask is not None else np.zeros(image.shape[:2], dtype=bool)
        labels.append(truth[::4, ::4].ravel())  # every 4th pixel: the same ranking, 16x less work
        values.append(score_map[::4, ::4].ravel())
    if not labels:
        return float("nan")
    labels_all = np.concatenate(labels)
    if labels_all.all() or not labels_all.any():
        return float("nan")
    return roc_auc(labels_all, np.concatenate(values))
