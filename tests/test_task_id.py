"""Task identification by nearest keys: farthest-point sampling, batched distances, unknown frames."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.core.task_id import KeyTaskIdentifier, farthest_point_sampling, select_keys


# ------------------------------------------------------------------------------ farthest points
@pytest.mark.parametrize("seed", range(10))
def test_fps_first_three_include_both_extremes_in_1d(seed: int) -> None:
    # Two extremes and a tight cluster in the middle: whatever the random first pick, the next two
    # farthest points include both ends.
    values = [4.8, 0.0, 4.9, 5.0, 10.0, 5.1, 5.2]
    points = torch.tensor(values)[:, None]
    chosen = farthest_point_sampling(points, 3, seed=seed).tolist()
    assert len(set(chosen)) == 3
    assert {1, 4} <= set(chosen)  # indices of 0.0 and 10.0


@pytest.mark.parametrize("seed", range(3))
def test_fps_is_greedy_farthest_and_distinct(seed: int) -> None:
    points = torch.from_numpy(np.random.default_rng(seed).normal(size=(80, 5)).astype(np.float32))
    chosen = farthest_point_sampling(points, 30, seed=seed).tolist()
    assert len(set(chosen)) == 30
    assert farthest_point_sampling(points, 30, seed=seed).tolist() == chosen  # seeded
    p = points.double()
    for i in range(1, 30):
        dist = torch.cdist(p, p[chosen[:i]]).amin(dim=1)
        assert dist[chosen[i]] == pytest.approx(float(dist.max()), rel=1e-5)


def test_fps_k_at_least_n_returns_all() -> None:
    points = torch.zeros(4, 2)
    assert farthest_point_sampling(points, 4).tolist() == [0, 1, 2, 3]
    assert farthest_point_sampling(points, 10).tolist() == [0, 1, 2, 3]


def test_select_keys_shape_and_membership() -> None:
    features = torch.from_numpy(np.random.default_rng(0).normal(size=(3, 16, 8)).astype(np.float32))
    keys = select_keys(features, 10, seed=0)
    assert keys.shape == (10, 8) and keys.dtype == np.float32
    flat = features.reshape(-1, 8).numpy()
    for key in keys:  # every key is one of the patches
        assert np.any(np.all(flat == key, axis=1))
    assert len({k.tobytes() for k in keys}) == 10


# ------------------------------------------------------------------------------------ distances
def naive_distances(features: np.ndarray, keys: dict[str, np.ndarray]) -> np.ndarray:
    """B x T: per frame, per task (sorted by name), mean over patches of the nearest-key distance."""
    names = sorted(keys)
    out = np.zeros((features.shape[0], len(names)))
    for b, frame in enumerate(features.astype(np.float64)):
        for t, name in enumerate(names):
            total = 0.0
            for patch in frame:
                total += min(math.dist(patch, key) for key in keys[name].astype(np.float64))
            out[b, t] = total / len(frame)
    return out


def _task_keys(rng: np.random.Generator, dim: int, counts: dict[str, int], spread: float = 0.3):
    centers = {name: rng.normal(scale=5.0, size=dim) for name in counts}
    keys = {name: (centers[name] + rng.normal(scale=spread, size=(n, dim))).astype(np.float32)
            for name, n in counts.items()}
    return centers, keys


@pytest.mark.parametrize("counts", [{"a": 4, "b": 4}, {"a": 1, "b": 7, "c": 3}, {"solo": 5}])
def test_distances_equal_naive_loop(counts: dict[str, int]) -> None:
    rng = np.random.default_rng(len(counts))
    _, keys = _task_keys(rng, 6, counts)
    identifier = KeyTaskIdentifier(keys, {name: 1.0 for name in keys})
    assert len(identifier) == len(counts) and identifier.names == sorted(counts)
    features = rng.normal(scale=4.0, size=(3, 10, 6)).astype(np.float32)
    got = identifier.distances(torch.from_numpy(features)).numpy()
    assert got.shape == (3, len(counts))
    np.testing.assert_allclose(got, naive_distances(features, keys), rtol=1e-4, atol=1e-4)


def test_identify_routes_near_keys_and_flags_unknown() -> None:
    rng = np.random.default_rng(7)
    dim = 8
    centers, keys = _task_keys(rng, dim, {"brick": 6, "grass": 2, "gravel": 11})
    bounds = {name: 2.0 for name in keys}
    identifier = KeyTaskIdentifier(keys, bounds)

    # Frames whose patches are small perturbations of one task's keys.
    frames, truth = [], []
    for name, task_keys in keys.items():
        for _ in range(3):
            picks = task_keys[rng.integers(0, len(task_keys), size=5)]
            frames.append(picks + rng.normal(scale=0.05, size=picks.shape))
            truth.append(name)
    # Frames far from every task.
    for _ in range(3):
        frames.append(rng.normal(size=(5, dim)) + 40.0)
        truth.append(None)
    matches = identifier.identify(torch.from_numpy(np.stack(frames).astype(np.float32)))

    assert [m.category for m in matches] == truth
    distances = identifier.distances(torch.from_numpy(np.stack(frames).astype(np.float32))).numpy()
    for match, row in zip(matches, distances):
        assert 0.0 <= match.margin <= 1.0
        assert match.nearest == identifier.names[int(np.argmin(row))]
        # the product form loses digits when keys sit far from the origin next to their distance (here 14 vs
        # 0.14; real tokens: about 4 vs 2) and rounds differently with the shape of the call
        assert match.distance == pytest.approx(float(row.min()), rel=1e-3)
        if match.category is None:
            assert match.distance > bounds[match.nearest]
        else:
            assert match.distance <= bounds[match.category]
            assert match.margin > 0.5  # near one task, far from the others


def test_bounds_decide_unknown_per_task() -> None:
    keys = {"near": np.zeros((1, 2), np.float32), "far": np.full((1, 2), 100.0, np.float32)}
    frame = torch.tensor([[[3.0, 4.0]]])  # distance 5 to "near"
    assert KeyTaskIdentifier(keys, {"near": 5.0, "far": 0.0}).identify(frame)[0].category == "near"
    match = KeyTaskIdentifier(keys, {"near": 4.99, "far": 1e9}).identify(frame)[0]
    assert match.category is None and match.nearest == "near" and match.distance == pytest.approx(5.0)


def test_margin_is_relative_gap() -> None:
    keys = {"a": np.zeros((1, 1), np.float32), "b": np.full((1, 1), 10.0, np.float32)}
    identifier = KeyTaskIdentifier(keys, {"a": 100.0, "b": 100.0})
    match = identifier.identify(torch.tensor([[[4.0]]]))[0]  # 4 from a, 6 from b
    assert match.category == "a" and match.margin == pytest.approx((6 - 4) / 4)
    tie = identifier.identify(torch.tensor([[[5.0]]]))[0]
    assert tie.margin == pytest.approx(0.0)
    exact = identifier.identify(torch.tensor([[[0.0]]]))[0]  # distance 0: margin capped at 1
    assert exact.category == "a" and exact.margin == 1.0


def test_single_task_margin_is_one() -> None:
    identifier = KeyTaskIdentifier({"only": np.zeros((3, 4), np.float32)}, {"only": 10.0})
    matches = identifier.identify(torch.ones(2, 5, 4))
    assert [(m.category, m.margin) for m in matches] == [("only", 1.0), ("only", 1.0)]


def test_zero_tasks_is_unknown() -> None:
    identifier = KeyTaskIdentifier({}, {})
    assert len(identifier) == 0
    matches = identifier.identify(torch.zeros(3, 4, 8))
    assert len(matches) == 3
    for match in matches:
        assert match.category is None and match.nearest is None
        assert match.distance == float("inf") and match.margin == 0.0


# ------------------------------------------------------------------------------------ shortlist
def _exhaustive(identifier: KeyTaskIdentifier, features: torch.Tensor) -> tuple[list[str], np.ndarray]:
    distances = identifier.distances(features).numpy()
    return [identifier.names[i] for i in distances.argmin(axis=1)], distances.min(axis=1)


def test_shortlist_with_many_tasks_gives_the_exhaustive_task_distance_and_decision() -> None:
    rng = np.random.default_rng(11)
    _, keys = _task_keys(rng, 16, {f"task-{i:03d}": 8 for i in range(300)}, spread=1.0)
    bounds = {name: 3.0 for name in keys}
    identifier = KeyTaskIdentifier(keys, bounds, candidates=2)
    frames = [keys[name][rng.integers(0, 8, size=12)] + rng.normal(scale=0.8, size=(12, 16))
              for name in rng.choice(sorted(keys), size=40)]
    frames += [rng.normal(scale=5.0, size=(12, 16)) for _ in range(10)]  # of no task: unknown
    features = torch.from_numpy(np.stack(frames).astype(np.float32))
    nearest, distance = _exhaustive(identifier, features)
    matches = identifier.identify(features)
    assert identifier.shortlist(features).shape == (50, 2)  # exactly two tasks scored per frame
    # frames of a task: its nearest task and distance; frames of none: the same decision (their nearest
    # task is a diagnostic only, and may be another far task)
    assert [m.nearest for m in matches[:40]] == nearest[:40]
    np.testing.assert_allclose([m.distance for m in matches[:40]], distance[:40], rtol=1e-4)
    assert [m.category is None for m in matches] == [d > 3.0 for d in distance]
    assert any(m.category is None for m in matches) and any(m.category for m in matches)


def test_shortlist_at_least_every_task_is_the_exhaustive_search() -> None:
    rng = np.random.default_rng(3)
    _, keys = _task_keys(rng, 6, {"a": 3, "b": 5, "c": 2})
    features = torch.from_numpy(rng.normal(scale=4.0, size=(20, 7, 6)).astype(np.float32))
    full = KeyTaskIdentifier(keys, {n: 1e9 for n in keys}, candidates=3)
    assert full.shortlist(features).tolist() == [[0, 1, 2]] * 20
    nearest, _ = _exhaustive(full, features)
    assert [m.nearest for m in full.identify(features)] == nearest
    np.testing.assert_allclose(full.distances(features).numpy(), naive_distances(features.numpy(), keys), rtol=1e-4)


def test_shortlist_scores_the_nearest_prototypes_and_takes_the_runner_up_among_them() -> None:
    keys = {"a": np.array([[0.0]], np.float32), "b": np.array([[10.0]], np.float32),
            "c": np.array([[11.0]], np.float32)}
    identifier = KeyTaskIdentifier(keys, {n: 100.0 for n in keys}, candidates=2)
    frame = torch.tensor([[[9.0]]])  # 1 from b, 2 from c, 9 from a: a is not scored
    assert sorted(identifier.shortlist(frame)[0].tolist()) == [1, 2]
    match = identifier.identify(frame)[0]
    assert match.category == "b" and match.margin == pytest.approx((2 - 1) / 1)
    with pytest.raises(ValueError):
        KeyTaskIdentifier(keys, {n: 1.0 for n in keys}, candidates=0)


def test_a_candidate_behind_the_nearest_prototype_is_scored_fully_when_it_comes_close() -> None:
    # a's keys straddle the frame (prototype 5, nearest key 4.8 away); b's one key is 0.8 away
    keys = {"a": np.array([[0.0], [10.0]], np.float32), "b": np.array([[6.0]], np.float32),
            "c": np.array([[100.0]], np.float32)}
    identifier = KeyTaskIdentifier(keys, {n: 1.0 for n in keys}, candidates=2)
    frame = torch.full((1, 64, 1), 5.2)
    assert identifier.shortlist(frame)[0].tolist() == [0, 1]  # a's prototype first
    match = identifier.identify(frame)[0]
    assert match.category == "b" and match.distance == pytest.approx(0.8, rel=1e-5)
    assert match.margin == pytest.approx(1.0)  # (4.8 - 0.8) / 0.8, capped
