"""Training-set evidence (issue 16, section 2): the neighbour search against sklearn's brute force, and on REAL
Fashion-MNIST with a trained CNN, 100 training images planted (jittered) in the test set must come back as
near-duplicates, and hardly anything else."""
from __future__ import annotations

import gzip
import time

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from helpers.compute import neighbours as nb
from helpers.config import Params
from helpers.data.readers import SYSTEM_FASHION_MNIST

from conftest import FMNIST_ARCH


@pytest.mark.parametrize("method", ["torch", "faiss"])
def test_neighbours_match_sklearn_brute_force(method, monkeypatch):
    if method == "faiss" and not nb.faiss_available():
        pytest.skip("faiss-cpu is not installed")
    monkeypatch.setattr(nb, "BASE_BLOCK", 1000)   # several base blocks, so the top-k merge runs
    monkeypatch.setattr(nb, "QUERY_BLOCK", 128)
    rng = np.random.default_rng(1)
    base = rng.normal(size=(5000, 48)).astype(np.float32)
    queries = rng.normal(size=(300, 48)).astype(np.float32)
    ref = NearestNeighbors(n_neighbors=8, metric="cosine", algorithm="brute").fit(base)
    dist, idx = ref.kneighbors(queries)
    found = nb.nearest(queries, base, 8, method=method)
    assert found.search == (nb.FAISS_SEARCH if method == "faiss" else nb.TORCH_SEARCH)
    np.testing.assert_array_equal(found.index, idx)
    np.testing.assert_allclose(found.similarity, 1 - dist, atol=1e-5)
    # the base's own rows as queries, themselves excluded: sklearn's neighbours 2..k+1
    dist, idx = ref.kneighbors(base[:200], n_neighbors=6)
    own = nb.nearest(base[:200], base, 5, exclude=np.arange(200), method=method)
    np.testing.assert_array_equal(own.index, idx[:, 1:])
    # a base smaller than k: padded with -1
    small = nb.nearest(queries[:3], base[:2], 4, method=method)
    assert (small.index[:, 2:] == -1).all() and np.isnan(small.similarity[:, 2:]).all()


def test_ambiguous_training_counts_majorities():
    labels = np.array([0, 0, 1, 1, 1])
    rows, share = nb.ambiguous_training(labels, np.array([[2, 3, 1], [0, 2, -1]]), np.array([0, 1]), other=1)
    assert rows.tolist() == [0] and share.tolist() == [pytest.approx(2 / 3)]


FILES = [f"{s}-{k}-idx{d}-ubyte.gz" for s in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))]
needs_fmnist = pytest.mark.skipif(any(not (SYSTEM_FASHION_MNIST / f).is_file() for f in FILES),
                                  reason="Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist")
N_TEST, N_TRAIN, N_PLANTED = 3000, 20000, 100


def _write_idx(path, array: np.ndarray) -> None:
    code = 0x08   # unsigned byte
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def _jitter(images: np.ndarray, rng) -> np.ndarray:
    """Each image shifted by -1..1 px in x and y (zero fill) with Gaussian noise of sd 3 gray levels."""
    out = np.zeros_like(images)
    for k, img in enumerate(images):
        dy, dx = rng.integers(-1, 2, size=2)
        shifted = np.roll(img, (dy, dx), axis=(0, 1))
        if dy:
            shifted[(0 if dy > 0 else -1), :] = 0
        if dx:
            shifted[:, (0 if dx > 0 else -1)] = 0
        out[k] = np.clip(shifted + rng.normal(0, 3, size=img.shape), 0, 255).astype(np.uint8)
    return out


@needs_fmnist
def test_planted_duplicates_are_found_on_real_fashion_mnist(fmnist_checkpoint, tmp_path, monkeypatch):
    from helpers.data.datasets import load_dataset
    from helpers.pipeline import Analysis
    from helpers.steps import data_train

    train = load_dataset("fashion_mnist", root=SYSTEM_FASHION_MNIST, split="train", download=False, limit=N_TRAIN)
    test = load_dataset("fashion_mnist", root=SYSTEM_FASHION_MNIST, split="test", download=False, limit=N_TEST)
    rng = np.random.default_rng(0)
    planted_from = rng.choice(N_TRAIN, N_PLANTED, replace=False)   # from the training images the pass sees
    images = np.concatenate([test.images[..., 0], _jitter(train.images[planted_from, ..., 0], rng)])
    labels = np.concatenate([test.labels, train.labels[planted_from]])
    root = tmp_path / "data"
    root.mkdir()
    _write_idx(root / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", labels)
    for name in FILES[:2]:
        (root / name).symlink_to(SYSTEM_FASHION_MNIST / name)
    planted = set(range(N_TEST, N_TEST + N_PLANTED))

    monkeypatch.setattr(data_train, "MAX_TRAIN_IMAGES", N_TRAIN)
    params = Params(MODEL_PATH=str(fmnist_checkpoint), ARCH=FMNIST_ARCH, DATASET="fashion_mnist",
                    DATA_ROOT=str(root), DOWNLOAD=False, OUTPUT_DIR=str(tmp_path / "out"), DEVICE="cpu",
                    TRAIN_EVIDENCE=True, N_PAIR_GALLERIES=3)
    an = Analysis(params, progress=False)
    an.load_model()
    an.load_data()
    t0 = time.perf_counter()
    an.predict()
    test_s = time.perf_counter() - t0
    conf = an.confusion()
    sec = data_train.train_evidence(an.run, conf, test_pass_s=test_s)
    assert sec is not None and sec.n_train == N_TRAIN

    dups = sec.near_duplicates
    found = set(dups["test_index"]) & planted
    false = set(dups["test_index"]) - planted
    print()
    right_source = sum(int(r.train_index) == int(planted_from[int(r.test_index) - N_TEST])
                       for r in dups.itertuples() if int(r.test_index) in planted)
    # the thresholds, from the data: planted copies against the real test images the features proposed
    cand = sec.duplicate_candidates
    is_planted = cand["test_index"].isin(planted)
    for what, part in (("planted", cand[is_planted]), ("real", cand[~is_planted])):
        q = np.percentile(part["pixel_distance"], [0, 5, 50, 95, 100]) if len(part) else []
        f = np.percentile(part["feature_similarity"], [0, 5, 50]) if len(part) else []
        print(f"{what}: {len(part)} candidates; pixel distance min/5%/50%/95%/max {np.round(q, 1)}; "
              f"feature cosine min/5%/50% {np.round(f, 3)}")
    print(f"planted {N_PLANTED}: found {len(found)} (from the right training image: {right_source}), "
          f"false {len(false)} among {N_TEST} real test images")
    print("\n".join(data_train.summary_lines(sec)))
    assert len(found) >= 95 and right_source >= 95
    assert len(false) <= 5

    # what the step wrote, and what it tells the report
    an.outputs.flush()
    names = [f for f in sec.files if f.startswith("deep_dive/train_neighbours_")]
    run = an.run
    assert names == [f"deep_dive/train_neighbours_{k}_{run.class_slug(int(r.true_id))}_to_"
                     f"{run.class_slug(int(r.pred_id))}.png" for k, r in enumerate(conf.pairs.head(3).itertuples(), 1)]
    for rel in sec.files:
        assert an.outputs.current(rel).stat().st_size > 0, rel
    csv = an.outputs.current("deep_dive/near_duplicates.csv").read_text().splitlines()
    assert csv[0].startswith("test_index,train_index,feature_similarity,pixel_distance") and len(csv) == len(dups) + 1
    assert sec.search in ("torch blocked matmul", "faiss IndexFlatIP and torch blocked matmul")
    assert set(sec.ambiguous) == set(sec.pair_labels) == set(sec.pair_neighbours) and len(sec.pair_labels) == 3
    assert all(len(e.true_train) == data_train.N_NEIGHBOURS_SHOWN and (train.labels[e.true_train] ==
               an.preds.labels[e.test_index]).all() for errs in sec.pair_neighbours.values() for e in errs)
    assert sum(sec.duplicates_per_class.values()) == len(dups)
    page = data_train.index_section(an.run, sec)
    assert page.count("data:image/jpeg;base64,") == 4 and "near_duplicates.csv" in page
    assert len(data_train.summary_lines(sec)) == 2 + 3
    an.outputs.close()
    an.outputs.abandon()   # the staging folder: the pipeline, not this step, commits a run


def test_not_asked_or_not_available():
    """None unless TRAIN_EVIDENCE or TRAIN_ROOT; an image folder without TRAIN_ROOT says why."""
    from types import SimpleNamespace

    from helpers.steps import data_train
    run = SimpleNamespace(params=Params(), preds=SimpleNamespace(features=np.zeros((2, 3))))
    assert data_train.train_evidence(run, None) is None
    run = SimpleNamespace(params=Params(DATASET="imagefolder", TRAIN_EVIDENCE=True),
                          data=SimpleNamespace(name="imagefolder"))
    train, why = data_train._train_data(run.params, run.data)
    assert train is None and "TRAIN_ROOT" in why


def test_asked_for_but_skipped_says_why_in_the_summary_and_the_page():
    """TRAIN_EVIDENCE on an image folder without TRAIN_ROOT: the report says it was skipped and why, not "off"."""
    from types import SimpleNamespace

    from helpers.steps import data_causes, data_train
    run = SimpleNamespace(params=Params(DATASET="imagefolder", TRAIN_EVIDENCE=True),
                          preds=SimpleNamespace(features=np.zeros((2, 3))), data=SimpleNamespace(name="imagefolder"))
    sec, why = data_train.train_evidence_or_reason(run, None)
    assert sec is None and "TRAIN_ROOT" in why
    causes = data_causes.DataCauses(train_skipped=why)
    text = "\n".join(data_causes.summary_lines(causes))
    assert "asked for but skipped" in text and "TRAIN_ROOT" in text and "off (" not in text
    page = data_causes.index_section(run, causes)
    assert "asked for but skipped" in page and "TRAIN_ROOT" in page
