"""Which kinds of image go wrong (compute/properties.py, steps/data_properties.py): every property against a
hand-made image, the statistics against sklearn / scipy / a hand-computed Benjamini–Hochberg case, and a planted
cause on real Fashion-MNIST (30% of the test Pullovers darkened) that the step must find."""
from __future__ import annotations

import contextlib
import gzip
import time

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import sklearn.metrics

from helpers.compute import properties as P


def gray(a) -> np.ndarray:
    return np.asarray(a, np.uint8)[None, ..., None]


# ---------------------------------------------------------------------------------------------- properties
def test_constant_image_has_no_contrast_sharpness_or_edges():
    props = P.image_properties(gray(np.full((16, 16), 200)))
    assert props["brightness"][0] == pytest.approx(200 / 255)
    assert props["contrast"][0] == 0 and props["sharpness"][0] == 0 and props["edge_density"][0] == 0
    assert "colourfulness" not in props        # grayscale: not measured


def test_checkerboard_laplacian_variance_by_hand():
    # 0/255 checkerboard, luminance 0/1: every interior pixel has four opposite neighbours, so the Laplacian is
    # +4 (on a 0) or -4 (on a 1), half each: mean 0, variance 16. Brightness 0.5, contrast (std) 0.5.
    board = (np.indices((10, 10)).sum(axis=0) % 2) * 255
    props = P.image_properties(gray(board))
    assert props["sharpness"][0] == pytest.approx(16.0)
    assert props["brightness"][0] == pytest.approx(0.5) and props["contrast"][0] == pytest.approx(0.5)


def test_step_edge_density_by_hand():
    # Left half 0, right half 1 (10x10): Sobel gx = 4 in the two interior columns beside the step, 0 elsewhere;
    # interior is 8x8 = 64 pixels, 2 columns x 8 rows = 16 edges.
    img = np.zeros((10, 10))
    img[:, 5:] = 255
    assert P.image_properties(gray(img))["edge_density"][0] == pytest.approx(16 / 64)


def test_only_brightness_sees_a_darkened_copy():
    # A darkened copy has the same structure: contrast, sharpness and edges are read from the luminance over
    # its 99th percentile, so only brightness (the mean) moves, by the factor (up to uint8 rounding).
    rng = np.random.default_rng(3)
    img = np.clip(rng.normal(150, 60, (1, 24, 24, 1)), 0, 255).astype(np.uint8)
    img[0, 8:16, 8:16] = 255
    dark = np.round(img * 0.5).astype(np.uint8)
    a, b = P.image_properties(img).iloc[0], P.image_properties(dark).iloc[0]
    assert b["brightness"] == pytest.approx(0.5 * a["brightness"], rel=0.01)
    for k in ("contrast", "sharpness", "edge_density"):
        assert b[k] == pytest.approx(a[k], rel=0.02), k
    # by hand: the 99th percentile is 255 here (64 of 576 pixels), so contrast is the std of luminance itself
    assert a["contrast"] == pytest.approx((img / 255.0).std())


def test_colourfulness_hasler_suesstrunk_by_hand():
    red = np.zeros((1, 8, 8, 3), np.uint8)
    red[..., 0] = 255
    # rg = 255, yb = 127.5 everywhere: sigma 0, mu = sqrt(255² + 127.5²)
    assert P.image_properties(red)["colourfulness"][0] == pytest.approx(0.3 * np.hypot(255, 127.5))
    grayish = np.repeat(np.random.default_rng(0).integers(0, 256, (1, 8, 8, 1), dtype=np.uint8), 3, axis=-1)
    assert P.image_properties(grayish)["colourfulness"][0] == pytest.approx(0.0)   # R = G = B


def test_batches_do_not_change_the_result():
    imgs = np.random.default_rng(1).integers(0, 256, (37, 12, 12, 3), dtype=np.uint8)
    pd.testing.assert_frame_equal(P.image_properties(imgs, batch=5), P.image_properties(imgs, batch=1000))


def test_cam_border_share_and_area():
    h = w = 16
    b = P.border_width(h)                 # 2 pixels of 16
    ring = np.ones((h, w))
    ring[b:h - b, b:w - b] = 0
    centre = 1 - ring
    uniform = np.ones((h, w))
    props = P.cam_properties(np.stack([ring, centre, uniform, np.zeros((h, w))]))
    assert props["cam_border_share"].tolist()[:3] == pytest.approx([1.0, 0.0, 1 - (12 * 12) / 256])
    assert props["cam_area"].tolist()[:3] == pytest.approx([1 - 144 / 256, 144 / 256, 1.0])
    assert props.iloc[3].isna().all()     # an all-zero map looks nowhere


# ---------------------------------------------------------------------------------------------- statistics
def test_auc_delta_and_p_match_sklearn_and_scipy():
    rng = np.random.default_rng(0)
    err, ok = rng.normal(0.3, 1, 40), np.round(rng.normal(0, 1, 70), 1)   # ties included
    auc, p = P.auc_and_p(err, ok)
    y = np.r_[np.ones(len(err)), np.zeros(len(ok))]
    assert auc == pytest.approx(sklearn.metrics.roc_auc_score(y, np.r_[err, ok]))
    assert p == pytest.approx(scipy.stats.mannwhitneyu(err, ok, alternative="two-sided").pvalue)
    greater = (err[:, None] > ok[None, :]).mean() - (err[:, None] < ok[None, :]).mean()
    assert P.cliffs_delta(auc) == pytest.approx(greater) == pytest.approx(2 * auc - 1)


def test_benjamini_hochberg_hand_computed():
    # sorted 0.005, 0.01, 0.03, 0.04 (m = 4): p·m/rank = 0.02, 0.02, 0.04, 0.04, then the running minimum from
    # the top leaves them so; back in the given order:
    got = P.bh_adjust([0.01, 0.04, 0.03, 0.005, np.nan])
    np.testing.assert_allclose(got[:4], [0.02, 0.04, 0.04, 0.02])
    assert np.isnan(got[4])
    # where the running minimum matters: sorted 0.01, 0.02, 0.021 (m = 3) give p·m/rank 0.03, 0.03, 0.021; the
    # minimum over this and every larger rank makes all three 0.021
    np.testing.assert_allclose(P.bh_adjust([0.02, 0.01, 0.021]), [0.021, 0.021, 0.021])


def test_quartile_rates_and_skips_on_a_planted_toy():
    rng = np.random.default_rng(0)
    n = 400
    labels = np.repeat([0, 1], n // 2)
    value = rng.random(n)
    preds = labels.copy()
    # class 0: the darkest quarter goes to class 1 at 60%, the rest at 5%
    dark = (labels == 0) & (value < np.quantile(value[labels == 0], 0.25))
    preds[(labels == 0) & (rng.random(n) < np.where(dark, 0.6, 0.05))] = 1
    preds[np.flatnonzero(labels == 1)[:2]] = 0     # class 1: 2 errors only -> skipped
    props = pd.DataFrame({"brightness": value, "noise": rng.random(n)})
    pairs = pd.DataFrame({"true_id": [0, 1], "pred_id": [1, 0], "count": [0, 0]})
    comps = P.comparisons(pairs, None, 2)
    tests, quant, skipped = P.slice_tests(props, labels, preds, comps, ["a", "b"], ["brightness", "noise"])
    assert any(s.startswith("b → a: skipped") for s in skipped)
    row = tests[(tests["comparison"] == "a → b") & (tests["property"] == "brightness")].iloc[0]
    q = quant[(quant["comparison"] == "a → b") & (quant["property"] == "brightness")]
    mine = labels == 0
    went = preds[mine] == 1
    order = np.argsort(value[mine], kind="stable")
    by_hand = [went[order[k * 50:(k + 1) * 50]].mean() for k in range(4)]
    np.testing.assert_allclose(q["error_rate"], by_hand)
    expected = by_hand[0] / by_hand[3] if by_hand[3] else np.inf    # the darkest over the brightest quartile
    assert row["cliffs_delta"] < -0.3 and row["rate_ratio"] == pytest.approx(expected)
    assert P.top_findings(tests).set_index("comparison").loc["a → b", "property"] == "brightness"
    # BH over every test run, in one call
    np.testing.assert_allclose(tests["p_bh"], scipy.stats.false_discovery_control(tests["p_value"]))


# ---------------------------------------------------------------------------------------------- real data
# Darkening 30% of the Pullovers x0.35 is a cause only where the model fails on dark images. PlainCNN (no
# BatchNorm) does: 48% of the darkened Pullovers go wrong against 29% of the rest, mostly to Shirt. FashionCNN
# (bias-free convs + BatchNorm) does not: 21% against 26%, so there is no cause to find and the step must not
# claim one.
PULLOVER, LIMIT, SHARE = 2, 5000, 0.30


def _darkened_root(tmp_path, factor: float):
    """A DATA_ROOT whose test images are Fashion-MNIST's with 30% of the Pullovers (of the first LIMIT)
    multiplied by `factor`; the other files are the originals."""
    from helpers.data.readers import SYSTEM_FASHION_MNIST as SRC
    root = tmp_path / "fmnist_dark"
    root.mkdir()
    for f in SRC.iterdir():
        if f.name != "t10k-images-idx3-ubyte.gz":
            (root / f.name).symlink_to(f)
    raw = bytearray(gzip.decompress((SRC / "t10k-images-idx3-ubyte.gz").read_bytes()))
    labels = np.frombuffer(gzip.decompress((SRC / "t10k-labels-idx1-ubyte.gz").read_bytes()), np.uint8, offset=8)
    images = np.frombuffer(bytes(raw[16:]), np.uint8).reshape(-1, 28, 28).copy()
    pull = np.flatnonzero(labels[:LIMIT] == PULLOVER)
    dark = np.sort(np.random.default_rng(0).choice(pull, int(round(SHARE * len(pull))), replace=False))
    images[dark] = np.round(images[dark] * factor).astype(np.uint8)
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes(raw[:16]) + images.tobytes(), 1))
    return root, dark


def _check_outputs(an, sec) -> None:
    from helpers.steps.data_properties import index_section
    an.run.outputs.flush()
    csv = pd.read_csv(an.run.outputs.current("deep_dive/property_slices.csv"))
    assert {"comparison", "property", "auc", "cliffs_delta", "p_value", "p_bh", "error_rate_q1"} <= set(csv)
    png = an.run.outputs.current("deep_dive/property_slices.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = index_section(an.run, sec)
    assert "data:image/jpeg;base64," in page and "Pullover → any other class" in page
    assert sec.properties["cam_area"].notna().sum() == sec.n_cam_images > 0


@pytest.mark.slow
@pytest.mark.parametrize("arch, causes_errors", [("PlainCNN", True), ("FashionCNN", False)])
def test_planted_darkening_is_found_on_real_fashion_mnist(request, tmp_path, arch, causes_errors):
    from conftest import FMNIST_ARCH, PLAIN_ARCH
    from helpers.config import Params
    from helpers.data.readers import SYSTEM_FASHION_MNIST
    from helpers.pipeline import Analysis
    from helpers.steps.data_properties import property_slices, summary_lines
    if not (SYSTEM_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    factor = 0.35
    checkpoint = request.getfixturevalue("fmnist_plain_checkpoint" if arch == "PlainCNN" else "fmnist_checkpoint")
    root, dark = _darkened_root(tmp_path, factor)
    params = Params(MODEL_PATH=str(checkpoint), ARCH=PLAIN_ARCH if arch == "PlainCNN" else FMNIST_ARCH, DATASET="fashion_mnist",
                    DATA_ROOT=str(root), DOWNLOAD=False, LIMIT=LIMIT, OUTPUT_DIR=str(tmp_path / "out"),
                    DEVICE="cpu", SEED=0)
    an = Analysis(params, progress=False)
    an.load_model()
    an.load_data()
    an.predict()
    conf = an.confusion()
    t0 = time.perf_counter()
    sec = property_slices(an.run, conf, group_ids=[0, 2, 4, 6])
    step_s = time.perf_counter() - t0
    pr = an.preds
    err_dark = np.mean(pr.preds[dark] != PULLOVER)
    rest = np.setdiff1d(np.flatnonzero(pr.labels == PULLOVER), dark)
    print(f"\nPullover error rate: darkened {err_dark:.1%}, untouched {np.mean(pr.preds[rest] != PULLOVER):.1%}")
    print("\n".join(summary_lines(sec)))
    print(f"time: inference {an.timings['inference']:.2f} s, property_slices {step_s:.2f} s "
          f"(ratio {step_s / an.timings['inference']:.2f}); CAMs for {sec.n_cam_images} images")
    _check_outputs(an, sec)
    an.outputs.close(raise_errors=False)

    # The ground truth, independent of the step: do the darkened Pullovers go wrong more often than the rest?
    wrong = [[int((pr.preds[d] != PULLOVER).sum()), int((pr.preds[d] == PULLOVER).sum())] for d in (dark, rest)]
    truth_p = scipy.stats.fisher_exact(wrong, alternative="greater").pvalue
    tests = sec.tests.set_index(["comparison", "property"])
    overall = tests.loc[("Pullover → any other class", "brightness")]
    print(f"{arch} x{factor}: darkened wrong {err_dark:.1%} vs rest; Fisher p {truth_p:.2g}; step: brightness δ "
          f"{overall['cliffs_delta']:+.2f}, BH p {overall['p_bh']:.2g}")
    # the step calls brightness a cause of Pullover's errors exactly when it is one
    assert (truth_p < 0.01) == (overall["p_bh"] < 0.01 and overall["cliffs_delta"] < 0), (truth_p, overall)
    assert (truth_p < 0.01) == causes_errors, truth_p
    if not causes_errors:
        return
    # Brightness is the top image property of Pullover's errors, overall and towards Shirt (where the darkened
    # ones go), with a BH-corrected p < 0.01.
    assert err_dark > 0.4 > np.mean(pr.preds[rest] != PULLOVER)   # the planted cause does cause errors
    for comp in ("Pullover → any other class", "Pullover → Shirt"):
        top = sec.findings.set_index("comparison").loc[comp]
        assert top["property"] == "brightness", (comp, top)
        b = tests.loc[(comp, "brightness")]
        assert b["cliffs_delta"] < -0.15 and b["p_bh"] < 0.01 and b["rate_ratio"] > 1.5, (comp, b)
        print(f"{comp}: top image property {top['property']} (close behind: {top['close'] or '-'}); brightness "
              f"δ {b['cliffs_delta']:+.2f}, AUC {b['auc']:.2f}, BH p {b['p_bh']:.2g}, darkest/brightest quartile "
              f"error rate {b['rate_low']:.1%}/{b['rate_high']:.1%} = {b['rate_ratio']:.1f}x")
    # the darkest-quartile rate by hand: the darkest quarter of all Pullover images, share that went wrong
    mine = np.flatnonzero(pr.labels == PULLOVER)
    first = -(-len(mine) // 4)    # quantile_bins puts ceil(n/4) images in the first quartile
    darkest = mine[np.argsort(sec.properties["brightness"].to_numpy()[mine], kind="stable")[:first]]
    assert overall["rate_low"] == pytest.approx(np.mean(pr.preds[darkest] != PULLOVER))



def test_step_layering_files_stay_small():
    from pathlib import Path
    root = Path(P.__file__).resolve().parents[1]
    for rel in ("compute/properties.py", "plots/properties.py", "steps/data_properties.py"):
        assert len((root / rel).read_text().splitlines()) <= 600



def _fake_run(tmp_path, images, labels, preds, cams=None, original_sizes=None):
    """The parts of a Run the step reads, around a real Outputs."""
    from types import SimpleNamespace
    from helpers.files.outputs import Outputs
    names = [f"class {i}" for i in range(int(max(labels.max(), preds.max())) + 1)]
    return SimpleNamespace(data=SimpleNamespace(images=images, num_classes=len(names), original_sizes=original_sizes),
                           preds=SimpleNamespace(labels=labels, preds=preds), cams=cams, names=names,
                           params=SimpleNamespace(SEED=0), outputs=Outputs(tmp_path / "out"), costly_cams=False,
                           model_threads=contextlib.nullcontext)


class _Cams:
    """A CAM store stand-in: every map is the image itself, scaled to [0, 1]; counts what was asked."""
    def __init__(self, images):
        self.images, self.asked = images, []

    def get(self, idx, classes, keep=True):
        self.asked += list(idx)
        x = self.images[idx, ..., 0].astype(np.float32)
        return x / np.maximum(x.reshape(len(x), -1).max(axis=1), 1)[:, None, None]


def test_step_on_a_synthetic_run_writes_csv_png_and_asks_cams_only_for_tested_classes(tmp_path):
    from types import SimpleNamespace
    from helpers.steps.data_properties import index_section, property_slices, summary_lines
    rng = np.random.default_rng(0)
    n = 300
    labels = np.repeat([0, 1, 2], n // 3)
    images = rng.integers(0, 256, (n, 12, 12, 1), dtype=np.uint8)
    preds = labels.copy()
    dark = (labels == 0) & (rng.random(n) < 0.3)
    images[dark] //= 4
    preds[dark & (rng.random(n) < 0.8)] = 1          # class 0: dark images go to class 1
    preds[np.flatnonzero(labels == 2)[:2]] = 0        # class 2: only 2 errors -> skipped
    cams = _Cams(images)
    run = _fake_run(tmp_path, images, labels, preds, cams)
    pairs = pd.DataFrame({"true_id": [0, 2], "pred_id": [1, 0], "count": [int((preds[labels == 0] == 1).sum()), 2]})
    sec = property_slices(run, SimpleNamespace(pairs=pairs))
    assert set(labels[cams.asked]) == {0, 2} and sec.n_cam_images == 200   # never class 1's images
    top = sec.findings.set_index("comparison").loc["class 0 → class 1"]
    assert top["property"] == "brightness" or "brightness" in top["close"].split(", "), sec.findings
    bright = sec.tests.set_index(["comparison", "property"]).loc[("class 0 → class 1", "brightness")]
    assert bright["cliffs_delta"] < 0 and bright["p_bh"] < 0.01   # the dark images are the errors
    assert any("class 2 → class 0: skipped" in s for s in sec.skipped)
    assert "Colourfulness: not measured (grayscale images)." in sec.notes
    lines = summary_lines(sec)
    assert lines[0].startswith("Which kinds of image go wrong") and any("skipped" in x for x in lines)
    page = index_section(run, sec)
    assert "data:image/jpeg;base64," in page and "&lt;" not in page
    csv = pd.read_csv(run.outputs.current("deep_dive/property_slices.csv"))
    assert csv["note"].fillna("").str.contains("2 errors").any()
    run.outputs.close()


def test_step_with_no_pairs_and_no_cams(tmp_path):
    from types import SimpleNamespace
    from helpers.steps.data_properties import index_section, property_slices, summary_lines
    images = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    labels = np.zeros(20, np.int64)
    run = _fake_run(tmp_path, images, labels, labels.copy(), cams=None)
    empty = pd.DataFrame({"true_id": [], "pred_id": [], "count": []})
    sec = property_slices(run, SimpleNamespace(pairs=empty))
    assert len(sec.tests) == 0 and len(sec.findings) == 0 and sec.n_cam_images == 0
    assert "colourfulness" in sec.properties and sec.properties["cam_area"].isna().all()
    assert len(summary_lines(sec)) == 1 and "<table>" in index_section(run, sec)
    run.outputs.close()


def test_image_folder_original_sizes_are_kept_and_tested(tmp_path):
    # Real files of mixed sizes, resized on load: the Dataset keeps each file's own (height, width).
    from types import SimpleNamespace
    from PIL import Image
    from helpers.data.datasets import load_dataset
    from helpers.steps.data_properties import property_slices, summary_lines
    rng = np.random.default_rng(0)
    shapes = {"cat": [(20, 40), (32, 32)], "dog": [(64, 16), (32, 32)]}
    for cls, sizes in shapes.items():
        (tmp_path / "folder" / cls).mkdir(parents=True)
        for k, (h, w) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "folder" / cls / f"{k}.png")
    data = load_dataset("imagefolder", root=tmp_path / "folder", image_size=16)
    assert data.images.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(data.original_sizes, [[20, 40], [32, 32], [64, 16], [32, 32]])
    got = P.source_properties(data.original_sizes)
    np.testing.assert_allclose(got["original_size"], [np.sqrt(800), 32, 32, 32])
    np.testing.assert_allclose(got["aspect_ratio"], [2.0, 1.0, 0.25, 1.0])

    # A planted cause: class 0's images from small files go to class 1.
    n = 300
    labels = np.repeat([0, 1, 2], n // 3)
    images = rng.integers(0, 256, (n, 12, 12, 1), dtype=np.uint8)
    side = rng.integers(40, 400, n)
    preds = labels.copy()
    small = (labels == 0) & (side < 120)
    preds[small & (rng.random(n) < 0.8)] = 1
    run = _fake_run(tmp_path, images, labels, preds, original_sizes=np.stack([side, side], axis=1))
    pairs = pd.DataFrame({"true_id": [0], "pred_id": [1], "count": [int((preds[labels == 0] == 1).sum())]})
    sec = property_slices(run, SimpleNamespace(pairs=pairs))
    top = sec.findings.set_index("comparison").loc["class 0 → class 1"]
    assert top["property"] == "original_size" and top["cliffs_delta"] < -0.5 and top["p_bh"] < 0.01
    assert "aspect_ratio" not in set(sec.tests["property"])   # square files: a constant is not tested
    assert any("smallest original" in line for line in summary_lines(sec))
    run.outputs.close()
