"""Wrong test labels: the human validation of cleanlab/label-errors (read, md5- and order-checked, never
downloaded here), the per-pair counts, the step end to end, and a planted relabelling of real Fashion-MNIST."""
from __future__ import annotations

import gzip
import io
import pickle
import shutil
import struct

import numpy as np
import pandas as pd
import pytest

from conftest import FMNIST_ARCH, SHARED, run_params
from helpers.compute import label_errors as le
from helpers.compute import metrics
from helpers.data import label_errors as dle
from helpers.errors import DataError

LE_DIR = SHARED / "data" / "label-errors"
FMNIST_DIR = __import__("pathlib").Path("/usr/share/datasets/fashion-mnist")
needs_le = pytest.mark.skipif(not (LE_DIR / "cifar100_mturk.json").exists(), reason="no shared label-errors copy")


def _files(name):
    (j, _, jm), (o, _, om) = dle.FILES[name]
    return LE_DIR / j, LE_DIR / o, jm, om


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any download attempt fails, as offline: the tests use the shared copies only."""
    def refuse(*a, **k):
        raise OSError("network disabled in tests")
    monkeypatch.setattr(dle.urllib.request, "urlopen", refuse)


# ---------------------------------------------------------------------------------------------- reading
@needs_le
@pytest.mark.parametrize("name, n, wrong, correctable", [("cifar100", 2235, 585, 318), ("cifar10", 275, 54, 18)])
def test_published_counts(name, n, wrong, correctable):
    j, o, jm, om = _files(name)
    h = dle.read_human_labels(j, o, md5=jm, official_md5=om)
    assert (len(h), int(h.is_wrong.sum()), int(h.is_correctable.sum())) == (n, wrong, correctable)
    assert len(h.official) == 10000 and np.all(np.diff(h.index) > 0)
    assert not np.any(h.is_correctable & ~h.is_wrong)   # 3 of 5 for the guess leaves at most 2 for the given
    # the labels the JSON lists are the official ones at those indices
    assert np.array_equal(h.official[h.index], h.given)


@needs_le
def test_md5_refuses_a_corrupted_copy(tmp_path):
    j, o, jm, om = _files("cifar100")
    folder = tmp_path / dle.SUBDIR
    folder.mkdir()
    data = bytearray(j.read_bytes())
    data[100] ^= 1
    (folder / j.name).write_bytes(bytes(data))
    shutil.copy(o, folder / o.name)
    with pytest.raises(DataError, match="integrity"):
        dle.read_human_labels(folder / j.name, md5=jm)
    human, note = dle.resolve_label_errors("auto", "cifar100", tmp_path, download=False)
    assert human is None and "integrity" in note and dle.BASE_URL in note
    # offered a download instead, which fails offline: still no crash, and the damaged copy is not used
    human, note = dle.resolve_label_errors("auto", "cifar100", tmp_path, download=True)
    assert human is None and "download failed" in note


@needs_le
def test_auto_uses_the_cache_and_downloads_once(tmp_path, monkeypatch):
    human, note = dle.resolve_label_errors("auto", "cifar100", tmp_path, download=False)
    assert human is None and "DOWNLOAD is False" in note and "cifar100_mturk.json" in note
    urls = []

    class Resp(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def fake_urlopen(url, timeout=None):   # serves the shared copies under their published paths
        urls.append(url)
        return Resp((LE_DIR / url.rsplit("/", 1)[1]).read_bytes())
    monkeypatch.setattr(dle.urllib.request, "urlopen", fake_urlopen)
    human, note = dle.resolve_label_errors("auto", "cifar100", tmp_path, download=True)
    assert human is not None and len(human) == 2235 and len(urls) == 2
    assert urls[0] == f"{dle.BASE_URL}/mturk/cifar100_mturk.json"
    assert sorted(p.name for p in (tmp_path / dle.SUBDIR).iterdir()) == [
        "cifar100_mturk.json", "cifar100_test_set_original_labels.npy"]   # no temporary file left
    human, _ = dle.resolve_label_errors("auto", "cifar100", tmp_path, download=True)
    assert human is not None and len(urls) == 2     # the cached copy, not a second download


@needs_le
def test_path_setting_and_datasets_without_validation(tmp_path):
    j, *_ = _files("cifar10")
    human, note = dle.resolve_label_errors(str(j), "cifar10", None, download=False)
    assert human is not None and len(human) == 275 and human.official is not None   # the .npy beside it
    assert dle.resolve_label_errors(None, "cifar100", tmp_path, False)[0] is None
    human, note = dle.resolve_label_errors("auto", "fashion_mnist", tmp_path, False)
    assert human is None and "unvalidated" in note
    human, note = dle.resolve_label_errors(str(tmp_path / "missing.json"), "cifar100", tmp_path, False)
    assert human is None and "not a file" in note


@needs_le
def test_order_check():
    j, o, jm, om = _files("cifar100")
    h = dle.read_human_labels(j, o)
    assert dle.order_mismatch(h.official, h) is None
    assert dle.order_mismatch(h.official[:1234], h) is None              # LIMIT: the first N in order
    perm = np.random.default_rng(0).permutation(h.official)
    assert "differ from the official order" in dle.order_mismatch(perm, h)
    assert dle.order_mismatch(np.concatenate([h.official, [0]]), h) is not None
    no_npy = dle.parse_mturk([{"id": 3, "given_original_label": 5, "our_guessed_label": 1,
                               "mturk": {"given": 1, "guessed": 4, "neither": 0, "both": 0}}])
    assert dle.order_mismatch(np.array([0, 0, 0, 5]), no_npy) is None
    assert dle.order_mismatch(np.array([0, 0, 0, 4]), no_npy) is not None


# ---------------------------------------------------------------------------------------------- counting
def test_pair_counts_by_hand():
    # image:        0  1  2  3  4  5  6  7
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    preds = np.array([1, 1, 1, 0, 0, 1, 1, 2])
    wrong = np.array([1, 1, 0, 1, 1, 0, 1, 0], dtype=bool)
    suggested = np.array([1, 2, -1, -1, 0, -1, -1, -1])   # 0: the workers chose 1 (= pred); 1: chose 2 (≠ pred)
    pairs = pd.DataFrame({"true_id": [0, 1, 2], "pred_id": [1, 0, 1]})
    t = le.pair_table(labels, preds, wrong, suggested, pairs, ["a", "b", "c"], group=[0, 1])
    assert t["scope"].tolist() == ["pair", "pair", "pair", "group"]
    assert t["errors"].tolist() == [3, 1, 1, 4]          # group: 0->1 x3, 1->0 x1 (2->1 is outside)
    assert t["wrong_labels"].tolist() == [2, 1, 1, 3]
    assert t["model_right"].tolist() == [1, 1, 0, 2]
    assert t["share_wrong"].tolist() == [round(2 / 3, 4), 1.0, 1.0, 0.75]
    # corrected: 0 -> 1 (now right), 1 -> 2 (still wrong), 4 -> 0 (now right); 3 and 6 excluded (no right label)
    fixed, keep = le.corrected_labels(labels, wrong, suggested)
    assert fixed.tolist() == [1, 2, 0, 0, 0, 1, 2, 2] and keep.tolist() == [1, 1, 1, 0, 1, 1, 0, 1]
    official, corrected = le.accuracies(labels, preds, wrong, suggested)
    assert official == 3 / 8 and corrected == 4 / 6      # right among kept: images 0, 4, 5, 7
    c = le.class_table(labels, preds, wrong, suggested, ["a", "b", "c"])
    assert c["images"].tolist() == [4, 2, 2] and c["wrong_labels"].tolist() == [3, 1, 1]
    assert c["correctable"].tolist() == [2, 1, 0] and c["excluded"].tolist() == [1, 0, 1]
    assert c["images_corrected"].tolist() == [2, 2, 2]   # by corrected label: a {2, 4}, b {0, 5}, c {1, 7}
    assert c["accuracy_corrected"].tolist() == [0.5, 1.0, 0.5]


def test_confident_learning_by_hand():
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.45, 0.55], [0.1, 0.9], [0.2, 0.8], [0.45, 0.55]])
    # thresholds: class 0 = mean(.9, .8, .2, .45) = 0.5875, class 1 = mean(.9, .8, .55) = 0.75
    # confident: 0 -> 0, 1 -> 0, 2 -> 1, 3 none, 4 -> 1, 5 -> 1, 6 none
    assert le.confident_joint(labels, probs).tolist() == [[2, 1], [0, 2]]
    # calibrated row 0: [2, 1] / 3 * 4 = [2.67, 1.33] -> 1 image labelled 0 is really 1: the largest p1 - p0 (2);
    # row 1: [0, 3] -> none. Image 3 (p1 .55 > p0, below both thresholds) is not flagged: the count is spent.
    flagged, suggested = le.confident_learning_mask(labels, probs)
    assert flagged.tolist() == [False, False, True, False, False, False, False]
    assert suggested.tolist() == [-1, -1, 1, -1, -1, -1, -1]


# ---------------------------------------------------------------------------------------------- end to end
def _official_cifar100(root, labels):
    """Generated CIFAR-100 data whose test labels are the official ones (the images stay the generated ones)."""
    from helpers.data.synthetic import CIFAR100_FINE_TO_COARSE, write_cifar100
    folder = write_cifar100(root, n_test=len(labels), seed=0)
    with open(folder / "test", "rb") as fh:
        d = pickle.load(fh)
    d["fine_labels"] = [int(x) for x in labels]
    d["coarse_labels"] = np.asarray(CIFAR100_FINE_TO_COARSE)[labels].tolist()
    with open(folder / "test", "wb") as fh:
        pickle.dump(d, fh)


def _analysis_to_confusion(params):
    from helpers.pipeline import Analysis
    an = Analysis(params, progress=False)
    an.load_data()
    an.load_model()
    an.predict()
    return an, an.confusion()


@needs_le
def test_step_on_official_order(tmp_path, tiny_checkpoint):
    from helpers.steps.data_labels import index_section, label_evidence, summary_lines
    j, o, *_ = _files("cifar100")
    official = np.load(o).astype(np.int64)
    _official_cifar100(tmp_path / "data", official)
    params = run_params(tmp_path / "data", tiny_checkpoint, tmp_path / "out", LIMIT=3000, LABEL_ERRORS=str(j))
    an, conf = _analysis_to_confusion(params)
    group = [int(conf.pairs["true_id"][0]), int(conf.pairs["pred_id"][0])]
    sec = label_evidence(an.run, conf, group_ids=group)
    assert sec.validated and sec.n_images == 3000
    # the same counts, directly from the JSON
    h = dle.read_human_labels(j, o)
    y, p = an.preds.labels, an.preds.preds
    inside = h.index < 3000
    idx, wrong, guess = h.index[inside], h.is_wrong[inside], np.where(h.is_correctable, h.guessed, -1)[inside]
    assert sec.n_checked == int(inside.sum()) and sec.n_wrong == int(wrong.sum())
    for r in sec.pairs[sec.pairs["scope"] == "pair"].itertuples():
        err = (y[idx] == r.true_id) & (p[idx] == r.pred_id)
        assert r.errors == int(((y == r.true_id) & (p == r.pred_id)).sum())
        assert r.wrong_labels == int((err & wrong).sum())
        assert r.model_right == int((err & wrong & (guess == p[idx])).sum())
    g = sec.pairs[sec.pairs["scope"] == "group"].iloc[0]
    ge = np.isin(y[idx], group) & np.isin(p[idx], group) & (y[idx] != p[idx])
    assert g["wrong_labels"] == int((ge & wrong).sum())
    fixed = y.copy()
    fixed[idx[guess >= 0]] = guess[guess >= 0]
    keep = np.ones(3000, dtype=bool)
    keep[idx[wrong & (guess < 0)]] = False
    assert sec.accuracy_corrected == pytest.approx(np.mean(fixed[keep] == p[keep]))
    assert sec.n_excluded == int((~keep).sum())
    saved = pd.read_csv(an.outputs.current("deep_dive/label_errors.csv"))   # staged until commit
    assert set(saved["scope"]) == {"pair", "group", "class"} and (saved["scope"] == "class").sum() == 100
    lines = summary_lines(sec)
    assert "human-validated" in lines[1] and "workers chose the model's answer" in lines[1]
    page = index_section(sec)
    assert page.startswith('<section class="label-errors">') and page.count("<tr>") == len(sec.pairs) + 1


@needs_le
def test_step_refuses_a_reordered_test_set(tmp_path, tiny_checkpoint):
    from helpers.steps.data_labels import label_evidence
    j, o, *_ = _files("cifar100")
    official = np.load(o).astype(np.int64)[:2000]
    _official_cifar100(tmp_path / "data", np.random.default_rng(1).permutation(official))
    params = run_params(tmp_path / "data", tiny_checkpoint, tmp_path / "out", LABEL_ERRORS=str(j))
    an, conf = _analysis_to_confusion(params)
    sec = label_evidence(an.run, conf)
    assert not sec.validated and sec.accuracy_corrected is None and sec.n_checked == 0
    assert any("not used" in n and "official order" in n for n in sec.notes)
    assert "unvalidated" in sec.source and sec.classes[["correctable", "accuracy_corrected"]].isna().all().all()


# ---------------------------------------------------------------------------------------------- planted cause
SHIRT, TSHIRT, N_FMNIST = 6, 0, 5000


def _write_idx1(path, labels):
    with gzip.open(path, "wb") as fh:
        fh.write(struct.pack(">II", 2049, len(labels)) + np.asarray(labels, dtype=np.uint8).tobytes())


@pytest.mark.skipif(not FMNIST_DIR.exists(), reason="Debian's Fashion-MNIST is not installed")
def test_planted_relabelling_is_found(tmp_path, fmnist_checkpoint):
    from helpers.compute.deep_dive import cleanlab_label_issues
    from helpers.data.readers import _read_idx
    from helpers.steps.data_labels import label_evidence
    labels = _read_idx(FMNIST_DIR / "t10k-labels-idx1-ubyte.gz", 1, "Fashion-MNIST").astype(np.int64)
    shirts = np.flatnonzero(labels[:N_FMNIST] == SHIRT)
    moved = np.sort(np.random.default_rng(0).choice(shirts, len(shirts) // 10, replace=False))
    labels[moved] = TSHIRT
    root = tmp_path / "data"
    root.mkdir()
    shutil.copy(FMNIST_DIR / "t10k-images-idx3-ubyte.gz", root)
    _write_idx1(root / "t10k-labels-idx1-ubyte.gz", labels)
    params = run_params(root, fmnist_checkpoint, tmp_path / "out", arch=FMNIST_ARCH, DATASET="fashion_mnist",
                        LIMIT=N_FMNIST)
    an, conf = _analysis_to_confusion(params)
    assert np.array_equal(an.preds.labels, labels[:N_FMNIST])
    sec = label_evidence(an.run, conf)
    assert not sec.validated and "unvalidated" in sec.source
    planted = le.mask_from_indices(N_FMNIST, moved)
    y, probs = an.preds.labels, an.preds.probs
    found = {"in-sample rule": metrics.label_suspect_mask(y, probs),
             "confident learning": le.confident_learning_mask(y, probs)[0]}
    issues = cleanlab_label_issues(y, probs)
    if issues is not None:
        found["cleanlab"] = le.mask_from_indices(N_FMNIST, issues)
    scores = {k: le.recall_precision(m, planted) for k, m in found.items()}
    for k, (r, p) in scores.items():
        print(f"planted {len(moved)} shirts as T-shirt/top: {k}: recall {r:.1%}, precision {p:.1%}, "
              f"flagged {int(found[k].sum())}")
    recall, precision = scores["confident learning"]
    base_rate = len(moved) / N_FMNIST
    print(f"base rate of planted images {base_rate:.1%}: confident learning's precision is "
          f"{precision / base_rate:.1f}x that")
    # The model's own mistakes (~16% of the images) are flagged beside the planted ones, so the precision is
    # low in absolute terms; it must still be several times the base rate.
    assert recall >= 0.7 and precision >= 5 * base_rate
    assert sec.n_wrong == int(found["confident learning"].sum())
    row = sec.pairs[(sec.pairs["true_id"] == TSHIRT) & (sec.pairs["pred_id"] == SHIRT)]
    in_pair = planted & found["confident learning"] & (an.preds.preds == SHIRT)
    assert len(row) == 1 and row["wrong_labels"].iloc[0] >= int(in_pair.sum()) > 0
