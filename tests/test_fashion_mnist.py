"""The whole analysis on REAL Fashion-MNIST (Debian's dataset-fashion-mnist) with a small CNN trained here.

The known real answer: the classes a CNN confuses most are the upper-body garments T-shirt/top, Pullover,
Coat and Shirt, so the automatically found group of 3 must be drawn from them.
"""
from __future__ import annotations


import numpy as np
import pytest
import sklearn.metrics

from helpers.config import Params
from helpers.data.readers import SYSTEM_FASHION_MNIST
from helpers.pipeline import Analysis

from conftest import FMNIST_ARCH, REPO
from output_checks import check_outputs, check_png, parse_html, read_csv

FILES = [f"{s}-{k}-idx{d}-ubyte.gz" for s in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))]
MISSING = [f for f in FILES if not (SYSTEM_FASHION_MNIST / f).is_file()]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"Fashion-MNIST is not installed in {SYSTEM_FASHION_MNIST} (missing {', '.join(MISSING)}): "
                          "apt-get install dataset-fashion-mnist")

UPPER_BODY = {"T-shirt/top", "Pullover", "Coat", "Shirt"}
N_TEST = 5000        # the first 5000 test images (about 500 per class)
EMBED_POINTS = 600   # t-SNE subsample of the group's ~1500 images (the full 3000 would take ~30 s)


@pytest.fixture(scope="module")
def fmnist_run(fmnist_checkpoint, tmp_path_factory) -> Analysis:
    out = tmp_path_factory.mktemp("fmnist_run") / "gradcam_results"
    params = Params(MODEL_PATH=str(fmnist_checkpoint), ARCH=FMNIST_ARCH, DATASET="fashion_mnist",
                    DATA_ROOT=str(SYSTEM_FASHION_MNIST), DOWNLOAD=False, LIMIT=N_TEST, OUTPUT_DIR=str(out),
                    DEVICE="cpu", EMBEDDING="tsne", SEED=0)
    an = Analysis(params, progress=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("helpers.steps.deep_dive.MAX_EMBED_POINTS", EMBED_POINTS)
        an.run_all()
    return an


def test_real_data_loaded_as_grayscale_28x28(fmnist_run):
    data = fmnist_run.data
    assert data.name == "fashion_mnist" and data.images.shape == (N_TEST, 28, 28, 1)
    assert data.class_names[0] == "T-shirt/top" and data.num_classes == 10
    assert np.bincount(data.labels, minlength=10).min() >= 400        # every class well represented


def test_accuracy_is_sane_and_matches_sklearn(fmnist_run):
    pr = fmnist_run.preds
    assert 0.80 < pr.accuracy < 0.99, pr.accuracy
    assert pr.accuracy == pytest.approx(sklearn.metrics.accuracy_score(pr.labels, pr.preds))
    np.testing.assert_array_equal(fmnist_run.results["confusion"].values["cm"],
                                  sklearn.metrics.confusion_matrix(pr.labels, pr.preds, labels=list(range(10))))
    assert "fast exact Grad-CAM" in fmnist_run.cams.engine().path   # convs -> GAP -> Linear


def test_detected_group_is_the_upper_body_garments(fmnist_run):
    dd = fmnist_run.results["deep_dive"].values
    assert dd["group_how"] == "found automatically"
    assert len(dd["group_names"]) == 3 and set(dd["group_names"]) <= UPPER_BODY, dd["group_names"]
    # The objective is the sum of the off-diagonal confusion counts inside the group, checked by hand.
    cm = sklearn.metrics.confusion_matrix(fmnist_run.preds.labels, fmnist_run.preds.preds, labels=list(range(10)))
    g = dd["group"]
    assert dd["group_objective"] == sum(cm[a, b] for a in g for b in g if a != b)
    # ... and no other group of 3 classes does better (exhaustive over all 120 groups).
    from itertools import combinations
    best = max(sum(cm[a, b] for a in c for b in c if a != b) for c in combinations(range(10), 3))
    assert dd["group_objective"] == best


def test_deep_dive_outputs_exist_and_are_valid(fmnist_run):
    out = fmnist_run.out
    check_outputs(out, num_classes=10, n_pair_galleries=5)
    dd = fmnist_run.results["deep_dive"].values
    names = dd["group_names"]
    rows = read_csv(out / "deep_dive" / "group_confusion.csv")
    assert [r["true class"] for r in rows] == names
    support = np.bincount(fmnist_run.preds.labels, minlength=10)
    for r, g, counts in zip(rows, dd["group"], dd["group_counts"]):
        assert [int(r[n]) for n in names] == counts.tolist()
        # row % is of ALL the true class's test images (the rest went outside the group)
        for n, c in zip(names, counts):
            assert float(r[f"{n} (row %)"]) == pytest.approx(100 * c / support[g], abs=0.006)
    # one gallery per ordered pair of the group with at least one error
    counts = dd["group_counts"]
    n_pairs = int(((counts > 0) & ~np.eye(3, dtype=bool)).sum())
    pair_files = sorted((out / "deep_dive").glob("group_pair_*_to_*.png"))
    assert n_pairs >= 4 and len(pair_files) == n_pairs
    for p in pair_files:
        check_png(p, (300, 100))
    html = out / "deep_dive" / "group_embedding.html"
    parse_html(html)
    assert html.read_text(encoding="utf-8").count("data:image/png;base64") >= EMBED_POINTS   # a thumbnail per point
    check_png(out / "deep_dive" / "occlusion_vs_cam.png")
    bins = read_csv(out / "deep_dive" / "reliability_bins.csv")
    assert sum(int(float(b["count"])) for b in bins) == N_TEST
    suspects = read_csv(out / "deep_dive" / "label_suspects.csv")
    assert len(suspects) == 24 and all(s["given_label"] != s["predicted"] for s in suspects)


def test_deep_dive_numbers_are_plausible(fmnist_run):
    dd = fmnist_run.results["deep_dive"].values
    sep = dd["separability"]
    # The three garments overlap, but a linear probe on the penultimate features still beats chance by far.
    assert sep["chance"] < 0.4 and sep["chance"] + 0.3 < sep["accuracy"] < 1.0
    assert dd["embedding_method"] == "t-SNE"
    assert 0.0 <= dd["ece"] < 0.15
    from helpers.steps.deep_dive import FINER_KEY
    faith = dd["faithfulness"]
    assert set(faith) == {"gradcam", FINER_KEY}
    random = dd["faithfulness_random"]
    # Grad-CAM points at evidence the model uses: removing its top 20% of pixels lowers p(predicted) far more
    # than removing a random 20% does. (FinerCAM's score is only reported: on 28x28 grayscale images with a
    # 7x7 map it measured no better than random maps, see the docs run.)
    assert -1 <= faith["gradcam"] < random["gradcam"] - 0.05, (faith, random)
    assert -2 <= faith[FINER_KEY] <= 2 and -2 <= random[FINER_KEY] <= 2
    assert "superclass_share" not in dd      # Fashion-MNIST has no coarse labels and no SUPERCLASS_MAP was given
    summary = (fmnist_run.out / "analysis_summary.txt").read_text(encoding="utf-8")
    assert ", ".join(dd["group_names"]) in summary and f"{fmnist_run.preds.accuracy:.2%}" in summary
    assert "How to read" in summary
    assert f"gradcam {faith['gradcam']:+.4f} (random maps {random['gradcam']:+.4f})" in summary
    recs = (fmnist_run.out / "recommendations.txt").read_text(encoding="utf-8")
    # recommendations come from the diagnosis: its causes first, the generic pair rules (verify, ...) left out
    from helpers.compute.diagnosis import CAUSE_NAMES
    first = recs.split("\n", 1)[0]
    assert any(f"[{kind}]" in first for kind in CAUSE_NAMES), first
    assert "[verify]" not in recs and dd["group_names"][0] in recs


def test_notebook_on_real_fashion_mnist_writes_the_report(fmnist_checkpoint, tmp_path, monkeypatch):
    """The notebook itself, headless, on the real data: every output, the report page, the widget."""
    import nbformat
    from nbclient import NotebookClient
    out = tmp_path / "nb_fmnist"
    env = {"GRADCAM_MODEL_PATH": str(fmnist_checkpoint), "GRADCAM_ARCH": FMNIST_ARCH, "GRADCAM_DATASET": "fashion_mnist",
           "GRADCAM_DATA_ROOT": str(SYSTEM_FASHION_MNIST), "GRADCAM_DOWNLOAD": "false", "GRADCAM_LIMIT": "2000",
           "GRADCAM_OUTPUT_DIR": str(out), "GRADCAM_DEVICE": "cpu", "GRADCAM_EMBEDDING": "tsne"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(REPO / "GradCAM_Analysis.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    check_outputs(out, num_classes=10, n_pair_galleries=5)
    index = out / "index.html"
    parse_html(index)
    page = index.read_text(encoding="utf-8")
    assert "Fashion" in page or "fashion_mnist" in page
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "Overall accuracy" in text and "fashion_mnist" in text
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in nb.cells[-1].outputs)
