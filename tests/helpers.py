"""Plain helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.datasets import labeled_test_images, read_mask, train_images
from pipeline.experts import Expert
from pipeline.features.backbone import Backbone, Backbones
from pipeline.features.imaging import decode_image, resize_rgb


def load_pixels(path: Path, image_size: int) -> np.ndarray:
    """A test image squeezed to image_size x image_size, float32 3 x S x S in [0, 1]: experts' unit tests
    feed square batches directly (the live path goes through pipeline.experts.frames)."""
    return resize_rgb(decode_image(path.read_bytes(), 40_000_000), image_size)


def fit_and_predict(expert: Expert, backbone: Backbone, root: Path, category: str, image_size: int) -> dict:
    """Fit `expert` on a category's normal training images (batches of 8) and run it on its test set:
    labels, masks at the input size, scores and maps."""
    train = [load_pixels(p, image_size) for p in train_images(root, category)]
    expert.fit([backbone.extract(train[i : i + 8]) for i in range(0, len(train), 8)], backbone)
    items = labeled_test_images(root, category)
    output = expert.predict(backbone.extract([load_pixels(item.path, image_size) for item in items]))
    return {
        "labels": [item.is_anomalous for item in items],
        "masks": [read_mask(item.mask_path, (image_size, image_size)) for item in items],
        "scores": output.scores,
        "maps": output.maps,
    }


def serve_one_task(redis_client, namespace: str, category: str, expert: Expert, spec, backbones: Backbones, model):
    """An Inspector serving one task of `expert` at `spec` from a real store: random keys, a calibration
    that flags nothing of interest (the tests compare raw scores)."""
    from pipeline.core.calibration import Calibration
    from pipeline.core.inspector import Inspector
    from pipeline.core.store import KnowledgeStore
    from pipeline.core.task import TaskArtifacts

    keys = np.random.default_rng(0).normal(size=(4, backbones.vit.embed_dim)).astype(np.float32)
    calibration = Calibration.from_normals(np.array([0.0, 1.0]), np.array([0.0, 1.0]), np.array([1e6]), 0.1, 1.0)
    store = KnowledgeStore(redis_client, namespace=namespace)
    store.publish(TaskArtifacts(category, expert.name, keys, expert.to_bytes(), calibration, {}, spec))
    inspector = Inspector(backbones, model)
    inspector.sync(store)
    return inspector
