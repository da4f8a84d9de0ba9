"""Inputs the suite used to trust without checking, each tried in several forms: cached predictions and CAMs that
are not what an inference pass gives, a cache key that missed the model's source and BATCH_SIZE, a Fashion-MNIST
DATA_ROOT silently replaced by the system copy, idx files whose header or gzip body lies about their size, and a
small LIMIT that lost CIFAR-100's superclasses.

A check that fails means: the cache is ignored and recomputed (the rejection recorded in the cache stats), or a
DataError naming the file and the fix, before anything large is allocated or anything misleading is written."""
from __future__ import annotations

import gzip
import shutil
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from helpers.compute import metrics
from helpers.data import readers
from helpers.data.datasets import load_dataset, superclass_mapping
from helpers.errors import DataError
from helpers.files.cache import RunCache
from helpers.pipeline import Analysis
from helpers.files.digest import file_digest
from helpers.steps.predictions import arch_source_digest, cache_key_for

from conftest import REPO, InferenceCounter, run_params

LIMIT = 100


def params(cifar_root, ckpt, out, **kw):
    return run_params(cifar_root, ckpt, out, **{"EMBEDDING": "tsne", "LIMIT": LIMIT, "N_PAIR_GALLERIES": 1, **kw})


def prepared(p) -> Analysis:
    an = Analysis(p, progress=False)
    an.load_model()
    an.load_data()
    return an


@pytest.fixture(scope="module")
def cached_run(cifar_root, tiny_checkpoint, tmp_path_factory):
    """One inference pass and a few CAMs, with both cache files written."""
    out = tmp_path_factory.mktemp("checked") / "gradcam_results"
    an = prepared(params(cifar_root, tiny_checkpoint, out))
    an.predict()
    an.cams.get([0, 1, 2], [int(c) for c in an.preds.preds[:3]])
    an.save_cam_cache()
    assert not an.cache_hit and (out / ".cache" / f"{an.cache_key}-derived.npz").is_file()
    return an


def copy_outputs(run: Analysis, tmp_path: Path) -> Path:
    out = tmp_path / "gradcam_results"
    shutil.copytree(run.out, out)
    return out


def rewrite(out: Path, key: str, suffix: str, kind: str, change) -> None:
    """Edit a cache file's arrays and write it back as the suite writes it (a valid file of this key)."""
    cache = RunCache(out, key)
    arrays = cache.read(suffix, kind)
    assert arrays is not None
    change(arrays)
    cache.write(suffix, kind, arrays)


# ---------------------------------------------------------------------------------------------- cached predictions
def _preds_are_labels(z):
    z["preds"] = z["labels"].copy()


def _probs_follow(z):   # preds := labels and probs one-hot on them: consistent with each other, not with the logits
    z["preds"] = z["labels"].copy()
    z["probs"] = np.eye(z["probs"].shape[1], dtype=np.float32)[z["labels"]]


def _logits_follow(z):  # everything consistent except that the logits were rewritten: argmax ok, softmax not
    z["preds"] = z["labels"].copy()
    logits = z["logits"].copy()
    logits[np.arange(len(logits)), z["labels"]] = logits.max(axis=1) + 1.0
    z["logits"] = logits


def _nan_logits(z):
    z["logits"] = z["logits"].copy()
    z["logits"][3, 5] = np.nan


def _float64_probs(z):
    z["probs"] = z["probs"].astype(np.float64)


def _preds_out_of_range(z):
    z["preds"] = np.full_like(z["preds"], 1000)


def _short_features(z):
    z["features"] = z["features"][:-1]


def _labels_as_float(z):
    z["labels"] = z["labels"].astype(np.float32)


def _missing_probs(z):
    del z["probs"]


TAMPERED = [_preds_are_labels, _probs_follow, _logits_follow, _nan_logits, _float64_probs, _preds_out_of_range,
            _short_features, _labels_as_float, _missing_probs]


@pytest.mark.parametrize("tamper", TAMPERED, ids=lambda f: f.__name__.strip("_"))
def test_tampered_prediction_cache_is_rejected_and_recomputed(cached_run, cifar_root, tiny_checkpoint, tmp_path,
                                                              monkeypatch, tamper):
    out = copy_outputs(cached_run, tmp_path)
    rewrite(out, cached_run.cache_key, ".npz", "predictions", tamper)
    counter = InferenceCounter(monkeypatch)
    an = prepared(params(cifar_root, tiny_checkpoint, out))
    an.predict()
    assert not an.cache_hit and counter.calls == 1
    assert any(r.startswith(f"{cached_run.cache_key}.npz: ") for r in an.cache_stats["rejected"]), an.cache_stats
    assert an.preds.accuracy == cached_run.preds.accuracy < 0.9   # the model's own accuracy, not 100%
    np.testing.assert_array_equal(an.preds.preds, cached_run.preds.preds)
    # Rewritten whole: the next run trusts it again.
    again = prepared(params(cifar_root, tiny_checkpoint, out))
    again.predict()
    assert again.cache_hit and counter.calls == 1


@pytest.fixture(scope="module")
def limit50_run(cifar_root, tiny_checkpoint, tmp_path_factory):
    """The whole analysis (run_all) at LIMIT=50 on CIFAR-100, over a prediction cache edited so that
    preds := labels: one run for two reported cases (the summary's accuracy, the superclass step)."""
    out = tmp_path_factory.mktemp("limit50") / "gradcam_results"
    first = prepared(params(cifar_root, tiny_checkpoint, out, LIMIT=50))
    first.predict()
    rewrite(out, first.cache_key, ".npz", "predictions", _preds_are_labels)
    an = Analysis(params(cifar_root, tiny_checkpoint, out, LIMIT=50), progress=False)
    an.run_all()
    return first, an


def test_preds_equal_labels_cache_does_not_reach_the_summary(limit50_run):
    """The reported case end to end: a cache with preds := labels no longer makes the summary say 100%."""
    first, an = limit50_run
    assert not an.cache_hit and any(r.startswith(f"{first.cache_key}.npz: preds are not the argmax")
                                    for r in an.cache_stats["rejected"])
    summary = (an.out / "analysis_summary.txt").read_text(encoding="utf-8")
    assert f"Overall accuracy: {first.preds.accuracy:.2%}" in summary and "Overall accuracy: 100.00%" not in summary
    assert first.preds.accuracy < 0.9


# ---------------------------------------------------------------------------------------------- cached CAMs
def _cam_column(col: int, value):
    def change(z):
        z["cam_index"] = z["cam_index"].copy()
        z["cam_index"][0, col] = value
    change.__name__ = f"cam_index[:, {col}] = {value}"
    return change


def _cam_nan(z):
    z["cam_values"] = z["cam_values"].copy()
    z["cam_values"][0, 0, 0] = np.nan


def _cam_float_index(z):
    z["cam_index"] = z["cam_index"].astype(np.float64)


@pytest.mark.parametrize("tamper", [_cam_column(1, 100), _cam_column(1, -1), _cam_column(1, 2**40),
                                    _cam_column(0, LIMIT), _cam_column(0, -1), _cam_column(2, -1),
                                    _cam_column(2, 5), _cam_nan, _cam_float_index],
                         ids=lambda f: f.__name__.strip("_"))
def test_cached_cams_out_of_range_reject_the_derived_cache(cached_run, cifar_root, tiny_checkpoint, tmp_path, tamper):
    out = copy_outputs(cached_run, tmp_path)
    rewrite(out, cached_run.cache_key, "-derived.npz", "derived", tamper)
    an = prepared(params(cifar_root, tiny_checkpoint, out))
    an.predict()
    assert an.cache_hit                                   # the predictions file is intact
    assert an.cache_stats["cams_loaded"] == 0 and len(an.cams) == 0
    assert any(r.startswith(f"{cached_run.cache_key}-derived.npz") for r in an.cache_stats["rejected"])
    an.cams.get([0], [int(an.preds.preds[0])])
    assert an.cams.n_computed == 1                        # recomputed, not read from the tampered file


def test_intact_derived_cache_still_loads(cached_run, cifar_root, tiny_checkpoint, tmp_path):
    an = prepared(params(cifar_root, tiny_checkpoint, copy_outputs(cached_run, tmp_path)))
    an.predict()
    assert an.cache_hit and an.cache_stats["cams_loaded"] == 3 and not an.cache_stats["rejected"]


# ---------------------------------------------------------------------------------------------- the cache key
def test_edited_model_file_changes_the_cache_key(cached_run, cifar_root, tiny_checkpoint, tmp_path, monkeypatch):
    model_py = tmp_path / "model.py"
    shutil.copy(REPO / "tests" / "tiny_model.py", model_py)
    arch = f"{model_py}:TinyNet"
    out = copy_outputs(cached_run, tmp_path)
    first = prepared(params(cifar_root, tiny_checkpoint, out, ARCH=arch))
    first.predict()
    key = first.cache_key
    # An edit that changes the predictions (and keeps the weights loading): a new key, a new inference pass.
    source = model_py.read_text()
    model_py.write_text(source.replace("return self.fc(", "return 2.0 * self.fc("))
    counter = InferenceCounter(monkeypatch)
    edited = prepared(params(cifar_root, tiny_checkpoint, out, ARCH=arch))
    edited.predict()
    assert edited.cache_key != key and not edited.cache_hit and counter.calls == 1
    np.testing.assert_allclose(edited.preds.logits, 2 * first.preds.logits, rtol=1e-4, atol=1e-4)
    # Even a comment changes it: the suite cannot tell which edits matter.
    model_py.write_text(model_py.read_text() + "\n# edited\n")
    assert cache_key_for(edited.params, edited.loaded, edited.data, edited.inputs) != edited.cache_key
    # A relative ARCH path is resolved as load_model resolves it (from the working directory).
    monkeypatch.chdir(tmp_path)
    assert arch_source_digest("model.py:TinyNet") == arch_source_digest(arch) == file_digest(model_py)
    assert arch_source_digest("resnet56") is None and arch_source_digest("timm:resnet18") is None


def test_batch_size_changes_the_cache_key(cached_run, cifar_root, tiny_checkpoint, tmp_path, monkeypatch):
    out = copy_outputs(cached_run, tmp_path)
    counter = InferenceCounter(monkeypatch)
    an = prepared(params(cifar_root, tiny_checkpoint, out, BATCH_SIZE=7))
    an.predict()
    assert an.cache_key != cached_run.cache_key and not an.cache_hit and counter.calls == 1
    same = prepared(params(cifar_root, tiny_checkpoint, out))
    assert cache_key_for(same.params, same.loaded, same.data, same.inputs) == cached_run.cache_key


# ---------------------------------------------------------------------------------------------- Fashion-MNIST roots
def write_idx_gz(path: Path, array: np.ndarray) -> None:
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(payload, mtime=0))


@pytest.fixture
def system_copy(tmp_path, monkeypatch) -> Path:
    """A stand-in for Debian's /usr/share/datasets/fashion-mnist (the real one may or may not be installed)."""
    folder = tmp_path / "system-fashion-mnist"
    folder.mkdir()
    labels = (np.arange(30) % 10).astype(np.uint8)
    write_idx_gz(folder / "t10k-images-idx3-ubyte.gz", np.full((30, 28, 28), 7, np.uint8))
    write_idx_gz(folder / "t10k-labels-idx1-ubyte.gz", labels)
    monkeypatch.setattr(readers, "SYSTEM_FASHION_MNIST", folder)
    return folder


def _offline(monkeypatch):
    import torchvision

    def refuse(*args, **kwargs):
        raise RuntimeError("offline")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", refuse)


@pytest.mark.parametrize("download", [False, True])
def test_given_empty_data_root_is_not_replaced_by_the_system_copy(system_copy, tmp_path, monkeypatch, download):
    _offline(monkeypatch)
    empty = tmp_path / "my-data"
    empty.mkdir()
    for root in (empty, str(empty), tmp_path / "missing"):
        with pytest.raises(DataError) as err:
            load_dataset("fashion_mnist", root=root, download=download)
        msg = str(err.value)
        assert "DATA_ROOT" in msg and str(Path(root).resolve()) in msg
        assert f"DATA_ROOT={str(system_copy)!r}" in msg   # how to use the system copy on purpose
    # Through the notebook's entry point too.
    an = Analysis(run_params(empty, "unused.pt", tmp_path / "out", DATASET="fashion_mnist", DOWNLOAD=download),
                  progress=False)
    with pytest.raises(DataError, match="DATA_ROOT"):
        an.load_data()


def test_default_data_root_falls_back_and_records_the_files(system_copy, tmp_path, monkeypatch):
    _offline(monkeypatch)
    monkeypatch.chdir(tmp_path)   # ./data does not exist here
    expected = tuple(str((system_copy / f).resolve()) for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))
    for root in (None, "./data", "data", Path("./data")):
        ds = load_dataset("fashion_mnist", root=root, download=False)
        assert ds.images.shape == (30, 28, 28, 1) and ds.source_files == expected
    # Files in ./data win over the system copy, and are the ones recorded.
    local = tmp_path / "data"
    local.mkdir()
    write_idx_gz(local / "t10k-images-idx3-ubyte.gz", np.zeros((12, 28, 28), np.uint8))
    write_idx_gz(local / "t10k-labels-idx1-ubyte.gz", np.arange(12, dtype=np.uint8) % 10)
    ds = load_dataset("fashion_mnist", root="./data", download=False)
    assert len(ds.labels) == 12 and ds.source_files[0] == str((local / "t10k-images-idx3-ubyte.gz").resolve())


def test_cifar_records_the_files_read(cifar_root):
    ds = load_dataset("cifar100", root=cifar_root, download=False, limit=10)
    folder = (cifar_root / "cifar-100-python").resolve()
    assert ds.source_files == (str(folder / "meta"), str(folder / "test"))


# ---------------------------------------------------------------------------------------------- idx sizes
def _gz_member(payload: bytes) -> bytes:
    return gzip.compress(payload, compresslevel=9, mtime=0)


def _bomb(path: Path, dims: tuple, extra_members: int) -> None:
    """A .gz whose header announces `dims` but whose body inflates to `extra_members` x 8 MiB more (gzip members
    of zeros, concatenated: a few KB on disk each)."""
    header = bytes([0, 0, 0x08, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    size = int(np.prod(dims))
    zeros = _gz_member(bytes(8 << 20))
    path.write_bytes(_gz_member(header + bytes(size)) + zeros * extra_members)


def _peak_mib(action) -> float:
    tracemalloc.start()
    try:
        action()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak / (1 << 20)


@pytest.mark.parametrize("which", ["images", "labels"])
def test_gzip_bomb_is_refused_without_inflating_it(tmp_path, which):
    root = tmp_path / "fmnist"
    root.mkdir()
    images, labels = root / "t10k-images-idx3-ubyte.gz", root / "t10k-labels-idx1-ubyte.gz"
    write_idx_gz(images, np.zeros((10000, 28, 28), np.uint8))
    write_idx_gz(labels, np.arange(10000, dtype=np.uint8) % 10)
    bomb = images if which == "images" else labels
    _bomb(bomb, (10000, 28, 28) if which == "images" else (10000,), extra_members=512)   # 4 GiB inflated
    assert bomb.stat().st_size < 8 << 20
    errors = []

    def load():
        with pytest.raises(DataError) as err:
            load_dataset("fashion_mnist", root=root, download=False)
        errors.append(str(err.value))
    assert _peak_mib(load) < 64          # the announced 7.8 MB, never the 4 GiB
    assert str(bomb) in errors[0] and "more data than that" in errors[0]


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("dims", [(2**31, 2**31, 2**31), (2**32 - 1, 28, 28), (10000, 280, 280), (2**31,)])
def test_idx_header_announcing_an_absurd_size_is_refused_before_allocating(tmp_path, gz, dims):
    ndim = len(dims)
    name = "t10k-images-idx3-ubyte" if ndim == 3 else "t10k-labels-idx1-ubyte"
    other = "t10k-labels-idx1-ubyte" if ndim == 3 else "t10k-images-idx3-ubyte"
    payload = bytes([0, 0, 0x08, ndim]) + struct.pack(f">{ndim}I", *dims) + bytes(1000)
    path = tmp_path / (name + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(payload) if gz else payload)
    fine = np.zeros((10, 28, 28), np.uint8) if ndim == 1 else np.arange(10, dtype=np.uint8)
    write_idx_gz(tmp_path / f"{other}.gz", fine)
    if not gz:
        (tmp_path / f"{other}").write_bytes(gzip.decompress((tmp_path / f"{other}.gz").read_bytes()))
    errors = []

    def load():
        with pytest.raises(DataError) as err:
            load_dataset("mnist", root=tmp_path, download=False)
        errors.append(str(err.value))
    assert _peak_mib(load) < 64
    msg = errors[0]
    size = int(np.prod([int(d) for d in dims], dtype=object))
    assert str(path) in msg and " x ".join(map(str, dims)) in msg and f"{size:,} bytes" in msg
    assert "-" not in msg.split("announces")[1].split("bytes")[0]   # no overflowed negative size


# ---------------------------------------------------------------------------------------------- LIMIT and superclasses
def test_small_limit_keeps_every_superclass_from_the_whole_file(cifar_root):
    full = load_dataset("cifar100", root=cifar_root, download=False)
    small = load_dataset("cifar100", root=cifar_root, download=False, limit=50)
    assert len(np.unique(small.labels)) < 100                       # the LIMIT leaves classes out ...
    assert small.fine_to_coarse.tolist() == full.fine_to_coarse.tolist()   # ... but not their superclasses
    assert (small.fine_to_coarse >= 0).all()
    # Any prediction, of any class, has a superclass.
    preds = np.arange(50) * 2 % 100
    assert metrics.coarse_confusion_matrix(small.labels, preds, small.fine_to_coarse, 20).sum() == 50


def test_superclass_map_with_limit_covers_every_class(cifar_root):
    small = load_dataset("cifar100", root=cifar_root, download=False, limit=5)
    mapping = {name: ("even" if i % 2 == 0 else "odd") for i, name in enumerate(small.class_names)}
    mapped = superclass_mapping(small, mapping)
    assert mapped.fine_to_coarse.tolist() == [i % 2 for i in range(100)]


def test_incomplete_superclasses_name_the_real_parameter():
    f2c = np.array([0, 0, 1, -1])
    with pytest.raises(DataError) as err:
        metrics.coarse_confusion_matrix(np.array([0, 1, 2]), np.array([0, 3, 2]), f2c, 2)
    msg = str(err.value)
    assert "SUPERCLASS_MAP" in msg and "class ids 3" in msg and "fine_to_coarse" not in msg


def test_limit_50_cifar100_runs_end_to_end_with_the_superclass_step(limit50_run, cifar_root):
    _, an = limit50_run
    out = an.out
    assert len(an.preds.labels) == 50 and len(np.unique(an.preds.labels)) < 100
    assert (out / "deep_dive" / "superclass_confusion.png").is_file()
    assert (out / "deep_dive" / "within_superclass_pairs.csv").is_file()
    assert "superclass_share" in an.results["deep_dive"].values
    summary = (out / "analysis_summary.txt").read_text(encoding="utf-8")
    assert f"Read:     {(cifar_root / 'cifar-100-python' / 'meta').resolve()}" in summary
