"""The diagnosis (compute/diagnosis.py, steps/diagnosis.py): each cause's share by hand, the ranking and "no clear
cause", and causes planted into the real Fashion-MNIST test set that the diagnosis must name for the right pair,
first or second."""
from __future__ import annotations

import gzip
import shutil
import struct

import numpy as np
import pandas as pd
import pytest

from helpers.compute import diagnosis as D
from helpers.data.readers import SYSTEM_FASHION_MNIST as FMNIST_DIR

TSHIRT, TROUSER, PULLOVER, DRESS, SHIRT = 0, 1, 2, 3, 6
N_IMAGES = 5000
needs_fmnist = pytest.mark.skipif(not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                                  reason="Debian's Fashion-MNIST is not installed")


# ---------------------------------------------------------------------------------------------- by hand
def test_attributable_share_by_hand():
    # 4 quartiles of 100 images with 40, 20, 10, 10 errors; errors lean low (δ < 0), so the rate to beat is
    # the top half's (10 + 10) / 200 = 10%: excess 30 + 10 + 0 + 0 = 40 of 80 errors.
    q = pd.DataFrame({"quantile": [1, 2, 3, 4], "n_images": [100] * 4, "n_errors": [40, 20, 10, 10]})
    assert D.attributable_share(q, lean_high=False) == (pytest.approx(0.5), 40)
    # leaning high against the same counts: the low half's 30% is the rate to beat; only q1's 40 exceed it
    assert D.attributable_share(q, lean_high=True) == (pytest.approx(10 / 80), 10)
    # a far quartile without errors does not make every error attributable: 0, 2, 3, 10 -> low half 1%,
    # excess 0 + 1 + 2 + 9
    q2 = q.assign(n_errors=[0, 2, 3, 10])
    assert D.attributable_share(q2, lean_high=True) == (pytest.approx(12 / 15), 12)


def test_wrong_label_share_and_images():
    wrong = np.zeros(20, bool)
    wrong[[3, 5, 9]] = True
    c = D.wrong_label_cause(np.array([1, 3, 5, 7]), wrong, validated=True)
    assert c.share == 0.5 and c.n_errors == 2 and c.images == (3, 5) and "validated by people" in c.evidence
    # unvalidated: only flagged images the model gives their label < 5% count
    p_given = np.full(20, 0.5)
    p_given[3] = 0.01
    c = D.wrong_label_cause(np.array([1, 3, 5, 7]), wrong, validated=False, p_given=p_given)
    assert c.images == (3,) and c.share == 0.25 and "not validated" in c.evidence


def test_property_cause_needs_significance_and_size():
    q = pd.DataFrame({"quantile": [1, 2, 3, 4], "n_images": [100] * 4, "n_errors": [40, 20, 10, 10]})
    row = pd.Series({"property": "brightness", "cliffs_delta": -0.4, "p_bh": 1e-5, "rate_low": 0.4,
                     "rate_high": 0.1})
    c = D.property_cause(row, q, ("darkest", "brightest"))
    assert c.kind == "kind_of_image" and c.share == pytest.approx(0.5)
    assert "darkest quartile goes this way 40.0%" in c.evidence and "brightest 10.0%" in c.evidence
    assert D.property_cause(row.copy().replace({1e-5: 0.02}), q, ("darkest", "brightest")) is None   # p too large
    small = row.copy()
    small["cliffs_delta"] = -0.1
    assert D.property_cause(small, q, ("darkest", "brightest")) is None                           # too small


def test_ambiguity_by_hand():
    p_true, p_pred = np.array([0.4, 0.3, 0.05, 0.45]), np.array([0.5, 0.6, 0.9, 0.5])
    c = D.ambiguity_cause(p_true, p_pred, separability=0.7)
    # both probable: 0.4/0.5 and 0.45/0.5 (0.3/0.6 is 0.3 apart, 0.05 is not probable)
    assert c.n_errors == 2 and c.share == 0.5 and "70.0%" in c.evidence
    # features that separate the pair: uncertain errors, not ambiguous images
    assert D.ambiguity_cause(p_true, p_pred, separability=0.95).share == 0
    assert D.ambiguity_cause(p_true, p_pred, separability=None) is None


def test_probe_accuracy_equals_the_sklearn_pipeline():
    """The closed form against StandardScaler -> PCA(full) -> RidgeClassifier under the same folds: PCA through
    the Gram matrix (fewer images than features), through the covariance, none (few features), three classes,
    a constant feature."""
    from sklearn.datasets import make_classification
    from sklearn.decomposition import PCA
    from sklearn.linear_model import RidgeClassifier
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    for n, dims, classes, max_dims in ((180, 512, 2, 128), (900, 300, 2, 128), (300, 40, 3, 128), (400, 60, 2, 16)):
        x, y = make_classification(n, dims, n_informative=8, n_classes=classes, class_sep=0.6, random_state=1)
        x[:, 3] = 2.5
        steps = [StandardScaler()] + ([PCA(max_dims, svd_solver="full")] if dims > max_dims and n * 0.8 > max_dims
                                      else [])
        ref = cross_val_score(make_pipeline(*steps, RidgeClassifier(alpha=1.0)), x, y,
                              cv=StratifiedKFold(5, shuffle=True, random_state=0)).mean()
        got = D.probe_accuracy(x, y, max_dims=max_dims)
        assert got == pytest.approx(ref, abs=1e-9) and 0.45 < got < 1.0, (n, dims, classes)


def test_probe_accuracy_against_logistic_regression():
    from sklearn.datasets import make_classification
    from helpers.compute.deep_dive import separability
    for sep, dims in ((2.0, 32), (0.3, 32), (1.0, 300)):
        x, y = make_classification(600, dims, n_informative=8, class_sep=sep, random_state=0)
        assert D.probe_accuracy(x, y) == pytest.approx(separability(x, y)["accuracy"], abs=0.06), (sep, dims)
    rng = np.random.default_rng(0)
    assert D.probe_accuracy(rng.normal(size=(400, 16)), np.repeat([0, 1], 200)) == pytest.approx(0.5, abs=0.08)
    assert np.isnan(D.probe_accuracy(rng.normal(size=(5, 3)), np.array([0, 0, 0, 0, 1])))


def test_context_by_hand():
    rng = np.random.default_rng(0)
    reference = rng.uniform(0.1, 0.3, 100)         # B's own images: B's CAM stays inside
    errors = np.r_[rng.uniform(0.6, 0.9, 15), rng.uniform(0.1, 0.3, 5)]
    c = D.context_cause(errors, reference)
    assert c.kind == "context" and c.n_errors >= 15 and c.share >= 0.75
    assert D.context_cause(rng.uniform(0.1, 0.3, 20), reference) is None   # no difference: no cause


def test_rank_orders_by_share_and_says_no_clear_cause():
    a = D.Cause("wrong_labels", 0.4, 8, "")
    b = D.Cause("ambiguous", 0.6, 12, "")
    weak = D.Cause("kind_of_image", 0.05, 1, "")
    named, short = D.rank([a, None, b, weak])
    assert [c.kind for c in named] == ["ambiguous", "wrong_labels"] and short == [weak]
    d = D.PairDiagnosis("A → B", 0, (1,), 20, causes=[])
    assert d.verdict == D.NO_CLEAR_CAUSE


def test_concept_cause_needs_the_gap_and_b_strength():
    tops = np.array([2, 2, 2, 1])
    c = D.concept_cause(2, tops, strength_in_pred=1.1, margin_share=0.6, exact=True)
    assert c.share == 0.75 and c.n_errors == 3 and not c.approximate and "concept 2" in c.evidence
    assert D.concept_cause(2, tops, strength_in_pred=1.1, margin_share=0.3, exact=True) is None   # not what differs
    assert D.concept_cause(2, tops, strength_in_pred=0.5, margin_share=0.8, exact=True) is None   # B lacks it
    assert D.concept_cause(2, tops, 1.0, 0.7, exact=False).approximate


def test_training_cause_counts_duplicates_only():
    c = D.training_cause(duplicated=6, n_errors=20, ambiguous_train=40)
    assert c.share == 0.3 and c.n_errors == 6 and "40 training images of A" in c.evidence
    assert D.training_cause(0, 20, 40).share == 0


def test_few_images_share():
    counts = np.array([1000, 1000, 200, 1000])
    rates = np.array([0.1, 0.1, 0.4, 0.1])
    c = D.few_images_cause(counts, 2, rates, n_errors=40)
    assert c.share == pytest.approx(0.75) and c.n_errors == 30
    assert D.few_images_cause(counts, 0, rates, n_errors=10) is None


# ---------------------------------------------------------------------------------------------- planted, real data
def _write_idx(path, array, magic):
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes())


def _planted_root(tmp_path, images=None, labels=None):
    """A DATA_ROOT with the real Fashion-MNIST test files, or the given (changed) images / labels."""
    root = tmp_path / "data"
    root.mkdir(parents=True)
    for name, new, magic in (("t10k-images-idx3-ubyte.gz", images, 2051), ("t10k-labels-idx1-ubyte.gz", labels, 2049)):
        if new is None:
            shutil.copy(FMNIST_DIR / name, root)
        else:
            _write_idx(root / name, np.ascontiguousarray(new, np.uint8), magic)
    return root


def _fmnist_test():
    from helpers.data.datasets import load_dataset
    d = load_dataset("fashion_mnist", root=FMNIST_DIR, split="test", download=False)
    return d.images[..., 0].copy(), d.labels.astype(np.uint8)


def _diagnose(tmp_path, root, checkpoint, arch, show=True):
    from helpers.config import Params
    from helpers.pipeline import Analysis
    from helpers.steps.data_causes import data_causes
    from helpers.steps.diagnosis import diagnosis, pair_sentence
    params = Params(MODEL_PATH=str(checkpoint), ARCH=arch, DATASET="fashion_mnist", DATA_ROOT=str(root),
                    DOWNLOAD=False, LIMIT=N_IMAGES, OUTPUT_DIR=str(tmp_path / "out"), DEVICE="cpu", SEED=0)
    an = Analysis(params, progress=False)
    an.load_model()
    an.load_data()
    an.predict()
    conf = an.confusion()
    data = data_causes(an.run, conf)
    sec = diagnosis(an.run, conf, data)
    for d in sec.pairs[:6 if show else 0]:
        print(pair_sentence(d))
    an.outputs.flush()
    csv = pd.read_csv(an.run.outputs.current("deep_dive/diagnosis.csv"))
    assert set(csv["pair"]) == {d.pair for d in sec.pairs}
    an.outputs.close(raise_errors=False)
    return an, sec


def _rank_of(sec, true_id, pred_id, kind) -> int:
    d = sec.of(true_id, pred_id)
    assert d is not None, f"pair {true_id} → {pred_id} was not diagnosed"
    kinds = [c.kind for c in d.causes]
    return kinds.index(kind) + 1 if kind in kinds else 0


@needs_fmnist
@pytest.mark.slow
def test_relabelled_shirts_are_diagnosed_as_wrong_labels(tmp_path, fmnist_checkpoint):
    from conftest import FMNIST_ARCH
    images, labels = _fmnist_test()
    shirts = np.flatnonzero(labels[:N_IMAGES] == SHIRT)
    moved = np.sort(np.random.default_rng(0).choice(shirts, len(shirts) // 10, replace=False))
    labels[moved] = TSHIRT
    an, sec = _diagnose(tmp_path, _planted_root(tmp_path, labels=labels), fmnist_checkpoint, FMNIST_ARCH)
    rank = _rank_of(sec, TSHIRT, SHIRT, "wrong_labels")
    print(f"relabelled Shirts: wrong labels named at rank {rank} for T-shirt/top → Shirt")
    assert rank in (1, 2)
    # the same model on the untouched test set: the pair's wrong labels are not named
    _, untouched = _diagnose(tmp_path / "untouched", _planted_root(tmp_path / "untouched"), fmnist_checkpoint,
                             FMNIST_ARCH, show=False)
    assert _rank_of(untouched, TSHIRT, SHIRT, "wrong_labels") == 0
    cause = next(c for c in sec.of(TSHIRT, SHIRT).causes if c.kind == "wrong_labels")
    assert len(set(cause.images) & set(moved.tolist())) >= 0.7 * len(cause.images)   # most named are planted


@needs_fmnist
@pytest.mark.slow
def test_darkened_pullovers_are_diagnosed_as_a_kind_of_image(tmp_path, fmnist_plain_checkpoint):
    from conftest import PLAIN_ARCH
    images, labels = _fmnist_test()
    pull = np.flatnonzero(labels[:N_IMAGES] == PULLOVER)
    dark = np.sort(np.random.default_rng(0).choice(pull, int(round(0.3 * len(pull))), replace=False))
    images[dark] = np.round(images[dark] * 0.35).astype(np.uint8)
    an, sec = _diagnose(tmp_path, _planted_root(tmp_path, images=images), fmnist_plain_checkpoint, PLAIN_ARCH)
    rank = _rank_of(sec, PULLOVER, SHIRT, "kind_of_image")
    print(f"darkened Pullovers: a kind of image named at rank {rank} for Pullover → Shirt")
    assert rank in (1, 2)
    cause = next(c for c in sec.of(PULLOVER, SHIRT).causes if c.kind == "kind_of_image")
    assert cause.detail == "brightness"
    # the same model on the untouched test set: brightness is not what sends Pullovers to Shirt
    _, untouched = _diagnose(tmp_path / "untouched", _planted_root(tmp_path / "untouched"), fmnist_plain_checkpoint,
                             PLAIN_ARCH, show=False)
    d = untouched.of(PULLOVER, SHIRT)
    assert d is None or not any(c.kind == "kind_of_image" and c.detail == "brightness" for c in d.causes)


@needs_fmnist
@pytest.mark.slow
def test_a_learned_shortcut_is_diagnosed_as_context(tmp_path, fmnist_shortcut):
    # Every training Trouser carries a bright 4x4 corner patch; 30% of the test Dresses carry it too. The
    # Dress → Trouser errors must be diagnosed as context, shown by a concept whose top patches are the corner.
    from conftest import FMNIST_ARCH, SHORTCUT_PRED, SHORTCUT_TRUE
    from helpers.config import Params
    from helpers.pipeline import Analysis
    from helpers.steps.diagnosis import pair_sentence
    checkpoint, root, patched = fmnist_shortcut
    an = Analysis(Params(MODEL_PATH=str(checkpoint), ARCH=FMNIST_ARCH, DATASET="fashion_mnist", DATA_ROOT=str(root),
                         DOWNLOAD=False, LIMIT=N_IMAGES, OUTPUT_DIR=str(tmp_path / "out"), DEVICE="cpu", SEED=0,
                         GROUP_CLASSES=["Dress", "Trouser"]), progress=False)
    an.load_model()
    an.load_data()
    an.predict()
    an.confusion()
    an.deep_dive()   # the group is the shortcut's pair: the concepts are of its images
    an.data_causes()
    an.model_causes()
    sec = an.diagnosis()
    an.outputs.close(raise_errors=False)
    d = sec.of(SHORTCUT_TRUE, SHORTCUT_PRED)
    print(pair_sentence(d))
    rank = _rank_of(sec, SHORTCUT_TRUE, SHORTCUT_PRED, "context")
    print(f"shortcut: context named at rank {rank} for Dress → Trouser")
    assert rank in (1, 2)
    context = next(c for c in d.causes if c.kind == "context")
    assert "top patches in an image corner" in context.evidence   # the concept that shows it is the corner
    errors = np.flatnonzero((an.preds.labels == SHORTCUT_TRUE) & (an.preds.preds == SHORTCUT_PRED))
    assert np.isin(errors, patched).mean() > 0.8                   # the errors are the patched Dresses


def test_widget_shows_the_pairs_diagnosis():
    from types import SimpleNamespace
    from helpers.steps.diagnosis import Diagnosis
    from helpers.widget import diagnosis_html
    cause = D.Cause("wrong_labels", 0.4, 8, "8 of 20 errors have a wrong test label <validated>", images=(3, 5))
    sec = Diagnosis(pairs=[D.PairDiagnosis("Shirt → T-shirt/top", 6, (0,), 20, causes=[cause])])
    an = SimpleNamespace(results={"diagnosis": sec})
    page = diagnosis_html(an, 6, 0)
    assert "Why:" in page and "wrong test labels, 40%" in page and "&lt;validated&gt;" in page
    assert "not among the top confused pairs" in diagnosis_html(an, 1, 2)
    assert diagnosis_html(SimpleNamespace(results={}), 6, 0) == ""   # no diagnosis step: nothing to say


def test_probe_with_wide_features_and_few_images():
    # 512-d features, 100 images: a training fold holds 80, fewer than the 128 PCA components (this raised)
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 50)
    x = rng.normal(size=(100, 512)) + y[:, None] * 0.5
    assert 0.5 <= D.probe_accuracy(x, y) <= 1.0


def test_every_pair_keeps_its_own_recommendation():
    from helpers.compute.recommendations import from_diagnosis
    a = D.Cause("wrong_labels", 0.3, 6, "", images=(1, 2), detail="suspected")
    b = D.Cause("wrong_labels", 0.2, 4, "", images=(7, 8), detail="suspected")
    pairs = [D.PairDiagnosis("Shirt → T-shirt/top", 6, (0,), 20, [a]), D.PairDiagnosis("Shirt → Pullover", 6, (2,), 20, [b]),
             D.PairDiagnosis("Shirt → T-shirt/top/Pullover (group)", 6, (0, 2), 40, [a])]
    recs = from_diagnosis(pairs)
    assert [r.text.split(" (")[0] for r in recs] == ["Shirt → T-shirt/top", "Shirt → Pullover"]   # the group repeats
    assert "#7, #8" in recs[1].text
