"""Before/after comparison of two tiny models trained differently, checked against hand computations."""
from __future__ import annotations

import csv
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

import helpers.pipeline
from helpers.compare import FILES, Comparison, compare
from helpers.compute.changes import fixed_and_broken, mcnemar_p, pair_changes
from helpers.config import Params
from helpers.data.datasets import load_dataset
from helpers.errors import ConfigError
from helpers.model.inference import to_tensor
from helpers.plots.gallery import LAYOUT

from conftest import REPO, TINY_ARCH, run_params, train_briefly
from tiny_model import TinyNet


def params_for(cifar_root, ckpt, out, **kw) -> Params:
    return run_params(cifar_root, ckpt, out, **kw)


@pytest.fixture(scope="module")
def checkpoint_b(cifar_root, tmp_path_factory):
    """A second TinyNet, trained differently from tiny_checkpoint (1 epoch instead of 4, another seed)."""
    train = load_dataset("cifar100", root=cifar_root, split="train", download=False)
    torch.manual_seed(1)
    model = train_briefly(TinyNet(num_classes=100), train.images, train.labels, train.mean, train.std,
                          epochs=1, seed=1)
    path = tmp_path_factory.mktemp("ckpt_b") / "tiny_b.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def result(cifar_root, tiny_checkpoint, checkpoint_b, tmp_path_factory) -> Comparison:
    out = tmp_path_factory.mktemp("cmp") / "gradcam_results"
    return compare(params_for(cifar_root, tiny_checkpoint, out), checkpoint_b, n_examples=4, progress=False)


@pytest.fixture(scope="module")
def reference(cifar_root, tiny_checkpoint, checkpoint_b):
    """Both models evaluated by hand: plain torch, no helpers pipeline."""
    data = load_dataset("cifar100", root=cifar_root, split="test", download=False)
    x = to_tensor(data.images, data.mean, data.std)
    out = {"labels": data.labels, "fine_to_coarse": data.fine_to_coarse}
    for key, path in (("a", tiny_checkpoint), ("b", checkpoint_b)):
        sd = torch.load(path, map_location="cpu", weights_only=True)
        model = TinyNet(num_classes=100)
        model.load_state_dict(sd.get("state_dict", sd))
        with torch.no_grad():
            probs = torch.softmax(model.eval()(x), dim=1).numpy()
        out[f"probs_{key}"], out[f"preds_{key}"] = probs, probs.argmax(1)
    return out


def read_csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_models_differ_and_predictions_match_a_plain_torch_evaluation(result, reference):
    assert (reference["preds_a"] != reference["preds_b"]).sum() > 20
    acc_a = (reference["preds_a"] == reference["labels"]).mean()
    acc_b = (reference["preds_b"] == reference["labels"]).mean()
    assert result.summary["accuracy_a"] == pytest.approx(acc_a)
    assert result.summary["accuracy_b"] == pytest.approx(acc_b)
    assert result.summary["n_images"] == len(reference["labels"]) == 400


def test_per_class_accuracy_delta_matches_hand_computation(result, reference):
    labels, pa, pb = reference["labels"], reference["preds_a"], reference["preds_b"]
    rows = read_csv(result.out / "per_class_accuracy_delta.csv")
    assert len(rows) == 100
    for c in range(100):
        m = labels == c
        delta = (pb[m] == c).mean() - (pa[m] == c).mean()
        r = rows[c]
        assert int(r["class_id"]) == c and int(r["support"]) == m.sum()
        assert int(r["correct_a"]) == (pa[m] == c).sum() and int(r["correct_b"]) == (pb[m] == c).sum()
        assert float(r["delta"]) == pytest.approx(delta)
        assert int(r["fixed"]) == ((pa[m] != c) & (pb[m] == c)).sum()
        assert int(r["broken"]) == ((pa[m] == c) & (pb[m] != c)).sum()
    assert rows[42]["class_name"] == "leopard"


def test_fixed_and_broken_images_match_hand_computation(result, reference):
    labels, pa, pb = reference["labels"], reference["preds_a"], reference["preds_b"]
    fixed = set(np.nonzero((pa != labels) & (pb == labels))[0].tolist())
    broken = set(np.nonzero((pa == labels) & (pb != labels))[0].tolist())
    assert fixed and broken
    assert set(result.fixed.tolist()) == fixed and set(result.broken.tolist()) == broken
    assert result.summary["n_fixed"] - result.summary["n_broken"] == (pb == labels).sum() - (pa == labels).sum()
    rows = read_csv(result.out / "fixed_and_broken.csv")
    assert {int(r["index"]) for r in rows if r["status"] == "fixed"} == fixed
    assert {int(r["index"]) for r in rows if r["status"] == "broken"} == broken
    for r in rows[:10]:
        i = int(r["index"])
        assert int(r["pred_a_id"]) == pa[i] and int(r["pred_b_id"]) == pb[i] and int(r["true_id"]) == labels[i]
    # the galleries show A's most confident mistakes that B fixed first
    conf_a = reference["probs_a"][result.fixed, pa[result.fixed]]
    assert np.all(np.diff(conf_a) <= 1e-6)


def test_pair_changes_match_the_two_confusion_matrices(result, reference):
    labels, pa, pb = reference["labels"], reference["preds_a"], reference["preds_b"]
    rows = read_csv(result.out / "pair_changes.csv")
    assert rows
    for r in rows:
        t, p = int(r["true_id"]), int(r["pred_id"])
        ca, cb = ((labels == t) & (pa == p)).sum(), ((labels == t) & (pb == p)).sum()
        assert t != p and (int(r["count_a"]), int(r["count_b"])) == (ca, cb) and int(r["delta"]) == cb - ca != 0
        assert r["change"] == ("better" if cb < ca else "worse")
    # every changed off-diagonal cell is listed, so the deltas add up to the change in the number of errors
    assert sum(int(r["delta"]) for r in rows) == (pb != labels).sum() - (pa != labels).sum()
    deltas = np.abs([int(r["delta"]) for r in rows])
    assert np.all(np.diff(deltas) <= 0)


def test_calibration_and_superclass_changes_match_hand_computation(result, reference):
    labels, f2c = reference["labels"], reference["fine_to_coarse"]

    def ece(probs):   # 15 equal-width bins on the max probability, written out directly
        conf, correct = probs.max(1), probs.argmax(1) == labels
        total = 0.0
        for lo, hi in zip(np.linspace(0, 1, 16)[:-1], np.linspace(0, 1, 16)[1:]):
            m = (conf > lo) & (conf <= hi) if lo > 0 else (conf <= hi)
            if m.any():
                total += m.mean() * abs(correct[m].mean() - conf[m].mean())
        return total

    def within(preds):
        wrong = preds != labels
        return (f2c[labels[wrong]] == f2c[preds[wrong]]).mean()

    s = result.summary
    assert s["ece_a"] == pytest.approx(ece(reference["probs_a"]), abs=1e-6)
    assert s["ece_delta"] == pytest.approx(ece(reference["probs_b"]) - ece(reference["probs_a"]), abs=1e-6)
    assert s["superclass_share_delta"] == pytest.approx(within(reference["preds_b"]) - within(reference["preds_a"]))
    text = (result.out / "compare_summary.txt").read_text(encoding="utf-8")
    assert f"{s['ece_a']:.4f}" in text and f"{s['ece_b']:.4f}" in text and f"{s['ece_delta']:+.4f}" in text
    assert f"{s['superclass_share_delta'] * 100:+.2f} pp" in text
    assert f"fixed (A wrong → B right): {s['n_fixed']}; broken (A right → B wrong): {s['n_broken']}" in text


def test_mcnemar_and_small_inputs():
    from scipy.stats import binomtest
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(30, 10) == pytest.approx(binomtest(10, 40, 0.5).pvalue)
    labels = np.array([0, 0, 1, 1, 2])
    pa, pb = np.array([0, 1, 1, 0, 2]), np.array([1, 1, 1, 1, 2])
    probs = np.full((5, 3), 1 / 3)
    fixed, broken = fixed_and_broken(labels, pa, pb, probs, probs)
    assert fixed.tolist() == [3] and broken.tolist() == [0]
    pairs = pair_changes(labels, pa, pb, ["x", "y", "z"])
    assert pairs[["true_id", "pred_id", "count_a", "count_b"]].values.tolist() == [[1, 0, 1, 0], [0, 1, 1, 2]]


def test_every_file_exists_and_parses(result):
    assert result.files == FILES
    for name in FILES:
        assert (result.out / name).is_file(), name
    for name in ("per_class_accuracy_delta.png", "pair_changes.png"):
        with Image.open(result.out / name) as img:
            img.verify()

    # the fixed/broken galleries: a row per sampled image, with 3 CAM panels (A true, B true, wrong model's pred)
    for kind in ("fixed", "broken"):
        n = len(result.samples[kind])
        assert n == min(4, len(getattr(result, kind)))
        with Image.open(result.out / f"{kind}_examples.png") as img:
            row_h = LAYOUT.row_title_h + LAYOUT.label_h + 128 + LAYOUT.row_gap
            assert img.size == (max(LAYOUT.min_width, 2 * LAYOUT.pad + 4 * 128 + 3 * LAYOUT.gap),
                                2 * LAYOUT.pad + LAYOUT.title_h + LAYOUT.subtitle_h + LAYOUT.section_h
                                + n * row_h + LAYOUT.cbar_h)

    class Links(HTMLParser):
        def __init__(self):
            super().__init__()
            self.targets = []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag in ("a", "img") and (a.get("href") or a.get("src")):
                self.targets.append(a.get("href") or a.get("src"))

    parser = Links()
    parser.feed((result.out / "index.html").read_text(encoding="utf-8"))
    local = [t for t in parser.targets if not t.startswith("../")]
    assert set(local) >= set(FILES) - {"index.html"}
    assert all((result.out / t).is_file() for t in local)


def test_cams_in_the_galleries_come_from_each_model(result, reference, cifar_root, tiny_checkpoint, checkpoint_b):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    data = load_dataset("cifar100", root=cifar_root, split="test", download=False)
    idx = result.samples["fixed"]
    x = to_tensor(data.images[idx], data.mean, data.std)
    targets = [ClassifierOutputTarget(int(c)) for c in reference["labels"][idx]]
    cams = {}
    for key, path in (("a", tiny_checkpoint), ("b", checkpoint_b)):
        sd = torch.load(path, map_location="cpu", weights_only=True)
        model = TinyNet(num_classes=100)
        model.load_state_dict(sd.get("state_dict", sd))
        model.eval()
        with GradCAM(model, [model.features[8]]) as cam:
            cams[key] = cam(input_tensor=x, targets=targets)
    # the comparison's own Analysis objects are gone; its CAMs were saved in each model's cache
    a = helpers.pipeline.Analysis(params_for(cifar_root, tiny_checkpoint, result.out.parent), progress=False)
    b = helpers.pipeline.Analysis(params_for(cifar_root, checkpoint_b, result.out.parent), progress=False)
    for an, key in ((a, "a"), (b, "b")):
        an.load_model(); an.load_data(); an.predict(cached_only=True)
        assert an.cache_stats["cams_loaded"] >= len(idx)
        before = an.cams.n_computed
        got = an.cams.get(idx, reference["labels"][idx])
        assert an.cams.n_computed == before                         # served from the saved CAMs
        np.testing.assert_allclose(got, cams[key], atol=1e-4)
    assert np.abs(cams["a"] - cams["b"]).max() > 0.05


def test_second_comparison_reuses_both_prediction_caches(result, cifar_root, tiny_checkpoint, checkpoint_b, monkeypatch):
    monkeypatch.setattr(helpers.pipeline, "run_inference", lambda *a, **k: pytest.fail("inference ran again"))
    again = compare(params_for(cifar_root, tiny_checkpoint, result.out.parent), checkpoint_b,
                    output_dir=result.out.parent / "compare_again", n_examples=1, progress=False)
    assert again.summary == result.summary
    assert (again.out / "index.html").is_file()


def test_different_test_sets_are_refused(result, cifar_root, tiny_checkpoint, checkpoint_b):
    a = params_for(cifar_root, tiny_checkpoint, result.out.parent)
    b = params_for(cifar_root, checkpoint_b, result.out.parent, LIMIT=200)
    with pytest.raises(ConfigError, match="different test sets.*same DATASET, DATA_ROOT, LIMIT"):
        compare(a, b, output_dir=result.out.parent / "never", progress=False)
    assert not (result.out.parent / "never").exists()


def test_cli_compare(result, cifar_root, tiny_checkpoint, checkpoint_b, tmp_path):
    out = tmp_path / "cli_compare"
    cmd = [sys.executable, "-m", "helpers", "compare", str(tiny_checkpoint), str(checkpoint_b), "--quiet",
           "--arch", TINY_ARCH, "--data-root", str(cifar_root), "--no-download", "--device", "cpu",
           "--output-dir", str(result.out.parent), "--output", str(out), "--examples", "2"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"fixed {result.summary['n_fixed']}, broken {result.summary['n_broken']}" in run.stdout
    assert read_csv(out / "per_class_accuracy_delta.csv") == read_csv(result.out / "per_class_accuracy_delta.csv")
    assert all((out / f).is_file() for f in FILES)
