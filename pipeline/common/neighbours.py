"""Exact nearest-neighbour search over a fixed bank, on the device the queries are on.

The experts' one search core. On the CPU it is faiss's flat index (L2 or inner product). On a GPU it is
faiss's GPU flat index when faiss was built with GPUs (the `gpu` extra, faiss-gpu), else a chunked
torch product with top-k, so the features never leave the GPU. Every backend is exact; they differ
only in floating-point rounding (tested against each other).
"""

from __future__ import annotations

from typing import Literal

import faiss
import numpy as np
import torch

Metric = Literal["l2", "ip"]  # l2: squared Euclidean distances, ip: inner products (largest first)
_MAX_SCORES_PER_CHUNK = 1 << 25  # query x bank scores held at once by the torch backend (128 MiB)


class NearestNeighbours:
    """`search(queries, k)` -> (scores, indices), both torch tensors on the queries' device: squared L2
    distances ascending, or inner products descending."""

    def __init__(self, bank: np.ndarray, metric: Metric = "l2"):
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)  # M x D
        self.metric = metric
        self._faiss = (faiss.IndexFlatL2 if metric == "l2" else faiss.IndexFlatIP)(self.bank.shape[1])
        self._faiss.add(self.bank)
        self._on_device: dict[torch.device, object] = {}  # a GPU's faiss index or bank tensor, built on first use

    def __len__(self) -> int:
        return len(self.bank)

    def search(self, queries: torch.Tensor, k: int = 1, backend: Literal["auto", "faiss", "torch"] = "auto"
               ) -> tuple[torch.Tensor, torch.Tensor]:
        k = min(k, len(self.bank))
        queries = queries.float()
        use_torch = backend == "torch" or (backend == "auto" and queries.device.type != "cpu" and not _faiss_has_gpus())
        if use_torch:
            return self._torch_search(queries, k)
        if queries.device.type != "cpu" and backend == "auto":
            return self._faiss_gpu_search(queries, k)
        scores, index = self._faiss.search(np.ascontiguousarray(queries.cpu().numpy()), k)
        return torch.from_numpy(scores), torch.from_numpy(index.astype(np.int64))

    def _torch_search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        bank = self._device_bank(queries.device)
        bank_norms = (bank * bank).sum(dim=1) if self.metric == "l2" else None
        chunk = max(1, _MAX_SCORES_PER_CHUNK // len(bank))
        scores, indices = [], []
        for start in range(0, len(queries), chunk):
            rows = queries[start : start + chunk]
            products = rows @ bank.T
            if self.metric == "l2":
                squared = ((rows * rows).sum(dim=1, keepdim=True) + bank_norms - 2.0 * products).clamp_min_(0.0)
                top = squared.topk(k, dim=1, largest=False)
            else:
                top = products.topk(k, dim=1, largest=True)
            scores.append(top.values)
            indices.append(top.indices)
        return torch.cat(scores), torch.cat(indices)

    def _faiss_gpu_search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = self._on_device.get(queries.device)
        if index is None:
            resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(resources, queries.device.index or 0, self._faiss)
            self._on_device[queries.device] = index
        scores, found = index.search(np.ascontiguousarray(queries.cpu().numpy()), k)
        return (torch.from_numpy(scores).to(queries.device), torch.from_numpy(found.astype(np.int64)).to(queries.device))

    def _device_bank(self, device: torch.device) -> torch.Tensor:
        bank = self._on_device.get(device)
        if bank is None:
            bank = torch.from_numpy(self.bank).to(device)
            self._on_device[device] = bank
        return bank


def _faiss_has_gpus() -> bool:
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
