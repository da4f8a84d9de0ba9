import os
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from helpers.compute import deep_dive
from helpers.errors import ConfigError, DataError


def _blobs(n_per_class=30, n_classes=3, dim=8, spread=10.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, spread, (n_classes, dim))
    labels = np.repeat(np.arange(n_classes), n_per_class)
    return centres[labels] + rng.normal(0, 1, (len(labels), dim)), labels


# ----------------------------------------------------------------------------- separability

def test_separability_high_on_separated_blobs():
    x, y = _blobs(spread=10.0)
    out = deep_dive.separability(x, y, cv=5)
    assert out["accuracy"] >= 0.97
    assert out["n"] == 90 and out["chance"] == pytest.approx(1 / 3) and out["folds"] == 5


def test_separability_near_chance_on_identical_distributions():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(150, 5))
    y = np.repeat([0, 1, 2], 50)
    out = deep_dive.separability(x, y, cv=5)
    assert abs(out["accuracy"] - 1 / 3) < 0.15


def test_separability_reduces_folds_and_reports_tiny_classes():
    x, y = _blobs(n_per_class=3)
    out = deep_dive.separability(x, y, cv=5)
    assert out["folds"] == 3 and "3 folds" in out["note"] and out["accuracy"] > 0.8
    x1 = np.vstack([x, x[:1]])
    y1 = np.append(y, 7)                      # class 7 has a single image
    out = deep_dive.separability(x1, y1)
    assert np.isnan(out["accuracy"]) and "7" in out["note"]
    out = deep_dive.separability(x[:3], y[:3])
    assert np.isnan(out["accuracy"]) and "fewer than 2 classes" in out["note"]


# ----------------------------------------------------------------------------- 2-D projection

def test_project_2d_tsne_path():
    x, _ = _blobs(n_per_class=15)
    coords, method = deep_dive.project_2d(x, seed=0, method="tsne")
    assert method == "t-SNE" and coords.shape == (45, 2) and np.isfinite(coords).all()
    again, _ = deep_dive.project_2d(x, seed=0, method="t-SNE")
    np.testing.assert_allclose(coords, again)   # seeded -> reproducible
    one_dim, _ = deep_dive.project_2d(x[:, :1], method="tsne")
    assert one_dim.shape == (45, 2)


def test_project_2d_auto_falls_back_to_tsne_without_umap(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)    # makes `import umap` raise ImportError
    coords, method = deep_dive.project_2d(_blobs(n_per_class=4)[0], method="auto")
    assert method == "t-SNE" and coords.shape == (12, 2)
    with pytest.raises(ConfigError):
        deep_dive.project_2d(_blobs()[0], method="umap")


def test_project_2d_auto_uses_umap_with_capped_neighbours(monkeypatch):
    seen = {}

    class FakeUMAP:
        def __init__(self, **kwargs):
            seen.update(kwargs)

        def fit_transform(self, x):
            return x[:, :2] * 2

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=FakeUMAP))
    x = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    coords, method = deep_dive.project_2d(x, seed=7)
    assert method == "UMAP" and coords.shape == (10, 2)
    # Small data: UMAP gets the exact euclidean distance matrix, precomputed.
    from scipy.spatial.distance import cdist
    np.testing.assert_allclose(coords, cdist(x.astype(np.float64), x.astype(np.float64))[:, :2] * 2, atol=1e-6)
    assert seen["n_neighbors"] == 9 and seen["random_state"] == 7 and seen["n_components"] == 2
    assert seen["metric"] == "precomputed"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_umap_on_precomputed_distances_builds_umaps_own_graph():
    """The premise of project_2d's small-data shortcut: the same fuzzy neighbour graph as UMAP's euclidean path."""
    umap = pytest.importorskip("umap")
    from sklearn.metrics import pairwise_distances

    from helpers.compute.jit_cache import enable_umap_jit_cache
    enable_umap_jit_cache()
    x, _ = _blobs(n_per_class=20)
    own = umap.UMAP(n_neighbors=15, random_state=0, n_jobs=1).fit(x)
    pre = umap.UMAP(n_neighbors=15, random_state=0, n_jobs=1, metric="precomputed").fit(
        pairwise_distances(np.asarray(x, np.float64)))
    assert own.graph_.nnz == pre.graph_.nnz
    assert abs(own.graph_ - pre.graph_).max() < 1e-5


@pytest.mark.skipif(not os.environ.get("GRADCAM_SLOW_TESTS"),
                    reason="real UMAP compiles numba kernels (~10 s); set GRADCAM_SLOW_TESTS=1")
def test_project_2d_real_umap():
    coords, method = deep_dive.project_2d(_blobs(n_per_class=20)[0])
    assert method == "UMAP" and coords.shape == (60, 2)


def test_project_2d_rejects_bad_input():
    with pytest.raises(DataError):
        deep_dive.project_2d(np.zeros((3, 4)))
    with pytest.raises(DataError):
        deep_dive.project_2d(np.full((10, 4), np.nan))
    with pytest.raises(ConfigError):
        deep_dive.project_2d(np.zeros((10, 4)), method="pca")


# ----------------------------------------------------------------------------- head similarity

def test_head_cosine_similarity_known_weights():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 4))
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([[1.0, 0, 0], [1.0, 1.0, 0], [0, 0, 2.0], [0, -3.0, 0]]))
    cos = deep_dive.head_cosine_similarity(model, [0, 1, 3], num_classes=4)
    s = 1 / np.sqrt(2)
    np.testing.assert_allclose(cos, [[1, s, 0], [s, 1, -s], [0, -s, 1]], atol=1e-12)
    # num_classes picks the Linear with that many outputs, even when it is not the last one
    first = deep_dive.head_cosine_similarity(model, [0, 1], num_classes=3)
    w = model[0].weight.detach().double()
    expected = (w[0] @ w[1] / (w[0].norm() * w[1].norm())).item()
    assert first[0, 1] == pytest.approx(expected)
    assert deep_dive.head_cosine_similarity(nn.Sequential(nn.Conv2d(1, 2, 3)), [0, 1]) is None
    assert deep_dive.head_cosine_similarity(model, [0, 1], num_classes=10) is None
    value, (r, c) = deep_dive.max_off_diagonal(cos)
    assert value == pytest.approx(s) and {r, c} == {0, 1}


# ----------------------------------------------------------------------------- occlusion

class PatchSum(nn.Module):
    """Logit 0 = sum of the pixels in rows 8..11, cols 20..23 (all channels); logit 1 = 0."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        patch = x[:, :, 8:12, 20:24].sum(dim=(1, 2, 3)) * self.scale
        return torch.stack([patch, torch.zeros_like(patch)], dim=1)


def test_occlusion_finds_the_only_region_that_matters():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) + 0.5        # positive, so occluding with 0 lowers logit 0
    maps = deep_dive.occlusion_attribution(PatchSum(), x, np.array([0, 1]))
    assert maps.shape == (2, 32, 32) and maps.dtype == np.float32
    inside = np.zeros((32, 32), bool)
    inside[8:12, 20:24] = True
    first = maps[0]
    assert first[inside].min() > 0
    r, c = np.unravel_index(first.argmax(), first.shape)
    assert inside[r, c]
    # non-overlapping 4-px windows: the patch is exactly one window, and nothing outside it matters
    assert np.abs(first[~inside]).max() == 0
    # with a half-window stride the overlapping windows around it respond too, and only those
    smooth = deep_dive.occlusion_attribution(PatchSum(), x, np.array([0, 1]), stride=2)[0]
    near = np.zeros((32, 32), bool)
    near[6:14, 18:26] = True
    assert smooth[inside].min() > 0 and np.abs(smooth[~near]).max() == 0 and (smooth[near] > 0).all()
    assert np.abs(maps[1]).max() == 0          # the constant logit does not depend on any pixel
    norm = deep_dive.normalise01(maps)
    assert norm[0].min() == 0 and norm[0].max() == pytest.approx(1) and (norm[1] == 0).all()


def test_occlusion_window_scales_with_image_size():
    assert deep_dive.default_occlusion_window(32, 32) == 4
    assert deep_dive.default_occlusion_window(224, 224) == 28
    assert deep_dive.default_occlusion_window(5, 5) == 1
    with pytest.raises(ConfigError):
        deep_dive.occlusion_attribution(PatchSum(), torch.rand(1, 3, 32, 32), [0], window=40)


# ----------------------------------------------------------------------------- cleanlab

def test_cleanlab_finds_flipped_labels():
    n, c = 300, 3
    true = np.repeat(np.arange(c), n // c)
    probs = np.full((n, c), 0.02)
    probs[np.arange(n), true] = 0.96
    labels = true.copy()
    flipped = np.array([5, 120, 250])
    labels[flipped] = (true[flipped] + 1) % c
    found = deep_dive.cleanlab_label_issues(labels, probs.astype(np.float32))
    assert found is not None and set(flipped) <= set(found.tolist())
    assert len(found) <= 10


def test_cleanlab_missing_returns_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "cleanlab.filter", None)
    assert deep_dive.cleanlab_label_issues(np.array([0, 1]), np.eye(2)) is None
