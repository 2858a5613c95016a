"""Automatic choice of a task's expert, backbone and input spec, from normal images only, within budget.

Candidates are (expert, InputSpec) pairs derived from the fit frames' geometry alone (their median size
and aspect; nothing about any particular product). Each is fitted on the fit split and judged on the
validation split: held-out normal frames plus synthetic anomalies made from them by a family that no
expert trains on (pipeline.data.validation_anomalies; FCDD's outlier exposure uses confetti noise and
cut-paste, so validating on those would favour it). Frames go through the live path
(pipeline.experts.frames) at full resolution, which also measures each candidate's cost per frame.

The score is (2 x image AUROC + pixel AUROC) / 3: whether a part is defective comes first, where second.
Each fitted candidate also gets its image decision (pipeline.core.decision: the expert's own score or
one read from its map, position-aware for aligned products), chosen on the same validation frames, and
is judged with it. After the single candidates, ensembles of those fitted at one spec
(pipeline.experts.ensemble: members' outputs in units of their spread on the validation normals, averaged;
one backbone pass, nothing more to fit) are judged the same way. Candidates are tried expert by expert in the given order (AUTO_EXPERTS: strong and
cheap to fit first), each expert's specs cheapest first; one whose expert stage costs more than the
line's per-frame budget (`expert_budget_ms`) is not eligible, and once the add would pass its budget, no
further candidate is tried. Both costs are estimated from the candidates' counted work and this machine's
measured speed (pipeline.core.cost), never from wall time during the add, so the choice does not move
with the machine's load. Real anomalies are never seen. Every candidate's result travels with the task's
metadata and the training events.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.core.cost import MachineSpeed, Work, WorkLimitReached, counted
from pipeline.core.decision import MIN_GAIN, ImageDecision, MapStatistics, choose_decision
from pipeline.data.metrics import pixel_metrics, roc_auc
from pipeline.data.validation_anomalies import validation_anomalies
from pipeline.experts import EXPERT_TYPES, Expert, build_expert
from pipeline.experts.ensemble import Ensemble, Member
from pipeline.experts.frames import fit_batches, run_on_frames, view_batches
from pipeline.features.backbone import Backbones
from pipeline.features.geometry import frame_views
from schemas.config import ModelConfig, TrainingConfig
from schemas.spec import CNN_STRIDE, VIT_BACKBONE, VIT_STRIDE, InputSpec

# Tried by the automatic choice, in this order (cheap and strong first: the time budget may cut the tail).
# Reverse Distillation (~90 s to fit) and UCAD (Segment-Anything masks, ~60 s) cost more than the add
# budget leaves; they are used when an operator names them.
AUTO_EXPERTS = ("patchcore", "simplenet", "dinov2", "panda", "fcdd")
TILE_SIDE, TILE_OVERLAP = 256, 32
VIT_TOKENS = (576, 1024)  # ViT candidates: token budgets (24 x 24 and 32 x 32 for a square frame)


# An ensemble is kept only when its validation score beats the best single candidate's by this much: as for
# image decisions, a few dozen validation frames cannot tell smaller gains from noise, and the single
# expert is the simpler, cheaper model.
ENSEMBLE_MIN_GAIN = MIN_GAIN
ROTATION_MAX_ASPECT = 1.5  # frames this close to square may show their surface in any orientation


@dataclass(frozen=True)
class Candidate:
    expert: str
    spec: InputSpec
    # 4: the fit frames and their 90, 180 and 270 degree rotations all go into the expert (a bank that
    # knows every orientation of the surface); 1: the frames as they are
    orientations: int = 1
    members: tuple[str, ...] = ()  # an ensemble's experts (expert "ensemble"), each fitted at this spec

    @property
    def label(self) -> str:
        return f"{self.expert}({'+'.join(self.members)})" if self.members else self.expert

    def describe(self) -> str:
        return f"{self.label} @ {self.spec.describe()}" + (" + rotations" if self.orientations > 1 else "")


def rotated(frames: Sequence[np.ndarray], orientations: int) -> list[np.ndarray]:
    """The frames, then each one turned by 90 degrees, 180 and 270 (as many turns as `orientations` asks)."""
    return [np.ascontiguousarray(np.rot90(frame, turn)) for turn in range(orientations) for frame in frames]


@dataclass
class CandidateResult:
    expert: str
    spec: InputSpec
    status: str  # "ok", "over_budget" (too slow per frame), "skipped" (add budget spent), "failed"
    orientations: int = 1  # Candidate.orientations
    members: tuple[str, ...] = ()  # Candidate.members
    image_auroc: float = math.nan  # with its image decision
    pixel_auroc: float = math.nan
    ms_per_frame: float = math.nan  # estimated from its work (pipeline.core.cost): what the budget judges
    fit_seconds: float = math.nan  # estimated likewise: what the add budget judges
    measured_ms_per_frame: float = math.nan  # wall time on the validation frames, for information only
    measured_fit_seconds: float = math.nan
    decision: str = ""  # the image decision chosen on validation (ImageDecision.describe)
    decision_aurocs: dict = field(default_factory=dict)  # validation image AUROC of every decision tried
    family_aurocs: dict = field(default_factory=dict)  # validation image AUROC per synthetic anomaly family
    detail: str = ""
    summary: dict = field(default_factory=dict)

    @property
    def candidate(self) -> Candidate:
        return Candidate(self.expert, self.spec, self.orientations, self.members)

    @property
    def score(self) -> float:
        """(2 x image AUROC + pixel AUROC) / 3 on validation; NaN when it was not fitted. A category without
        any pixel signal (NaN pixel AUROC) is judged on image AUROC alone."""
        if math.isnan(self.pixel_auroc):
            return self.image_auroc
        return (2 * self.image_auroc + self.pixel_auroc) / 3

    def line(self) -> str:
        head = self.candidate.describe()
        if math.isnan(self.image_auroc):
            return f"{head}: {self.status} {self.detail}".strip()
        text = (f"{head}: {self.score:.4f} (image {self.image_auroc:.4f} by {self.decision}, pixel {self.pixel_auroc:.4f}, "
                f"{self.ms_per_frame:.0f} ms/frame)")
        return text if self.status == "ok" else f"{text} {self.status} {self.detail}".strip()

    def as_dict(self) -> dict:
        return {"expert": self.expert, "members": list(self.members), "label": self.candidate.label, "spec": self.spec.model_dump(),
                "orientations": self.orientations, "status": self.status,
                "image_auroc": self.image_auroc, "pixel_auroc": self.pixel_auroc, "score": self.score,
                "ms_per_frame": self.ms_per_frame, "fit_seconds": self.fit_seconds,
                "measured_ms_per_frame": self.measured_ms_per_frame, "measured_fit_seconds": self.measured_fit_seconds,
                "decision": self.decision, "decision_aurocs": self.decision_aurocs,
                "family_aurocs": self.family_aurocs, "detail": self.detail}


@dataclass
class Selection:
    expert: Expert  # the chosen one, fitted
    chosen: CandidateResult
    results: list[CandidateResult]  # every candidate, in order
    fitted: list[Expert | None]  # aligned with results: the fitted expert (None: not fitted); benchmarks read it
    decisions: list[ImageDecision | None]  # aligned with results: each fitted candidate's image decision

    @property
    def decision(self) -> ImageDecision:
        return self.decisions[self.results.index(self.chosen)]


@dataclass
class ValidationSet:
    normal: list[np.ndarray]  # decoded frames at their own resolution
    anomalous: list[np.ndarray]
    masks: list[np.ndarray]  # one H x W bool mask per anomalous frame
    statistics: list[np.ndarray] = field(default_factory=list)  # normal frames for per-position map statistics
    families: list[str] = field(default_factory=list)  # each anomalous frame's defect family ([]: not known)

    @property
    def frames(self) -> list[np.ndarray]:
        return self.normal + self.anomalous

    @property
    def labels(self) -> list[bool]:
        return [False] * len(self.normal) + [True] * len(self.anomalous)


def make_validation_set(normal: list[np.ndarray], seed: int, statistics: Sequence[np.ndarray] = (),
                        anomalies_per_normal: int = 1) -> ValidationSet:
    """The validation normals and `anomalies_per_normal` synthetic anomalies of each, of different families
    (pipeline.data.validation_anomalies): with a few dozen normals, one draw each moves a candidate's score
    by several hundredths from seed to seed; more kinds per normal steady it and cover every family."""
    anomalies = validation_anomalies(normal, seed, anomalies_per_normal)
    return ValidationSet(normal, [a.image for a in anomalies], [a.mask for a in anomalies], list(statistics),
                         [a.family for a in anomalies])


# ------------------------------------------------------------------------------------------ candidates
def _aspect_canvas(height: float, width: float, short_side: int, stride: int, max_aspect: float = 3.0) -> tuple[int, int]:
    """A canvas with the frames' aspect (capped), short side `short_side`, sides in multiples of `stride`."""
    ratio = min(max_aspect, max(height, width) / min(height, width))
    long_side = max(short_side, stride * round(short_side * ratio / stride))
    return (short_side, long_side) if height <= width else (long_side, short_side)


def _token_canvas(height: float, width: float, tokens: int) -> tuple[int, int]:
    """ViT canvas with the frames' aspect holding about `tokens` patch tokens."""
    ratio = min(3.0, max(height, width) / min(height, width))
    short = max(1, int(math.sqrt(tokens / ratio)))
    long = max(short, int(round(short * ratio)))
    return (VIT_STRIDE * short, VIT_STRIDE * long) if height <= width else (VIT_STRIDE * long, VIT_STRIDE * short)


def candidate_specs(expert: str, frames: Sequence[np.ndarray]) -> list[InputSpec]:
    """Input specs worth trying for `expert` on frames of this geometry (median height and width)."""
    expert_type = EXPERT_TYPES[expert]
    height = float(np.median([f.shape[0] for f in frames]))
    width = float(np.median([f.shape[1] for f in frames]))
    if VIT_BACKBONE in expert_type.backbones:
        if expert_type.square_inputs:
            return [InputSpec(backbone=VIT_BACKBONE, resize="letterbox", height=224, width=224)]
        return [InputSpec(backbone=VIT_BACKBONE, resize="letterbox", height=h, width=w)
                for h, w in (_token_canvas(height, width, t) for t in VIT_TOKENS)]
    if expert_type.square_inputs:
        return [InputSpec(backbone="efficientnet_lite0", resize="letterbox", height=224, width=224)]
    h, w = _aspect_canvas(height, width, 224, CNN_STRIDE)
    specs = [InputSpec(backbone="efficientnet_lite0", resize="letterbox", height=h, width=w)]
    if expert == "patchcore":
        if min(height, width) >= 1.5 * TILE_SIDE:  # fine defects of large frames: native-resolution tiles
            specs.append(InputSpec(backbone="efficientnet_lite0", resize="tiles", height=TILE_SIDE, width=TILE_SIDE,
                                   tile_overlap=TILE_OVERLAP))
        # the larger CNN at the same canvas: deeper features for the same patch count (and search cost)
        specs.append(InputSpec(backbone="efficientnet_lite2", resize="letterbox", height=h, width=w))
    return specs


def default_candidates(frames: Sequence[np.ndarray], expert: str | None, spec: InputSpec | None) -> list[Candidate]:
    """What to try: the given expert (or every automatic one) at the given spec (or its candidate specs)."""
    names = [expert] if expert is not None else [name for name in AUTO_EXPERTS if name in EXPERT_TYPES]
    for name in names:
        if name not in EXPERT_TYPES:
            raise ValueError(f"unknown expert {name!r}; known: {sorted(EXPERT_TYPES)}")
        if name == Ensemble.name:
            raise ValueError("an ensemble is composed by the automatic choice from the experts it fitted; "
                             "name a single expert, or none")
    if spec is not None:
        return [Candidate(name, spec) for name in names]
    # orientation-free surfaces: a twin that knows every orientation, after each PatchCore canvas (validation says if it helps)
    rotations = expert is None and _near_square(frames)
    return [twin for name in names for s in candidate_specs(name, frames)
            for twin in ([Candidate(name, s)] + ([Candidate(name, s, 4)] if rotations and name == "patchcore"
                                                 and s.resize == "letterbox" else []))]


def _near_square(frames: Sequence[np.ndarray]) -> bool:
    height = float(np.median([f.shape[0] for f in frames]))
    width = float(np.median([f.shape[1] for f in frames]))
    return max(height, width) / min(height, width) <= ROTATION_MAX_ASPECT


# ------------------------------------------------------------------------------------------ judging
@dataclass
class Judgement:
    image_auroc: float
    pixel_auroc: float
    decision: ImageDecision
    decision_aurocs: dict[str, float]
    work: Work  # of the validation frames' pass, statistics frames included
    wall_seconds: float
    # standard deviations of its image scores and of its map values over the validation normals: the
    # scale an ensemble divides this candidate's outputs by
    normal_score_spread: float = math.nan
    normal_map_spread: float = math.nan
    family_aurocs: dict[str, float] = field(default_factory=dict)  # validation image AUROC per anomaly family


def evaluate(expert: Expert, spec: InputSpec, validation: ValidationSet, backbones: Backbones,
             batch_size: int) -> Judgement:
    """The candidate on the validation frames through the live path: its image decision (per-position
    statistics from the statistics frames, when there are any), image AUROC with that decision, pixel
    AUROC (frame-resolution masks), and the work it did."""
    started = time.perf_counter()
    outputs, work = counted(lambda: run_on_frames(expert, spec, backbones, validation.frames, batch_size))
    wall = time.perf_counter() - started
    statistics, statistics_work = _map_statistics(expert, spec, validation.statistics, backbones, batch_size)
    decision, aurocs = choose_decision(validation.labels, outputs.scores, outputs.maps, statistics)
    masks = [np.zeros(f.shape[:2], dtype=bool) for f in validation.normal] + validation.masks
    pixel_auroc = pixel_metrics(masks, outputs.maps)["pixel_auroc"]
    normal = len(validation.normal)
    return Judgement(aurocs[decision.describe()], pixel_auroc, decision, aurocs, work + statistics_work, wall,
                     float(np.std(outputs.scores[:normal])), _pixel_spread(outputs.maps[:normal]),
                     _family_aurocs(validation, decision.scores(outputs.scores, outputs.maps)))


def _family_aurocs(validation: ValidationSet, scores: np.ndarray) -> dict[str, float]:
    """Image AUROC of the validation normals against each family's anomalies alone: which kind of defect a
    candidate misses."""
    normal = scores[: len(validation.normal)]
    anomalous = scores[len(validation.normal):]
    families = np.asarray(validation.families)
    aurocs = {}
    for family in dict.fromkeys(validation.families):
        of_family = anomalous[families == family]
        aurocs[family] = roc_auc([False] * len(normal) + [True] * len(of_family), np.concatenate([normal, of_family]))
    return aurocs


def _pixel_spread(maps: Sequence[np.ndarray]) -> float:
    """Standard deviation of every value of the maps (accumulated: frame-resolution maps are large)."""
    count = sum(m.size for m in maps)
    mean = sum(float(m.sum(dtype=np.float64)) for m in maps) / max(count, 1)
    variance = sum(float(np.square(m - mean, dtype=np.float64).sum()) for m in maps) / max(count, 1)
    return math.sqrt(variance)


@dataclass
class Fitted:
    """A candidate fitted and judged: deterministic, so a second choice (another frame budget) reuses it."""

    expert: Expert
    judgement: Judgement
    work: Work  # of its fit, its spec's fit features included when it computed them
    wall_seconds: float  # measured fit time, for information


FitCache = dict[Candidate, Fitted]


def _map_statistics(expert: Expert, spec: InputSpec, frames: Sequence[np.ndarray], backbones: Backbones,
                    batch_size: int) -> tuple[MapStatistics | None, Work]:
    if not frames:
        return None, Work()
    outputs, work = counted(lambda: run_on_frames(expert, spec, backbones, frames, batch_size))
    return MapStatistics.from_maps(outputs.maps), work


def _probe(spec: InputSpec, backbones: Backbones, frames: Sequence[np.ndarray], batch_size: int) -> Work:
    """The backbone's work per frame at this spec on a few frames: a lower bound on the expert stage's.
    ViT specs run the ViT to its last block (experts run it themselves, so view_batches does not)."""
    probe = list(frames[:2])

    def run() -> None:
        for _, _, features in view_batches(probe, spec, backbones, batch_size):
            if not spec.uses_cnn and backbones.vit is not None:
                with torch.no_grad():
                    vit = backbones.vit
                    vit.multi_layer_tokens(backbones.default.vit_pixels(features.pixels), (vit.num_layers - 1,))

    return counted(run)[1].scaled(1.0 / len(probe))


def choose(
    candidates: Sequence[Candidate],
    fit_frames: list[np.ndarray],
    validation: ValidationSet,
    backbones: Backbones,
    model: ModelConfig,
    training: TrainingConfig,
    budget_s: float,
    speed: MachineSpeed,
    on_progress: Callable[[float, str], None] = lambda fraction, message: None,
    cache: FitCache | None = None,
) -> Selection:
    """Fit and judge candidates, expert by expert; the best eligible one wins, ties to the one tried first.

    Costs are estimates from counted work at this machine's `speed`, never wall time. Each distinct
    spec's backbone work is probed on two validation frames first. Candidates are tried expert by expert
    in the order the experts first appear in `candidates`, and each expert's cheapest spec first (fewer
    orientations first on ties): every spec of a preferred expert is tried before a later expert's fit,
    whose cost is only known once it has run (a trained expert's epochs), can spend the add budget. The
    first is always fitted. A later one is not when its
    estimated expert stage is over the per-frame budget (the backbone probe times the expert's overhead on
    an earlier spec, when there is one), or when the work so far plus its estimated fit (the most seconds
    per fit view of the same expert so far, else of any, times its views) and validation would pass
    `budget_s`. If no fitted candidate is
    within the per-frame budget, the fastest fitted one is kept and says so: adding a task never fails
    for want of CPU. `cache`: candidates fitted by an earlier choice on the same data, reused (and filled)."""
    cache = {} if cache is None else cache
    specs = list(dict.fromkeys(c.spec for c in candidates))
    probe_ms = {spec: 1000 * speed.seconds(_probe(spec, backbones, validation.normal, training.batch_size), spec.backbone)
                for spec in specs}
    views = {spec: _views_per_frame(spec, fit_frames) * len(fit_frames) for spec in specs}
    # expert by expert (the given order), each expert's cheapest spec per frame first, fewer fit frames on ties
    expert_rank = {name: rank for rank, name in enumerate(dict.fromkeys(c.expert for c in candidates))}
    order = sorted(range(len(candidates)), key=lambda i: (expert_rank[candidates[i].expert], probe_ms[candidates[i].spec],
                                                          candidates[i].orientations))
    results: list[CandidateResult | None] = [None] * len(candidates)
    fitted: list[Expert | None] = [None] * len(candidates)
    decisions: list[ImageDecision | None] = [None] * len(candidates)
    overhead: dict[str, float] = {}  # expert -> estimated ms per frame / backbone probe ms
    seconds_per_view: dict[str, list[float]] = {}  # expert -> estimated fit seconds per fit view, per fit
    spent_s = 0.0  # estimated seconds of the work done so far
    judged_frames = len(validation.frames) + len(validation.statistics)
    features: dict[tuple[InputSpec, int], list] = {}  # fit features per (spec, orientations), shared by experts
    for step, index in enumerate(order):
        candidate = candidates[index]
        for key in [k for k in features if all((candidates[j].spec, candidates[j].orientations) != k for j in order[step:])]:
            del features[key]  # no later candidate reads them: free the memory
        result = results[index] = CandidateResult(candidate.expert, candidate.spec, "ok", candidate.orientations)
        probe = probe_ms[candidate.spec]
        if step > 0:
            estimate = probe * overhead.get(candidate.expert, 1.0)
            # this expert's most per fit view so far, else any expert's most: experts' fits differ by 3x and
            # more (FCDD vs PatchCore), so a mean over experts overran and another expert's most overstates
            known = seconds_per_view.get(candidate.expert) or [v for per in seconds_per_view.values() for v in per]
            fit_estimate = max(known, default=0.0) * views[candidate.spec] * candidate.orientations
            if estimate > training.expert_budget_ms:
                result.status, result.ms_per_frame = "over_budget", estimate
                result.detail = f"estimated {estimate:.0f} ms/frame (backbone {probe:.0f}) > {training.expert_budget_ms:.0f}"
            elif spent_s + fit_estimate + estimate * judged_frames / 1000 > budget_s:
                result.status = "skipped"
                result.detail = (f"the add budget would be spent ({spent_s:.0f} s of {budget_s:.0f} s of work so far, "
                                 f"fit estimated {fit_estimate:.0f} s)")
            if result.status != "ok":
                on_progress(0.2, f"candidate {result.line()}")
                continue
        try:
            if candidate not in cache:
                # a later candidate stops where the add budget ends: its estimate is from other fits and
                # can be short (a trained expert's epochs), the counted work is not
                left_s, backbone = budget_s - spent_s, candidate.spec.backbone
                over = None if step == 0 else (lambda work: speed.seconds(work, backbone) > left_s)
                cache[candidate] = counted(lambda: _fit_and_judge(candidate, fit_frames, validation, backbones,
                                                                   model, training, features), over)[0]
            done = cache[candidate]
        except WorkLimitReached as stopped:
            spent_s += speed.seconds(stopped.work, candidate.spec.backbone)
            result.status = "skipped"
            result.detail = f"the add budget was spent during its fit ({spent_s:.0f} s of {budget_s:.0f} s of work)"
            on_progress(0.2, f"candidate {result.line()}")
            continue
        except Exception as error:  # noqa: BLE001 - one candidate failing must not fail the task
            if len(candidates) == 1:
                raise
            result.status, result.detail = "failed", f"{type(error).__name__}: {error}"
            on_progress(0.2, f"candidate {result.line()}")
            continue
        judged_s = _record(result, done, speed, judged_frames, len(validation.frames), training)
        spent_s += result.fit_seconds + judged_s
        fitted[index], decisions[index] = done.expert, done.judgement.decision
        overhead.setdefault(candidate.expert, result.ms_per_frame / max(probe, 1e-3))
        seconds_per_view.setdefault(candidate.expert, []).append(
            result.fit_seconds / max(views[candidate.spec] * candidate.orientations, 1))
        on_progress(0.2 + 0.6 * (step + 1) / len(candidates), f"candidate {result.line()}")
    # ensembles of what was fitted: judged after every single candidate, so they never cost a single one its turn
    # a candidate whose outputs on the validation normals do not vary has no spread to scale it by
    scalable = [expert if expert is not None and _has_spread(cache[candidates[i]].judgement) else None
                for i, expert in enumerate(fitted)]
    for candidate, members in ensemble_candidates(results, scalable):
        result = CandidateResult(candidate.expert, candidate.spec, "ok", candidate.orientations, candidate.members)
        estimate = sum(results[i].ms_per_frame for i in members) - (len(members) - 1) * probe_ms[candidate.spec]
        if estimate > training.expert_budget_ms:
            result.status, result.ms_per_frame = "over_budget", estimate
            result.detail = f"estimated {estimate:.0f} ms/frame (its members' sum, one backbone) > {training.expert_budget_ms:.0f}"
        elif spent_s + estimate * judged_frames / 1000 > budget_s:
            result.status = "skipped"
            result.detail = f"the add budget would be spent ({spent_s:.0f} s of {budget_s:.0f} s of work so far)"
        expert, decision = None, None
        if result.status == "ok":
            if candidate not in cache:
                cache[candidate] = _compose_and_judge([cache[candidates[i]] for i in members], candidate.spec,
                                                      validation, backbones, training.batch_size)
            done = cache[candidate]
            spent_s += _record(result, done, speed, judged_frames, len(validation.frames), training)
            expert, decision = done.expert, done.judgement.decision
        fitted.append(expert)
        decisions.append(decision)
        order.append(len(results))
        results.append(result)
        on_progress(0.8, f"candidate {result.line()}")
    return _select(results, fitted, decisions, order)  # every candidate has its result by now


def _record(result: CandidateResult, done: "Fitted", speed: MachineSpeed, judged_frames: int, validation_frames: int,
            training: TrainingConfig) -> float:
    """Fill a fitted candidate's result from its fit and judgement; the estimated seconds of its judging."""
    judgement, backbone = done.judgement, result.spec.backbone
    result.summary, result.measured_fit_seconds = done.expert.fit_summary(), done.wall_seconds
    result.fit_seconds = speed.seconds(done.work, backbone)
    judged_s = speed.seconds(judgement.work, backbone)
    result.ms_per_frame = 1000 * judged_s / judged_frames
    result.image_auroc, result.pixel_auroc = judgement.image_auroc, judgement.pixel_auroc
    result.decision, result.decision_aurocs = judgement.decision.describe(), judgement.decision_aurocs
    result.family_aurocs = judgement.family_aurocs
    result.measured_ms_per_frame = 1000 * judgement.wall_seconds / validation_frames
    if result.ms_per_frame > training.expert_budget_ms:
        result.status, result.detail = "over_budget", f"{result.ms_per_frame:.0f} ms/frame > {training.expert_budget_ms:.0f}"
    return judged_s


def _fit_and_judge(candidate: Candidate, fit_frames: list[np.ndarray], validation: ValidationSet,
                   backbones: Backbones, model: ModelConfig, training: TrainingConfig,
                   features: dict[tuple[InputSpec, int], list]) -> Fitted:
    """The candidate fitted (its spec's fit features computed once, their work charged to the first
    expert that needed them) and judged."""
    expert = build_expert(candidate.expert, model)
    started = time.perf_counter()
    fit_work = Work()
    key = (candidate.spec, candidate.orientations)
    if key not in features:
        frames = rotated(fit_frames, candidate.orientations)
        features[key], fit_work = counted(lambda: fit_batches(frames, candidate.spec, backbones, training.batch_size))
    _, expert_work = counted(lambda: expert.fit(features[key], backbones.for_spec(candidate.spec.backbone)))
    wall = time.perf_counter() - started
    return Fitted(expert, evaluate(expert, candidate.spec, validation, backbones, training.batch_size),
                  fit_work + expert_work, wall)


def ensemble_candidates(results: Sequence[CandidateResult], fitted: Sequence[Expert | None]) -> list[tuple[Candidate, list[int]]]:
    """Ensembles worth judging, with the indices of their members: per spec (and orientations), the fitted
    single candidates within the per-frame budget, when there are two or more: all of them, and the best two
    by validation score when there are more (the best of the rest may only add noise)."""
    groups: dict[tuple[InputSpec, int], list[int]] = {}
    for index, result in enumerate(results):
        if result.status == "ok" and fitted[index] is not None and not result.members:
            groups.setdefault((result.spec, result.orientations), []).append(index)
    ensembles = []
    for (spec, orientations), indices in groups.items():
        ranked = sorted(indices, key=lambda i: -results[i].score)
        choices = [ranked, ranked[:2]] if len(ranked) > 2 else [ranked] if len(ranked) == 2 else []
        ensembles += [(Candidate(Ensemble.name, spec, orientations, tuple(results[i].expert for i in members)), members)
                      for members in choices]
    return ensembles


def _has_spread(judgement: Judgement) -> bool:
    return judgement.normal_score_spread > 0 and judgement.normal_map_spread > 0  # False for NaN too


def _compose_and_judge(members: Sequence[Fitted], spec: InputSpec, validation: ValidationSet, backbones: Backbones,
                       batch_size: int) -> Fitted:
    """An ensemble of fitted candidates, each scaled by its spread on the validation normals, judged like
    any candidate. Its fit is its members' (already paid for: the work is reported, not spent again)."""
    ensemble = Ensemble(members=[Member(m.expert, m.judgement.normal_score_spread, m.judgement.normal_map_spread)
                                 for m in members])
    return Fitted(ensemble, evaluate(ensemble, spec, validation, backbones, batch_size),
                  sum((m.work for m in members), Work()), sum(m.wall_seconds for m in members))


def _views_per_frame(spec: InputSpec, frames: Sequence[np.ndarray]) -> int:
    return len(frame_views(frames[0], spec)) if frames else 1


def _select(results: list[CandidateResult], fitted: list[Expert | None], decisions: list[ImageDecision | None],
            order: list[int]) -> Selection:
    rank = {index: step for step, index in enumerate(order)}  # ties go to the candidate tried first
    eligible = [i for i, r in enumerate(results) if r.status == "ok" and fitted[i] is not None]
    if eligible:
        singles = [i for i in eligible if not results[i].members] or eligible
        best = max(singles, key=lambda i: (results[i].score, -rank[i]))
        # an ensemble must beat the best single candidate by ENSEMBLE_MIN_GAIN: on a near tie the simpler wins
        better = [i for i in eligible if results[i].members and results[i].score > results[best].score + ENSEMBLE_MIN_GAIN]
        best = max(better, key=lambda i: (results[i].score, -rank[i]), default=best)
    else:
        tried = [i for i, f in enumerate(fitted) if f is not None]
        if not tried:
            raise RuntimeError("no candidate expert could be fitted: " + "; ".join(r.line() for r in results))
        best = min(tried, key=lambda i: results[i].ms_per_frame)
        results[best].detail += "; kept as the fastest: no candidate was within the budget"
    return Selection(fitted[best], results[best], results, fitted, decisions)
