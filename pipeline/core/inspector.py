"""Per-frame inspection with the tasks currently in the store: which product, how anomalous, where.

`Inspector.sync(store)` follows the store incrementally (only new or changed task entries are loaded);
it is `prepare(store)`, which loads the new version beside the one served (every backbone its tasks need
included, and each new expert run once, so no frame pays for a first use), then `use(snapshot)`, which
serves it: a worker prepares on a thread of its own and swaps the snapshot in between two batches;
`Inspector.inspect(images)` is two-stage: one cheap, shared routing pass (the unprompted ViT on every
frame squeezed to the routing size) identifies the task of every frame in one vectorised search; then
each identified task's expert runs once on its frames at the task's own input spec (geometry, tiling,
backbone; pipeline.experts.frames), and its maps come back at each frame's own resolution. A task whose
spec is routing's own geometry and whose expert reads unprompted ViT blocks no deeper than the keys gets
them from the routing pass (computed once).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from pipeline.experts import Expert, load_expert
from pipeline.experts.frames import run_on_frames
from pipeline.features.backbone import KEY_LAYER, Backbones, FeatureBatch
from pipeline.core.store import KnowledgeStore
from pipeline.core.task import TaskArtifacts
from pipeline.core.task_id import KeyTaskIdentifier, TaskMatch, task_features
from schemas.config import ModelConfig
from schemas.spec import InputSpec, routing_spec
from schemas.store import TaskEntry

log = logging.getLogger(__name__)


@dataclass
class LoadedTask:
    entry: TaskEntry
    artifacts: TaskArtifacts
    expert: Expert

    @property
    def spec(self) -> InputSpec:
        return self.artifacts.input_spec


@dataclass
class Inspection:
    match: TaskMatch
    expert: str | None
    score_raw: float | None
    score: float | None
    threshold: float | None
    is_defective: bool | None  # None when the task is unknown
    score_map: np.ndarray | None  # H x W raw pixel scores at the frame's own resolution
    pixel_threshold: float | None
    map_max_score: float | None
    task_version: int | None

    @classmethod
    def unknown(cls, match: TaskMatch) -> "Inspection":
        """A frame routed to no known task: its match, nothing judged."""
        return cls(match, None, None, None, None, None, None, None, None, None)


@dataclass(frozen=True)
class TaskSnapshot:
    """The tasks of one store version, loaded and ready to serve; `changed`: categories added, replaced or
    removed against the tasks served when it was prepared."""

    tasks: dict[str, LoadedTask]
    version: int
    changed: list[str]


@dataclass
class BatchTimings:
    features_ms: float
    task_id_ms: float
    expert_ms: float


class Inspector:
    def __init__(self, backbones: Backbones, model: ModelConfig, batch_size: int = 16):
        self.backbones = backbones
        self.model = model
        self.batch_size = batch_size
        self.routing = routing_spec(model.image_size)
        self.tasks: dict[str, LoadedTask] = {}
        self.store_version = 0
        self.identifier = KeyTaskIdentifier({}, {}, model.routing_candidates)

    # ------------------------------------------------------------------------------ store sync
    def sync(self, store: KnowledgeStore) -> list[str]:
        """Bring the loaded tasks to the store's current manifest; returns the categories that changed."""
        snapshot = self.prepare(store)
        if snapshot is None:
            return []
        self.use(snapshot)
        return snapshot.changed

    def prepare(self, store: KnowledgeStore) -> TaskSnapshot | None:
        """The store's current manifest loaded beside the tasks served, which it leaves as they are (None
        when it is the version served): entries whose blobs did not change keep their loaded task; every
        backbone the tasks need is loaded and each new expert runs once, here rather than on a frame.
        Safe on another thread than `inspect`'s, one call at a time."""
        manifest = store.manifest()
        if manifest.version == self.store_version:
            return None
        served = self.tasks
        changed = [name for name in served if name not in manifest.tasks]
        loaded = {name: task for name, task in served.items() if name in manifest.tasks}
        for name, entry in manifest.tasks.items():
            current = loaded.get(name)
            if current is None or current.entry.blobs != entry.blobs:
                artifacts = store.load_task(entry)
                loaded[name] = LoadedTask(entry, artifacts, load_expert(entry.expert, artifacts.expert_state))
                changed.append(name)
            else:
                loaded[name] = LoadedTask(entry, current.artifacts, current.expert)
        self.backbones.preload(task.spec.backbone for task in loaded.values())
        for name in changed:
            if name in loaded:
                self._warm_up(loaded[name])
        return TaskSnapshot(loaded, manifest.version, changed)

    def use(self, snapshot: TaskSnapshot) -> None:
        """Serve a prepared snapshot (on the thread that inspects: a batch sees one version whole)."""
        self.set_tasks(snapshot.tasks, snapshot.version)

    def _warm_up(self, task: LoadedTask) -> None:
        """One blank frame through the task's expert: its first run's one-off costs (kernels chosen for
        new shapes, search banks made) are paid here. Best effort: a frame that fails the same way
        reports it as its own error."""
        blank = np.zeros((task.spec.height, task.spec.width, 3), dtype=np.uint8)
        try:
            run_on_frames(task.expert, task.spec, self.backbones, [blank], 1)
        except Exception:
            log.warning("warm-up of %s's expert failed; its first frame pays its first run", task.entry.category,
                        exc_info=True)

    def set_tasks(self, tasks: dict[str, LoadedTask], version: int) -> None:
        """Serve exactly these tasks (sync does this from the store; benchmarks with tasks built in memory)."""
        self.tasks = tasks
        self.store_version = version
        self.identifier = KeyTaskIdentifier(
            {name: t.artifacts.keys for name, t in tasks.items()},
            {name: t.artifacts.calibration.task_bound for name, t in tasks.items()},
            self.model.routing_candidates,
        )

    # ---------------------------------------------------------------------------------- inference
    def shared_layers(self) -> tuple[int, ...]:
        """Unprompted ViT blocks that tasks at routing's geometry read, computed in the routing pass
        when they are no deeper than the keys (deeper ones would cost every other frame too)."""
        layers = {layer for t in self.tasks.values() if self._shares_routing(t) for layer in t.expert.vit_layers()}
        return tuple(sorted(layers))

    def _shares_routing(self, task: LoadedTask) -> bool:
        layers = task.expert.vit_layers()
        return task.spec == self.routing and bool(layers) and max(layers) <= KEY_LAYER

    def inspect(self, images: list[np.ndarray]) -> tuple[list[Inspection], BatchTimings]:
        """`images`: decoded uint8 RGB frames of any size."""
        t0 = time.perf_counter()
        routing = self.backbones.routing_pass(images, self.routing, self.shared_layers())
        t1 = time.perf_counter()
        matches = self.identifier.identify(task_features(routing))
        t2 = time.perf_counter()
        results = self.run_experts(images, routing, matches)
        t3 = time.perf_counter()
        timings = BatchTimings(1000 * (t1 - t0), 1000 * (t2 - t1), 1000 * (t3 - t2))
        return results, timings

    def route(self, images: list[np.ndarray]) -> tuple[FeatureBatch, list[TaskMatch]]:
        """Stage one alone: the routing pass and each frame's task (what `inspect` does first)."""
        routing = self.backbones.routing_pass(images, self.routing, self.shared_layers())
        return routing, self.identifier.identify(task_features(routing))

    def run_experts(self, images: list[np.ndarray], routing: FeatureBatch, matches: list[TaskMatch],
                    rows: list[int] | None = None) -> list[Inspection]:
        """Stage two for `rows` (default: every frame): each routed frame through its task's expert, one
        batch per task; a frame of no known task gets an empty inspection."""
        rows = list(range(len(images))) if rows is None else list(rows)
        results: dict[int, Inspection] = {}
        for category in sorted({matches[r].category for r in rows if matches[r].category is not None}):
            mine = [r for r in rows if matches[r].category == category]
            task = self.tasks[category]
            shared = routing.select(mine) if self._shares_routing(task) else None
            for row, inspection in zip(mine, self._run_expert(task, [images[r] for r in mine],
                                                              [matches[r] for r in mine], shared)):
                results[row] = inspection
        return [results.get(r) or Inspection.unknown(matches[r]) for r in rows]

    def _run_expert(self, task: LoadedTask, images: list[np.ndarray], matches: list[TaskMatch],
                    shared: FeatureBatch | None) -> list[Inspection]:
        output = run_on_frames(task.expert, task.spec, self.backbones, images, self.batch_size, shared)
        scores = task.artifacts.image_decision.scores(output.scores, output.maps)
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
            for match, score, score_map in zip(matches, scores, output.maps)
        ]
