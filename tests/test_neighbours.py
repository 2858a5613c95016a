"""The experts' exact nearest-neighbour core: every backend gives the same neighbours."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.common.neighbours import NearestNeighbours


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("k", [1, 3])
def test_torch_top_k_equals_faiss(metric: str, k: int) -> None:
    rng = np.random.default_rng(k)
    bank = rng.normal(size=(500, 24)).astype(np.float32)
    queries = torch.from_numpy(rng.normal(size=(300, 24)).astype(np.float32))
    index = NearestNeighbours(bank, metric)
    faiss_scores, faiss_index = index.search(queries, k, backend="faiss")
    torch_scores, torch_index = index.search(queries, k, backend="torch")
    assert faiss_scores.shape == torch_scores.shape == (300, k) and torch_index.dtype == torch.int64
    np.testing.assert_allclose(torch_scores.numpy(), faiss_scores.numpy(), rtol=1e-4, atol=1e-4)
    assert (torch_index == faiss_index).float().mean() > 0.999  # only exact ties may differ
    expected = ((queries[:, None] - torch.from_numpy(bank)[None]) ** 2).sum(-1) if metric == "l2" else queries @ torch.from_numpy(bank).T
    best = expected.argmin(dim=1) if metric == "l2" else expected.argmax(dim=1)
    assert torch.equal(torch_index[:, 0], best)


def test_chunks_do_not_change_the_answer() -> None:
    rng = np.random.default_rng(5)
    bank = rng.normal(size=(3000, 8)).astype(np.float32)  # 87 queries per chunk on the CPU
    queries = torch.from_numpy(rng.normal(size=(1000, 8)).astype(np.float32))
    index = NearestNeighbours(bank, "l2")
    whole = ((queries[:, None] - torch.from_numpy(bank)[None]) ** 2).sum(-1).min(dim=1)
    scores, found = index.search(queries, 1)
    np.testing.assert_allclose(scores[:, 0].numpy(), whole.values.numpy(), rtol=1e-4, atol=1e-5)
    assert (found[:, 0] == whole.indices).float().mean() > 0.999


def test_k_is_capped_at_the_bank() -> None:
    bank = np.eye(3, dtype=np.float32)
    index = NearestNeighbours(bank, "l2")
    scores, found = index.search(torch.eye(3), 5)
    assert scores.shape == (3, 3) and found[:, 0].tolist() == [0, 1, 2]
    assert scores[:, 0].tolist() == [0.0, 0.0, 0.0]
