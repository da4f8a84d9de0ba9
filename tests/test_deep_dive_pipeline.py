"""The deep-dive section through the pipeline: GROUP_CLASSES, the FinerCAM maps in the group pair galleries
(against pytorch-grad-cam itself), the faithfulness note, and the superclass section with and without
coarse labels / SUPERCLASS_MAP."""
from __future__ import annotations

import numpy as np
import pytest
import sklearn.metrics
import torch
from torch import nn
from pytorch_grad_cam import FinerCAM
from pytorch_grad_cam.utils.model_targets import FinerWeightedTarget

from helpers.config import Params
from helpers.data.datasets import load_dataset, readable
from helpers.errors import DataError
from helpers.pipeline import Analysis

from conftest import run_params, train_briefly
from output_checks import check_png, read_csv
from tiny_model import TinyNet

STEPS = ("load_model", "load_data", "predict", "confusion", "deep_dive")


def run(params: Params) -> Analysis:
    an = Analysis(params, progress=False)
    for step in STEPS:
        getattr(an, step)()
    an.outputs.flush()    # figures are written in the background until report(); these tests skip report(),
    an.outputs.commit()   # which also moves the run's outputs into OUTPUT_DIR
    return an


def cifar100_params(cifar_root, ckpt, out, **kw) -> Params:
    return run_params(cifar_root, ckpt, out, **{"EMBEDDING": "tsne", **kw})


@pytest.fixture(scope="module")
def auto(cifar_root, tiny_checkpoint, tmp_path_factory) -> Analysis:
    return run(cifar100_params(cifar_root, tiny_checkpoint, tmp_path_factory.mktemp("auto") / "out"))


# ----------------------------------------------------------------------------- GROUP_CLASSES

def test_group_classes_given_by_name_are_honoured(auto, cifar_root, tiny_checkpoint, tmp_path):
    names = auto.data.class_names
    found = auto.results["deep_dive"].values["group"]
    # Two classes of the automatic group plus one outside it, written the way users type them.
    outside = next(c for c in range(100) if c not in found)
    wanted = [found[1], outside, found[0]]
    given = [readable(names[wanted[0]]).upper(), names[wanted[1]].replace("_", " "), names[wanted[2]]]
    an = run(cifar100_params(cifar_root, tiny_checkpoint, tmp_path / "out", GROUP_CLASSES=given))
    dd = an.results["deep_dive"].values
    assert dd["group"] == wanted and dd["group_how"] == "given by GROUP_CLASSES"
    cm = sklearn.metrics.confusion_matrix(an.preds.labels, an.preds.preds, labels=list(range(100)))
    np.testing.assert_array_equal(dd["group_counts"], cm[np.ix_(wanted, wanted)])
    assert dd["group_objective"] == sum(cm[a, b] for a in wanted for b in wanted if a != b)
    rows = read_csv(an.out / "deep_dive" / "group_confusion.csv")
    assert [r["true class"] for r in rows] == [readable(names[c]) for c in wanted]
    # The rest of the section analyses that group, not the automatic one.
    assert dd["separability"]["n"] == int(np.isin(an.preds.labels, wanted).sum())
    assert f"given by GROUP_CLASSES): {', '.join(readable(names[c]) for c in wanted)}" in "\n".join(
        an.results["deep_dive"].notes)


# ----------------------------------------------------------------------------- FinerCAM in the group galleries

def test_group_pair_finercam_equals_pytorch_grad_cam(auto):
    shown = auto.results["deep_dive"].values["group_pairs"]
    assert shown, "the automatic group must have errors between its classes"
    pair = shown[0]
    t, q, i = pair["true"], pair["pred"], pair["indices"][0]
    assert auto.preds.labels[i] == t and auto.preds.preds[i] == q
    check_png(auto.out / pair["file"])
    # Independent reference: pytorch-grad-cam's FinerCAM on the same layer, target logit_true - logit_pred.
    model, layer = auto.loaded.module, auto.cams.engine().layer
    cam = FinerCAM(model, [layer])
    try:
        ref = cam(auto.inputs[i:i + 1].clone(), targets=[FinerWeightedTarget(t, [q], 1)])
    finally:
        cam.base_cam.activations_and_grads.release()
    np.testing.assert_allclose(pair["finercam"][0], ref[0], atol=1e-5)
    # ... and it is not simply the plain CAM of the true class.
    assert np.abs(pair["finercam"][0] - pair["cam_true"][0]).max() > 0.05


def test_group_pair_faithfulness_printed_beside_the_galleries(auto):
    from helpers.model.faithfulness import faithfulness
    from helpers.steps.deep_dive import FINER_KEY
    sec = auto.results["deep_dive"]
    scores = sec.values["faithfulness"]
    assert set(scores) == {"gradcam", FINER_KEY}
    shown = sec.values["group_pairs"]
    idx = [i for p in shown for i in p["indices"]]
    # The Grad-CAM score is the predicted-class ROAD score of exactly the maps drawn in the galleries.
    expected = faithfulness(auto.loaded.module, auto.inputs[idx], auto.preds.preds[idx],
                            np.concatenate([p["cam_pred"] for p in shown]))
    assert scores["gradcam"] == pytest.approx(float(np.mean(expected)), abs=1e-6)
    assert -2 <= scores[FINER_KEY] <= 2
    note = next(n for n in sec.notes if n.startswith("CAM faithfulness"))
    assert f"gradcam {scores['gradcam']:+.4f}" in note and f"FinerCAM {scores[FINER_KEY]:+.4f}" in note
    baseline = sec.values["faithfulness_random"]
    assert set(baseline) == set(scores) and f"random maps {baseline[FINER_KEY]:+.4f}" in note
    assert f"mean over {len(idx)} images" in note and "How to read" in note and "\n" not in note
    assert "EigenCAM" not in note                 # only said for the class-agnostic method


class TwoPatches(nn.Module):
    """Logit 0 = sum of the pixels in patch A (rows 4..11, cols 4..11), logit 1 = the same for patch B
    (rows 20..27, cols 20..27), logit 2 = 0."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        a = x[:, :, 4:12, 4:12].sum(dim=(1, 2, 3)) * self.scale
        b = x[:, :, 20:28, 20:28].sum(dim=(1, 2, 3)) * self.scale
        return torch.stack([a, b, torch.zeros_like(a)], dim=1) / 16


def test_contrast_faithfulness_rewards_maps_on_what_separates_the_classes():
    from helpers.model.faithfulness import SoftmaxContrastTarget, faithfulness
    x = torch.zeros(1, 1, 32, 32)
    x[:, :, 4:12, 4:12] = 1.0      # evidence for class 0 ("true")
    x[:, :, 20:28, 20:28] = 1.2    # slightly more evidence for class 1 ("predicted")
    model = TwoPatches().eval()

    def box(r, c):
        m = np.zeros((1, 32, 32), np.float32)
        m[0, r:r + 8, c:c + 8] = 1.0
        return m

    true_vs_pred = [SoftmaxContrastTarget(0, 1)]   # p(true) - p(pred)
    # Each box is 64 of 1024 pixels (6.25%): percentile 95 removes exactly the box.
    on_true = faithfulness(model, x, true_vs_pred, box(4, 4), percentile=95)
    on_pred = faithfulness(model, x, true_vs_pred, box(20, 20), percentile=95)
    elsewhere = faithfulness(model, x, true_vs_pred, box(4, 20), percentile=95)
    # By hand: logits (4, 4.8, 0) before; with patch A imputed from its all-zero surroundings, (~0, 4.8, 0).
    def margin(logits):
        p = np.exp(logits) / np.exp(logits).sum()
        return p[0] - p[1]
    assert on_true[0] < -0.5
    assert on_true[0] == pytest.approx(margin(np.array([0, 4.8, 0])) - margin(np.array([4, 4.8, 0])), abs=0.05)
    assert on_pred[0] > 0.3                       # removing the predicted class's evidence helps the true class
    assert abs(elsewhere[0]) < 0.02               # pixels neither class uses change nothing
    before = margin(np.array([4, 4.8, 0]))        # p(true) - p(pred) on the original, known in advance
    given = faithfulness(model, x, true_vs_pred, box(4, 4), percentile=95, scores_before=[before])
    np.testing.assert_allclose(given, on_true, atol=1e-6)
    with pytest.raises(DataError):
        faithfulness(model, x, true_vs_pred, np.zeros((2, 32, 32), np.float32))


# ----------------------------------------------------------------------------- superclasses

@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    """Generated CIFAR-10 (no coarse labels) and a TinyNet trained briefly on it."""
    from helpers.data.synthetic import write_cifar10
    root = tmp_path_factory.mktemp("cifar10")
    write_cifar10(root, n_test=300, n_train=1500, seed=0)
    train = load_dataset("cifar10", root=root, split="train", download=False)
    model = train_briefly(TinyNet(num_classes=10), train.images, train.labels, train.mean, train.std, epochs=3)
    ckpt = root / "tiny10.pt"
    torch.save(model.state_dict(), ckpt)
    return root, ckpt


def cifar10_params(cifar10, out, **kw) -> Params:
    root, ckpt = cifar10
    return run_params(root, ckpt, out, **{"DATASET": "cifar10", "EMBEDDING": "tsne", "BATCH_SIZE": 256, **kw})


def test_superclass_section_skipped_without_coarse_labels(cifar10, tmp_path):
    an = run(cifar10_params(cifar10, tmp_path / "out"))
    sec = an.results["deep_dive"]
    lines = [n for n in sec.notes if "uperclass" in n]
    assert len(lines) == 1 and lines[0].startswith("Superclasses: skipped") and "SUPERCLASS_MAP" in lines[0]
    assert "\n" not in lines[0]
    assert "superclass_share" not in sec.values and "superclass_share" not in an.results["confusion"].values
    assert not (an.out / "deep_dive" / "superclass_confusion.png").exists()
    assert not (an.out / "deep_dive" / "within_superclass_pairs.csv").exists()
    assert (an.out / "deep_dive" / "reliability_diagram.png").is_file()   # the rest of the section still ran


VEHICLES = {"airplane", "automobile", "ship", "truck"}


def test_superclass_map_is_honoured(cifar10, tmp_path):
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    mapping = {n: ("vehicle" if n in VEHICLES else "animal") for n in names}
    an = run(cifar10_params(cifar10, tmp_path / "out", SUPERCLASS_MAP=mapping))
    dd = an.results["deep_dive"].values
    labels, preds = an.preds.labels, an.preds.preds
    group = np.array([0 if an.data.class_names[c] in VEHICLES else 1 for c in range(10)])  # vehicle first in map
    assert an.data.coarse_names == ["vehicle", "animal"]
    # Hand computation from the mapping: the share of errors that stay inside the true class's group.
    wrong = labels != preds
    within = wrong & (group[labels] == group[preds])
    assert dd["superclass_share"]["share"] == pytest.approx(within.sum() / wrong.sum())
    # chance: a uniform wrong prediction lands on one of the 3 other vehicles or 5 other animals out of 9
    siblings = np.where(group[labels[wrong]] == 0, 3, 5)
    assert dd["superclass_share"]["chance"] == pytest.approx(siblings.mean() / 9)
    np.testing.assert_array_equal(dd["coarse_cm"], sklearn.metrics.confusion_matrix(group[labels], group[preds],
                                                                                     labels=[0, 1]))
    check_png(an.out / "deep_dive" / "superclass_confusion.png", (100, 100))
    for r in read_csv(an.out / "deep_dive" / "within_superclass_pairs.csv"):
        assert mapping[r["true_name"]] == mapping[r["pred_name"]]
    for r in read_csv(an.out / "most_confused_pairs.csv"):
        same = mapping[r["true_name"]] == mapping[r["pred_name"]]
        assert r["same_superclass"] == ("yes" if same else "no")
    assert not any(n.startswith("Superclasses: skipped") for n in an.results["deep_dive"].notes)
