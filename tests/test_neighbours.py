"""Neighbour selection: successful only, never self, kernel weights sum to 1, usearch == brute force."""

from __future__ import annotations

import numpy as np
import pytest

from tuner.roma.neighbours import brute_force, find_neighbours, kernel_weights


def _emb(n, dim=16, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_knn_successful_only_never_self_and_equals_brute_force(k):
    emb = _emb(300)
    successful = np.random.default_rng(1).random(300) < 0.6
    nb = find_neighbours(emb, successful, k=k, sigma=0.4)
    assert nb.index.shape == (300, k)
    assert (nb.index != np.arange(300)[:, None]).all()
    assert successful[nb.index].all()
    np.testing.assert_array_equal(nb.index, brute_force(emb, successful, k))
    np.testing.assert_allclose(nb.weight.sum(1), 1.0, rtol=1e-5)
    # distances are cosine distances, ascending, and weights fall with distance
    d_true = 1 - np.einsum("nd,nkd->nk", emb, emb[nb.index])
    np.testing.assert_allclose(nb.distance, d_true, atol=1e-5)
    assert (np.diff(nb.weight, axis=1) <= 1e-6).all()


def test_kernel_weights_formula():
    d = np.array([[0.1, 0.3, 0.0]], dtype=np.float32)
    valid = np.array([[True, True, False]])
    w = kernel_weights(d, valid, sigma=0.4)
    raw = np.exp(-(np.array([0.1, 0.3]) ** 2) / (2 * 0.4**2))
    np.testing.assert_allclose(w[0, :2], raw / raw.sum(), rtol=1e-6)
    assert w[0, 2] == 0


def test_samples_without_neighbours_get_zero_weights():
    emb = _emb(10)
    only_one = np.zeros(10, dtype=bool)
    only_one[4] = True
    nb = find_neighbours(emb, only_one, k=3)
    assert (nb.index[4] == -1).all() and nb.weight[4].sum() == 0  # itself is not a neighbour
    others = np.delete(np.arange(10), 4)
    assert (nb.index[others, 0] == 4).all() and (nb.index[others, 1:] == -1).all()
    np.testing.assert_allclose(nb.weight[others].sum(1), 1.0)
    assert nb.empty == 1
    none = find_neighbours(emb, np.zeros(10, dtype=bool), k=3)
    assert none.empty == 10 and none.weight.sum() == 0


def test_eps_ball():
    emb = _emb(200, dim=4)
    successful = np.ones(200, dtype=bool)
    eps = 0.9
    nb = find_neighbours(emb, successful, k=3, eps=eps)
    sim = emb @ emb.T
    for i in range(200):
        expected = {j for j in range(200) if j != i and sim[i, j] >= eps}
        got = set(nb.index[i][nb.index[i] >= 0].tolist())
        assert got == expected
        if got:
            assert abs(nb.weight[i].sum() - 1) < 1e-5


_DIGEST = """
import hashlib, sys
import numpy as np
from tuner.roma.neighbours import find_neighbours
x = np.random.default_rng(0).normal(size=(500, 16)).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
succ = np.random.default_rng(1).random(500) < 0.7
nb = find_neighbours(x, succ, k=3, sigma=0.4)
print(hashlib.sha256(b"".join(a.tobytes() for a in nb.arrays().values())).hexdigest())
"""


def test_deterministic_across_processes_and_thread_counts():
    """Same inputs, same neighbours, weights and distances: in this process, and in fresh
    processes (another hash seed) with 1 and 2 threads for OpenMP/BLAS."""
    import hashlib
    import os
    import subprocess
    import sys

    x = np.random.default_rng(0).normal(size=(500, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    succ = np.random.default_rng(1).random(500) < 0.7
    nb = find_neighbours(x, succ, k=3, sigma=0.4)
    here = hashlib.sha256(b"".join(a.tobytes() for a in nb.arrays().values())).hexdigest()
    digests = {}
    for threads in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": threads}
        env.update(
            dict.fromkeys(("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"), threads)
        )
        out = subprocess.run(
            [sys.executable, "-c", _DIGEST], env=env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr[-2000:]
        digests[threads] = out.stdout.strip()
    assert digests == {"1": here, "2": here}
