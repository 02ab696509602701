"""Neighbourhoods N(i): successful samples close to i in the task-embedding space.

Distances are cosine distances ``d = 1 - cos`` between unit-norm embeddings. For every
sample i (successful or not) N(i) holds:

* kNN (default): the ``k`` nearest successful samples other than i itself;
* epsilon-ball (``eps``): every successful sample j != i with ``cos >= eps``, at most
  :data:`EPS_MAX_NEIGHBOURS` of the nearest ones.

Weights are a Gaussian kernel ``exp(-d^2 / 2 sigma^2)`` normalised to sum to 1 over N(i).
A sample with an empty neighbourhood gets all-zero weights (its manifold term is 0).
The search uses a usearch HNSW index over the successful samples, built single-threaded so
that the same inputs always give the same neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

EPS_MAX_NEIGHBOURS = 256


@dataclass
class Neighbours:
    index: np.ndarray  # [N, K] int64 sample indices, -1 where empty
    weight: np.ndarray  # [N, K] float32, 0 where empty; rows sum to 1 or are all 0
    distance: np.ndarray  # [N, K] float32 cosine distance, inf where empty

    @property
    def empty(self) -> int:
        """Samples without any neighbour."""
        return int((self.index < 0).all(axis=1).sum())

    def arrays(self) -> dict[str, np.ndarray]:
        return {"index": self.index, "weight": self.weight, "distance": self.distance}

    def targets(
        self, routing: torch.Tensor, samples: list[int] | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(``[S, K, D]`` neighbour routing vectors, ``[S, K]`` weights) for ``samples``."""
        idx = torch.as_tensor(self.index[np.asarray(samples)], dtype=torch.long)
        w = torch.as_tensor(self.weight[np.asarray(samples)], dtype=torch.float32)
        return routing[idx.clamp(min=0)], w


def kernel_weights(distance: np.ndarray, valid: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian kernel on distance, normalised over the valid entries of each row."""
    d = np.where(valid, distance, 0.0).astype(np.float64)
    w = np.where(valid, np.exp(-(d**2) / (2.0 * sigma**2)), 0.0)
    total = w.sum(axis=1, keepdims=True)
    return np.divide(w, total, out=np.zeros_like(w), where=total > 0).astype(np.float32)


def find_neighbours(
    embeddings: np.ndarray,
    successful: np.ndarray,
    k: int = 3,
    sigma: float = 0.4,
    eps: float | None = None,
) -> Neighbours:
    """N(i) and W_ij for every sample; see the module docstring."""
    from usearch.index import Index

    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, dim = emb.shape
    succ = np.flatnonzero(np.asarray(successful, dtype=bool))
    width = k if eps is None else min(EPS_MAX_NEIGHBOURS, max(len(succ), 1))
    index = np.full((n, width), -1, dtype=np.int64)
    dist = np.full((n, width), np.inf, dtype=np.float32)
    if len(succ) and n:
        ix = Index(
            ndim=dim,
            metric="cos",
            dtype="f32",
            connectivity=16,
            expansion_add=128,
            expansion_search=max(64, 2 * width + 2),
        )
        ix.add(succ.astype(np.uint64), emb[succ], threads=1)
        count = min(width + 1, len(succ))  # one extra: the sample itself may come back
        found = ix.search(emb, count, threads=1)
        keys = np.asarray(found.keys, dtype=np.int64).reshape(n, -1)
        dists = np.asarray(found.distances, dtype=np.float32).reshape(n, -1)
        counts = np.asarray(found.counts).reshape(n)
        for i in range(n):
            c = int(counts[i])
            row_k, row_d = keys[i, :c], dists[i, :c]
            keep = row_k != i  # never the sample itself
            if eps is not None:
                keep &= row_d <= (1.0 - eps) + 1e-6
            row_k, row_d = row_k[keep][:width], row_d[keep][:width]
            index[i, : len(row_k)] = row_k
            dist[i, : len(row_d)] = np.maximum(row_d, 0.0)
    valid = index >= 0
    return Neighbours(index, kernel_weights(dist, valid, sigma), dist)


def brute_force(embeddings: np.ndarray, successful: np.ndarray, k: int) -> np.ndarray:
    """Exact kNN among successful samples, self excluded (for tests and checks)."""
    emb = np.asarray(embeddings, dtype=np.float64)
    d = 1.0 - emb @ emb.T
    d[:, ~np.asarray(successful, dtype=bool)] = np.inf
    np.fill_diagonal(d, np.inf)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    out = np.where(np.take_along_axis(d, order, 1) < np.inf, order, -1)
    return out.astype(np.int64)
