"""Per-frame inspection with the tasks currently in the store: which product, how anomalous, where.

`Inspector.sync(store)` follows the store incrementally (only new or changed task entries are loaded);
`Inspector.inspect(images)` runs one backbone pass for the batch, identifies the task of every frame in
one vectorised search, then runs each identified task's expert once on its frames.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from pipeline.features.backbone import Backbone, FeatureBatch
from pipeline.experts import Expert, load_expert
from pipeline.features.imaging import resize_rgb
from pipeline.core.store import KnowledgeStore
from pipeline.core.task import TaskArtifacts
from pipeline.core.task_id import KeyTaskIdentifier, TaskMatch, task_features
from schemas.config import ModelConfig
from schemas.store import TaskEntry


@dataclass
class LoadedTask:
    entry: TaskEntry
    artifacts: TaskArtifacts
    expert: Expert


@dataclass
class Inspection:
    match: TaskMatch
    expert: str | None
    score_raw: float | None
    score: float | None
    threshold: float | None
    is_defective: bool | None  # None when the task is unknown
    score_map: np.ndarray | None  # S x S raw pixel scores at the backbone input resolution
    pixel_threshold: float | None
    map_max_score: float | None
    task_version: int | None


@dataclass
class BatchTimings:
    features_ms: float
    task_id_ms: float
    expert_ms: float


class Inspector:
    def __init__(self, backbone: Backbone, model: ModelConfig):
        self.backbone = backbone
        self.model = model
        self.tasks: dict[str, LoadedTask] = {}
        self.store_version = 0
        self.identifier = KeyTaskIdentifier({}, {})

    # ------------------------------------------------------------------------------ store sync
    def sync(self, store: KnowledgeStore) -> list[str]:
        """Bring the loaded tasks to the store's current manifest; returns the categories that changed."""
        manifest = store.manifest()
        if manifest.version == self.store_version:
            return []
        changed = [name for name in self.tasks if name not in manifest.tasks]
        loaded = {name: task for name, task in self.tasks.items() if name in manifest.tasks}
        for name, entry in manifest.tasks.items():
            current = loaded.get(name)
            if current is None or current.entry.blobs != entry.blobs:
                artifacts = store.load_task(entry)
                loaded[name] = LoadedTask(entry, artifacts, load_expert(entry.expert, artifacts.expert_state))
                changed.append(name)
            else:
                loaded[name] = LoadedTask(entry, current.artifacts, current.expert)
        self._set_tasks(loaded, manifest.version)
        return changed

    def _set_tasks(self, tasks: dict[str, LoadedTask], version: int) -> None:
        self.tasks = tasks
        self.store_version = version
        self.identifier = KeyTaskIdentifier(
            {name: t.artifacts.keys for name, t in tasks.items()},
            {name: t.artifacts.calibration.task_bound for name, t in tasks.items()},
        )

    # ---------------------------------------------------------------------------------- inference
    def inspect(self, images: list[np.ndarray]) -> tuple[list[Inspection], BatchTimings]:
        """`images`: decoded uint8 RGB frames of any size."""
        t0 = time.perf_counter()
        batch = self.backbone.extract([resize_rgb(image, self.model.image_size) for image in images])
        t1 = time.perf_counter()
        matches = self.identifier.identify(task_features(batch))
        t2 = time.perf_counter()
        results: list[Inspection | None] = [None] * len(images)
        for category in {m.category for m in matches if m.category is not None}:
            rows = [i for i, m in enumerate(matches) if m.category == category]
            for row, inspection in zip(rows, self._run_expert(self.tasks[category], batch.select(rows), [matches[i] for i in rows])):
                results[row] = inspection
        for row, match in enumerate(matches):
            if results[row] is None:
                results[row] = Inspection(match, None, None, None, None, None, None, None, None, None)
        t3 = time.perf_counter()
        timings = BatchTimings(1000 * (t1 - t0), 1000 * (t2 - t1), 1000 * (t3 - t2))
        return results, timings

    def _run_expert(self, task: LoadedTask, batch: FeatureBatch, matches: list[TaskMatch]) -> list[Inspection]:
        output = task.expert.predict(batch, self.backbone)
        calibration = task.artifacts.calibration
        return [
            Inspection(
                match=match,
                expert=task.entry.expert,
                score_raw=float(score),
                score=calibration.normalise(float(score)),
                threshold=calibration.threshold,
                is_defective=bool(score > calibration.threshold),
                score_map=score_map,
                pixel_threshold=calibration.pixel_threshold,
                map_max_score=calibration.map_max_score,
                task_version=task.entry.task_version,
            )
            for match, score, score_map in zip(matches, output.scores, output.maps)
        ]

