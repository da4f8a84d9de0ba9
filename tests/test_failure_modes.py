"""Failure modes inside one confusion (compute/modes.py, plots/modes.py, steps/model_modes.py): pooling against
torch, CAM centroid and area by hand, planted modes recovered (synthetic, and on the real Fashion-MNIST model
with two kinds of Shirt error reported as one pair), one mode kept on homogeneous errors, the files written."""
from __future__ import annotations

from types import SimpleNamespace

import contextlib

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from helpers.compute import modes as M


# ---------------------------------------------------------------------------------------------- pieces
@pytest.mark.parametrize("h, w", [(28, 28), (32, 32), (10, 13), (7, 7)])
def test_pool_matches_torch_adaptive_avg_pool(h, w):
    maps = np.random.default_rng(0).random((3, h, w))
    ref = torch.nn.functional.adaptive_avg_pool2d(torch.as_tensor(maps), 7).numpy()
    np.testing.assert_allclose(M.pool(maps, 7), ref, rtol=1e-10, atol=1e-12)


def test_cam_centroid_and_area_by_hand():
    one = np.zeros((4, 4))
    one[1, 2] = 1.0                       # pixel centre (1.5, 2.5) of 4: (0.375, 0.625); 1 of 16 pixels
    left = np.zeros((4, 4))
    left[:, :2] = 1.0                     # x centres 0.5, 1.5 -> 1.0 / 4 = 0.25; y symmetric 0.5; half the pixels
    ramp = np.tile(np.array([0.0, 1.0, 1.0, 2.0]), (4, 1)) / 2   # values 0, .5, .5, 1: only x = 3 is above 0.5
    uniform = np.ones((4, 4))
    cy, cx, area = M.cam_centroid_area(np.stack([one, left, ramp, uniform, np.zeros((4, 4))]))
    np.testing.assert_allclose(cy[:4], [0.375, 0.5, 0.5, 0.5])
    # ramp: weights 0, .5, .5, 1 on x centres .5, 1.5, 2.5, 3.5 -> (0.75 + 1.25 + 3.5) / 2 / 4 = 0.6875
    np.testing.assert_allclose(cx[:4], [0.625, 0.25, 0.6875, 0.5])
    np.testing.assert_allclose(area[:4], [1 / 16, 0.5, 0.25, 1.0])   # uniform: every pixel is at its max
    assert np.isnan([cy[4], cx[4], area[4]]).all()                  # an all-zero map looks nowhere


def test_representation_gives_each_block_its_weight():
    rng = np.random.default_rng(1)
    feats = rng.normal(0, [1, 10, 100, 1000], (50, 4))   # scales apart: z-scoring puts them level
    feats = np.hstack([feats, np.full((50, 1), 3.0)])    # a constant feature adds nothing (not NaN)
    cam_t, cam_p = rng.random((50, 14, 14)), rng.random((50, 14, 14))
    for w in (0.5, 0.2):
        x = M.representation(feats, cam_t, cam_p, cam_weight=w, grid=7)
        assert x.shape == (50, 5 + 49) and np.isfinite(x).all()
        f_var, c_var = x[:, :5].var(axis=0).sum(), x[:, 5:].var(axis=0).sum()
        assert f_var == pytest.approx((1 - w) * 4 / 5) and c_var == pytest.approx(w)   # 4 of 5 features vary
        np.testing.assert_allclose(x[:, :4].var(axis=0), (1 - w) / 5)


def test_modes_are_numbered_largest_first():
    # sizes: 1 has 4, 0 and 2 have 2 each; the tie goes to 2, seen first
    np.testing.assert_array_equal(M._relabel_by_size(np.array([2, 0, 0, 1, 1, 1, 2, 1])), [1, 2, 2, 0, 0, 0, 1, 0])


# ---------------------------------------------------------------------------------------------- the choice
def _planted(rng, sizes, dim=32, grid=14, spread=1.0):
    """Errors in len(sizes) planted modes: each a feature-space Gaussian around its own centre, and a
    predicted-class CAM blob at its own place (true-class CAM: a common central blob)."""
    centres = rng.normal(0, 3, (len(sizes), dim))
    places = [(3, 3), (10, 10), (3, 10), (10, 3)]
    yy, xx = np.mgrid[:grid, :grid]
    feats, cam_t, cam_p, truth = [], [], [], []
    for m, n in enumerate(sizes):
        feats.append(centres[m] + rng.normal(0, spread, (n, dim)))
        for _ in range(n):
            y, x = np.array(places[m]) + rng.normal(0, 1, 2)
            cam_p.append(np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 8) + 0.05 * rng.random((grid, grid)))
            cam_t.append(np.exp(-((yy - 6.5) ** 2 + (xx - 6.5) ** 2) / 8) + 0.05 * rng.random((grid, grid)))
        truth += [m] * n
    norm = lambda a: (a - a.min(axis=(1, 2), keepdims=True)) / np.ptp(a, axis=(1, 2), keepdims=True)  # noqa: E731
    return np.vstack(feats), norm(np.array(cam_t)), norm(np.array(cam_p)), np.array(truth)


@pytest.mark.parametrize("sizes", [(40, 25), (30, 30, 20), (12, 8)])
def test_planted_modes_are_recovered_synthetic(sizes):
    feats, cam_t, cam_p, truth = _planted(np.random.default_rng(len(sizes)), sizes)
    choice = M.choose_modes(M.representation(feats, cam_t, cam_p))
    assert choice.k == len(sizes), choice
    assert adjusted_rand_score(truth, choice.labels) >= 0.8
    assert choice.silhouettes[choice.k] >= M.MIN_SILHOUETTE
    assert np.bincount(choice.labels).tolist() == sorted(sizes, reverse=True)   # largest first


def test_modes_in_the_cam_alone_are_recovered():
    # Same features for both modes: only where the predicted class's CAM looks differs.
    rng = np.random.default_rng(5)
    feats, cam_t, cam_p, truth = _planted(rng, (30, 30))
    feats = rng.normal(0, 1, feats.shape)
    choice = M.choose_modes(M.representation(feats, cam_t, cam_p))
    assert choice.k == 2 and adjusted_rand_score(truth, choice.labels) >= 0.8


@pytest.mark.parametrize("n", [60, 200])
def test_one_homogeneous_mode_keeps_k_1(n):
    # One Gaussian in the features, one CAM place (with jitter): any split is arbitrary and the silhouettes
    # stay below the threshold.
    feats, cam_t, cam_p, _ = _planted(np.random.default_rng(n), (n,))
    choice = M.choose_modes(M.representation(feats, cam_t, cam_p))
    assert choice.k == 1 and (choice.labels == 0).all()
    assert max(choice.silhouettes.values()) < M.MIN_SILHOUETTE
    assert "< 0.25: one mode" in choice.reason


def test_few_errors_or_a_tiny_outlier_group_keep_one_mode():
    feats, cam_t, cam_p, _ = _planted(np.random.default_rng(0), (3, 2))
    assert M.choose_modes(M.representation(feats, cam_t, cam_p)).k == 1   # 5 < MIN_ERRORS
    # 40 alike and 2 far away: silhouette is high for k = 2, but a mode of 2 errors is not a failure mode
    x = np.vstack([np.random.default_rng(1).normal(0, 1, (40, 5)), [[50, 50, 50, 50, 50], [51, 50, 50, 50, 50]]])
    choice = M.choose_modes(x)
    assert choice.k == 1 and np.isnan(choice.silhouettes[2])
    assert M.choose_modes(np.ones((10, 3))).k == 1


# ---------------------------------------------------------------------------------------------- the step
class _Cams:
    """A CAM store stand-in: a fixed map per (image, class)."""
    def __init__(self, table):
        self.table = table

    def get(self, idx, classes, keep=True):
        return np.stack([self.table[(int(i), int(c))] for i, c in zip(idx, classes)]) if len(idx) else \
            np.zeros((0, 14, 14))


def _fake_run(tmp_path, names):
    """A run with one pair (0 -> 1) of 65 errors in two planted modes, 30 correct images of each class, and a
    pair (1 -> 0) of 4 errors."""
    from helpers.files.outputs import Outputs
    from helpers.plots.overlay import overlay_many
    rng = np.random.default_rng(0)
    feats, cam_t, cam_p, truth = _planted(rng, (40, 25))
    n_err = len(truth)
    labels = np.r_[np.zeros(n_err), np.zeros(30), np.ones(30), np.ones(4)].astype(np.int64)
    preds = np.r_[np.ones(n_err), np.zeros(30), np.ones(30), np.zeros(4)].astype(np.int64)
    n = len(labels)
    features = np.vstack([feats, rng.normal(0, 1, (n - n_err, feats.shape[1]))]).astype(np.float32)
    probs = np.full((n, 3), 0.05)
    probs[np.arange(n), preds] = np.r_[np.where(truth == 0, 0.9, 0.6), rng.uniform(0.5, 0.9, n - n_err)]
    probs[np.arange(n), 2] = 1 - probs.sum(axis=1) + probs[:, 2]
    table = {}
    for i in range(n):
        for c in range(3):
            table[(i, c)] = (cam_p[i] if c == 1 else cam_t[i]) if i < n_err else rng.random((14, 14))
    images = rng.integers(0, 256, (n, 14, 14, 1), dtype=np.uint8)
    run = SimpleNamespace(
        params=SimpleNamespace(SEED=0, N_PAIR_GALLERIES=5), names=names, progress=False,
        data=SimpleNamespace(images=images, class_names=names),
        preds=SimpleNamespace(labels=labels, preds=preds, probs=probs, features=features), cams=_Cams(table), costly_cams=False, model_threads=contextlib.nullcontext,
        outputs=Outputs(tmp_path / "out"), class_slug=lambda c: f"{c:03d}_c{c}",
        overlays=lambda idx, cams: list(overlay_many([images[i] for i in idx], cams)))
    pairs = pd.DataFrame({"true_id": [0, 1], "pred_id": [1, 0], "count": [n_err, 4]})
    return run, SimpleNamespace(pairs=pairs), truth


def _check_files(run, sec):
    from helpers.steps.model_modes import index_section
    page = index_section(run, sec)
    csv = pd.read_csv(run.outputs.current("deep_dive/failure_modes.csv"))
    assert len(csv) == len(sec.modes) == sum(p.k for p in sec.pairs)
    assert {"pair", "true_id", "pred_id", "mode", "size", "mean_conf", "cam_cy", "cam_cx", "cam_area"} <= set(csv)
    drawn = sec.pairs[:run.params.N_PAIR_GALLERIES]
    assert all(not p.figure for p in sec.pairs[len(drawn):])
    for k, p in enumerate(drawn, start=1):
        assert p.figure == (f"deep_dive/failure_modes_{k}_{run.class_slug(p.true_id)}_to_"
                            f"{run.class_slug(p.pred_id)}.png")
        assert run.outputs.current(p.figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.count("data:image/") == len(drawn)
    return csv, page


def test_step_on_planted_modes_without_data(tmp_path):
    from helpers.steps.model_modes import failure_modes, summary_lines
    run, conf, truth = _fake_run(tmp_path, ["<b>tops</b>", "shirts & co", "other"])
    sec = failure_modes(run, conf, data=None)
    big, small = sec.pairs
    assert (big.k, big.n_errors, small.k, small.n_errors) == (2, 65, 1, 4)
    mode_of = np.zeros(65, np.int64)
    for m in big.modes:
        mode_of[m.indices] = m.mode
    assert adjusted_rand_score(truth, mode_of) >= 0.8
    # mode 1 is the 40-error mode (confidence 0.9, CAM near (3.5, 3.5)/14), mode 2 the 25 (0.6, (10.5, 10.5)/14)
    m1, m2 = big.modes
    assert (m1.size, m2.size) == (40, 25)
    assert m1.mean_conf == pytest.approx(0.9) and m2.mean_conf == pytest.approx(0.6)
    assert m1.cam_cy < 0.4 < 0.6 < m2.cam_cy and m1.cam_cx < 0.4 < 0.6 < m2.cam_cx
    assert np.isnan(m1.wrong_label_share) and m1.property_means == {}
    assert "wrong_label_share" not in sec.modes and sec.wrong_label_source == ""
    row = sec.modes.iloc[0]
    assert row["silhouette"] == row["silhouette_k2"] == pytest.approx(big.silhouettes[2])
    assert row["silhouette"] >= M.MIN_SILHOUETTE
    assert np.isnan(sec.modes.iloc[2]["silhouette"])        # 4 errors: nothing tried
    csv, page = _check_files(run, sec)
    assert "<b>" not in page and "&lt;b&gt;tops&lt;/b&gt; → shirts &amp; co" in page
    lines = summary_lines(sec)
    assert any("no wrong-label shares" in x for x in lines) and any("2 modes" in x for x in lines)
    run.outputs.close()


def test_step_with_data_reports_wrong_labels_and_property_means(tmp_path):
    from helpers.compute import label_errors as le
    from helpers.steps.model_modes import failure_modes
    run, conf, truth = _fake_run(tmp_path, ["a", "b", "c"])
    n = len(run.preds.labels)
    props = pd.DataFrame({"index": np.arange(n)[::-1], "brightness": np.arange(n)[::-1] / n,   # rows reversed
                          "cam_area": np.where(np.arange(n)[::-1] % 2, np.nan, 1.0)})
    wrong, _ = le.confident_learning_mask(run.preds.labels, run.preds.probs)
    data = SimpleNamespace(labels=SimpleNamespace(validated=False, wrong=wrong),
                           properties=SimpleNamespace(properties=props, property_names=["brightness", "cam_area"]))
    sec = failure_modes(run, conf, data)
    for m in sec.pairs[0].modes:
        idx = np.array(m.indices)
        assert m.wrong_label_share == pytest.approx(wrong[idx].mean())
        assert m.property_means["brightness"] == pytest.approx(idx.mean() / n)   # by index, not by row
        assert m.property_means["cam_area"] == pytest.approx(1.0) or np.all(idx % 2)   # NaN-aware
    assert {"wrong_label_share", "brightness_mean", "cam_area_mean"} <= set(sec.modes)
    assert sec.wrong_label_source == "suspected (unvalidated)"
    _check_files(run, sec)
    run.outputs.close()


# ---------------------------------------------------------------------------------------------- real data
SHIRT, TSHIRT, SNEAKER, ANKLE_BOOT = 6, 0, 7, 9


@pytest.mark.slow
def test_planted_second_mode_and_data_columns_on_real_fashion_mnist(fmnist_checkpoint, tmp_path):
    """Real model, real test images (the first 5000). Shirt → T-shirt/top alone is one mode. Then the Ankle boots
    it calls Sneaker are planted into that pair (their labels and predictions rewritten to Shirt and T-shirt/top,
    as a mislabelled batch would be): their real features and CAMs are a second mode, which the step must
    recover with ARI >= 0.8 against where each error came from. With the data step, the one mode's wrong-label
    share is the data step's own count for the pair, and its property means those of its images."""
    import dataclasses
    import time
    from conftest import FMNIST_ARCH
    from helpers.config import Params
    from helpers.data.readers import SYSTEM_FASHION_MNIST
    from helpers.pipeline import Analysis
    from helpers.steps.model_modes import failure_modes, summary_lines
    if not (SYSTEM_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    an = Analysis(Params(MODEL_PATH=str(fmnist_checkpoint), ARCH=FMNIST_ARCH, DATASET="fashion_mnist",
                         DATA_ROOT=str(SYSTEM_FASHION_MNIST), DOWNLOAD=False, LIMIT=5000,
                         OUTPUT_DIR=str(tmp_path / "out"), DEVICE="cpu", SEED=0), progress=False)
    an.load_model()
    an.load_data()
    an.predict()
    conf = an.confusion()
    data = an.data_causes()
    run, pr = an.run, an.preds
    t0 = time.perf_counter()
    sec = failure_modes(run, conf, data)
    step_s = time.perf_counter() - t0
    print(f"\nfailure_modes over {len(conf.pairs)} pairs: {step_s:.2f} s (inference {an.timings['inference']:.2f} s)")
    print("\n".join(summary_lines(sec)))
    alone = next(p for p in sec.pairs if (p.true_id, p.pred_id) == (SHIRT, TSHIRT))
    assert alone.k == 1 and alone.n_errors > 30
    counted = data.labels.pairs.set_index(["scope", "true_id", "pred_id"]).loc[("pair", SHIRT, TSHIRT)]
    (mode,) = alone.modes
    assert mode.size == counted["errors"] == alone.n_errors
    assert mode.wrong_label_share == pytest.approx(counted["wrong_labels"] / counted["errors"])
    props = data.properties.properties.set_index("index").loc[mode.indices]
    for c in ("brightness", "edge_density", "cam_area"):
        assert mode.property_means[c] == pytest.approx(props[c].mean())
    csv, _ = _check_files(run, sec)
    assert len(csv) == sum(p.k for p in sec.pairs) and {"wrong_label_share", "brightness_mean"} <= set(csv)

    boots = (pr.labels == ANKLE_BOOT) & (pr.preds == SNEAKER)
    assert boots.sum() >= 10
    run.preds = dataclasses.replace(pr, labels=np.where(boots, SHIRT, pr.labels),
                                    preds=np.where(boots, TSHIRT, pr.preds))
    pair = SimpleNamespace(pairs=pd.DataFrame({"true_id": [SHIRT], "pred_id": [TSHIRT], "count": [0]}))
    got = failure_modes(run, pair).pairs[0]
    idx = np.flatnonzero((run.preds.labels == SHIRT) & (run.preds.preds == TSHIRT))
    mode_of = pd.Series({i: m.mode for m in got.modes for i in m.indices}).reindex(idx).to_numpy()
    ari = adjusted_rand_score(boots[idx].astype(int), mode_of)
    print(f"planted: {len(idx)} errors ({boots.sum()} Ankle boots), {got.reason}, ARI {ari:.3f}")
    assert got.k == 2 and ari >= 0.8
    an.outputs.close(raise_errors=False)


def test_step_uses_human_verdicts_when_the_data_step_had_them(tmp_path):
    # The data step's per-image verdicts (LabelEvidence.wrong): 5 of the 25-error mode's images rejected by
    # the workers, none of the other mode's.
    from helpers.steps.model_modes import failure_modes
    run, conf, truth = _fake_run(tmp_path, ["a", "b", "c"])
    verdict = np.zeros(len(run.preds.labels), bool)
    verdict[np.flatnonzero(truth == 1)[:5]] = True
    data = SimpleNamespace(labels=SimpleNamespace(validated=True, wrong=verdict), properties=None)
    sec = failure_modes(run, conf, data)
    assert sec.wrong_label_source == "human-validated"
    assert [m.wrong_label_share for m in sec.pairs[0].modes] == pytest.approx([0.0, 5 / 25])
    assert sec.property_names == [] and "wrong_label_share" in sec.modes
    run.outputs.close()


def test_step_without_cams_says_so(tmp_path):
    from helpers.steps.model_modes import failure_modes, index_section, summary_lines
    run, conf, _ = _fake_run(tmp_path, ["a", "b", "c"])
    run.cams = None
    sec = failure_modes(run, conf)
    assert sec.pairs == [] and len(sec.modes) == 0 and "skipped" in sec.notes[0]
    assert "<table>" in index_section(run, sec) and summary_lines(sec)
    run.outputs.close()


def test_costly_cams_cluster_fewer_errors_in_the_pairs_without_a_figure(tmp_path):
    from helpers.steps import model_modes
    run, conf, _ = _fake_run(tmp_path, ["a", "b", "c"])
    run.costly_cams = True
    drawn = model_modes.failure_modes(run, conf, data=None).pairs[0]
    run.params.N_PAIR_GALLERIES = 0
    table_only = model_modes.failure_modes(run, conf, data=None).pairs[0]
    assert (drawn.n_errors, drawn.n_clustered) == (65, model_modes.COSTLY_MAX_ERRORS)
    assert (table_only.n_errors, table_only.n_clustered) == (65, model_modes.COSTLY_LATER_ERRORS)
