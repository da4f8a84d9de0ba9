"""The cache next to the outputs, and the gallery activations kept during the inference pass.

A re-run with the same weights, data and parameters computes nothing again (no inference, no CAM, no
deep-dive result); changed weights or parameters invalidate what depends on them; a truncated, corrupt
or foreign cache file is detected and recomputed, never trusted."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from helpers.compute import metrics
from helpers.model.cam_store import CamStore, GalleryActivations, gallery_selection
from helpers.model.cams import CamEngine
from helpers.config import Params
from helpers.model.inference import run_inference
from helpers.files.cache import digest
from helpers.pipeline import Analysis
from helpers.steps.predictions import cache_key_for

from conftest import InferenceCounter, run_params


def make_params(cifar_root, ckpt, out, **kw) -> Params:
    return run_params(cifar_root, ckpt, out, **{"BATCH_SIZE": 64, "EMBEDDING": "tsne", "N_PAIR_GALLERIES": 2, **kw})


def cache_key_of(an: Analysis) -> str:
    return cache_key_for(an.params, an.loaded, an.data, an.inputs)


def prepared(params: Params) -> Analysis:
    an = Analysis(params, progress=False)
    an.load_model()
    an.load_data()
    return an


@pytest.fixture(scope="module")
def first_run(cifar_root, tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "gradcam_results"
    an = Analysis(make_params(cifar_root, tiny_checkpoint, out), progress=False)
    an.run_all()
    return an


def copy_outputs(first_run, tmp_path):
    out = tmp_path / "gradcam_results"
    shutil.copytree(first_run.out, out)
    return out


# ----------------------------------------------------------------------------- reuse

def test_first_run_computes_and_writes_the_cache(first_run):
    assert not first_run.cache_hit
    # one hit within the run: the label evidence reuses the deep dive's cleanlab result
    assert first_run.cache_stats["memo_misses"] >= 5 and first_run.cache_stats["memo_hits"] == 1
    assert first_run.cams.n_computed > 0
    files = sorted(p.name for p in (first_run.out / ".cache").iterdir())
    assert files == [f"{first_run.cache_key}-derived.npz", f"{first_run.cache_key}.npz"]


def test_second_run_reuses_everything(first_run, cifar_root, tiny_checkpoint, tmp_path, monkeypatch):
    out = copy_outputs(first_run, tmp_path)
    counter = InferenceCounter(monkeypatch)
    again = Analysis(make_params(cifar_root, tiny_checkpoint, out), progress=False)
    again.run_all()
    assert again.cache_hit and counter.calls == 0                     # no inference pass
    assert again.cams.n_computed == 0                                 # no CAM computed
    assert again.cache_stats["memo_misses"] == 0                      # no deep-dive result recomputed
    assert again.cache_stats["memo_hits"] == first_run.cache_stats["memo_misses"] + first_run.cache_stats["memo_hits"]
    assert again.cache_stats["cams_loaded"] == len(first_run.cams)
    np.testing.assert_array_equal(again.preds.probs, first_run.preds.probs)
    np.testing.assert_array_equal(again.preds.features, first_run.preds.features)
    for key in ("separability", "embedding_method", "occlusion_cam_correlation", "faithfulness"):
        assert repr(again.results["deep_dive"].values[key]) == repr(first_run.results["deep_dive"].values[key])
    # The outputs are the same numbers; the summary says where the CAMs came from.
    for name in ("per_class_accuracy.csv", "most_confused_pairs.csv", "deep_dive/label_suspects.csv"):
        assert (out / name).read_bytes() == (first_run.out / name).read_bytes(), name
    # Galleries drawn from identical content by the same code are kept, not drawn again (the 3 shown are).
    assert again.cache_stats["outputs_kept"] == 100 - 3
    summary = (out / "analysis_summary.txt").read_text()
    assert "path: fast exact Grad-CAM" in summary and "[CAMs from the cache]" in summary
    assert any(n.startswith("CAM path: fast exact Grad-CAM") for n in again.results["class_galleries"].notes)


def test_touched_or_missing_gallery_is_drawn_again(first_run, cifar_root, tiny_checkpoint, tmp_path):
    out = copy_outputs(first_run, tmp_path)
    galleries = sorted((out / "worst_predictions").glob("class_*.png"))
    original = galleries[10].read_bytes()
    galleries[10].unlink()
    galleries[20].write_bytes(galleries[20].read_bytes())   # same bytes, new mtime: no longer trusted
    again = Analysis(make_params(cifar_root, tiny_checkpoint, out), progress=False)
    again.run_all()
    assert again.cache_stats["outputs_kept"] == 100 - 3 - 2
    assert galleries[10].read_bytes() == original           # drawn again, identically


def test_force_recompute_bypasses_the_cache(first_run, cifar_root, tiny_checkpoint, tmp_path, monkeypatch):
    out = copy_outputs(first_run, tmp_path)
    counter = InferenceCounter(monkeypatch)
    an = prepared(make_params(cifar_root, tiny_checkpoint, out, FORCE_RECOMPUTE=True))
    an.predict()
    assert not an.cache_hit and counter.calls == 1
    assert an.cache_stats["cams_loaded"] == 0 and not an.cache.memo
    an.cams.get([0], [int(an.preds.preds[0])])
    assert an.cams.n_computed == 1


# ----------------------------------------------------------------------------- invalidation

def test_changed_weights_invalidate(first_run, cifar_root, tiny_checkpoint, tmp_path, monkeypatch):
    state = torch.load(tiny_checkpoint, weights_only=True)
    state["state_dict"]["fc.bias"] = state["state_dict"]["fc.bias"] + 0.5
    changed = tmp_path / "changed.pt"
    torch.save(state, changed)
    out = copy_outputs(first_run, tmp_path)
    counter = InferenceCounter(monkeypatch)
    an = prepared(make_params(cifar_root, changed, out))
    an.predict()
    assert not an.cache_hit and counter.calls == 1
    assert an.cache_key != first_run.cache_key
    assert not np.allclose(an.preds.logits, first_run.preds.logits)
    # The same weights under another file name are the same cache entry (the key hashes the bytes).
    same = tmp_path / "renamed.pt"
    shutil.copy(tiny_checkpoint, same)
    assert cache_key_of(prepared(make_params(cifar_root, same, out))) == first_run.cache_key


@pytest.mark.parametrize("change", [dict(MEAN=[0.5, 0.5, 0.5], STD=[0.25, 0.25, 0.25]), dict(LIMIT=300)])
def test_changed_preprocessing_or_data_invalidates_predictions(first_run, cifar_root, tiny_checkpoint, tmp_path,
                                                                monkeypatch, change):
    out = copy_outputs(first_run, tmp_path)
    counter = InferenceCounter(monkeypatch)
    an = prepared(make_params(cifar_root, tiny_checkpoint, out, **change))
    an.predict()
    assert not an.cache_hit and counter.calls == 1


def test_changed_cam_parameters_recompute_only_the_cams(first_run, cifar_root, tiny_checkpoint, tmp_path):
    out = copy_outputs(first_run, tmp_path)
    an = prepared(make_params(cifar_root, tiny_checkpoint, out, CAM_METHOD="gradcam++"))
    an.predict()
    assert an.cache_hit                                   # predictions do not depend on the CAM method
    i, c = 0, int(an.preds.preds[0])
    an.cams.get([i], [c], method="gradcam")               # cached under Grad-CAM
    assert an.cams.n_computed == 0
    an.cams.get([i], [c])                                 # Grad-CAM++ was never computed
    assert an.cams.n_computed == 1


def test_changed_deep_dive_parameters_recompute_only_what_depends_on_them(first_run, cifar_root, tiny_checkpoint,
                                                                           tmp_path):
    out = copy_outputs(first_run, tmp_path)
    an = prepared(make_params(cifar_root, tiny_checkpoint, out, SEED=1))
    an.predict()
    an.confusion()
    an.deep_dive()
    # SEED feeds the 2-D projection and the cross-validation split (and seeded faithfulness baselines);
    # occlusion, FinerCAM and cleanlab do not depend on it and come from the cache.
    missed = set(an.cache_stats["memo_missed"])
    assert {"embedding", "separability"} <= missed
    assert not missed & {"occlusion", "finercam", "cleanlab"}
    assert an.cache_stats["memo_hits"] >= 3


# ----------------------------------------------------------------------------- damaged cache files

def test_truncated_prediction_cache_is_detected_and_recomputed(first_run, cifar_root, tiny_checkpoint, tmp_path,
                                                               monkeypatch):
    out = copy_outputs(first_run, tmp_path)
    path = out / ".cache" / f"{first_run.cache_key}.npz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])             # as a write cut off half-way would leave it
    counter = InferenceCounter(monkeypatch)
    an = prepared(make_params(cifar_root, tiny_checkpoint, out))
    an.predict()
    assert not an.cache_hit and counter.calls == 1
    assert any(r.startswith(path.name) for r in an.cache_stats["rejected"])
    np.testing.assert_allclose(an.preds.logits, first_run.preds.logits, rtol=1e-5, atol=1e-5)
    # ... and rewritten whole: the next run trusts it again.
    again = prepared(make_params(cifar_root, tiny_checkpoint, out))
    again.predict()
    assert again.cache_hit and counter.calls == 1


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip"])
def test_damaged_derived_cache_is_detected_and_recomputed(first_run, cifar_root, tiny_checkpoint, tmp_path, damage):
    out = copy_outputs(first_run, tmp_path)
    path = out / ".cache" / f"{first_run.cache_key}-derived.npz"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 1000]
    elif damage == "garbage":
        data = bytearray(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    else:                                                  # one flipped byte inside the stored CAMs
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    an = prepared(make_params(cifar_root, tiny_checkpoint, out))
    an.predict()
    assert an.cache_hit                                    # the predictions file is intact
    assert an.cache_stats["cams_loaded"] == 0 and not an.cache.memo
    assert any(r.startswith(path.name) for r in an.cache_stats["rejected"])
    an.cams.get([0], [int(an.preds.preds[0])])
    assert an.cams.n_computed == 1                         # recomputed, not read from the damaged file


def test_cache_from_another_key_is_not_trusted(first_run, cifar_root, tiny_checkpoint, tmp_path):
    """A complete cache file renamed to this run's key (e.g. copied by hand) is refused: its header names its key."""
    out = copy_outputs(first_run, tmp_path)
    an = prepared(make_params(cifar_root, tiny_checkpoint, out, LIMIT=300))
    key = cache_key_of(an)
    shutil.copy(out / ".cache" / f"{first_run.cache_key}.npz", out / ".cache" / f"{key}.npz")
    an.predict()
    assert not an.cache_hit and len(an.preds.labels) == 300


# ----------------------------------------------------------------------------- activations kept in the pass

def test_gallery_selection_streamed_equals_ranking_over_all():
    rng = np.random.default_rng(0)
    n, c = 700, 7
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)).astype(np.float32) * 2
    logits[np.arange(n), labels] += rng.normal(0.5, 1.0, n).astype(np.float32)
    probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
    probs[5] = probs[9]; labels[5] = labels[9]           # exact ties are broken by index, as in metrics
    preds = probs.argmax(1)
    expected = set()
    for cls in range(c):
        expected |= set(metrics.rank_worst(labels, preds, probs, cls, 5).tolist())
        expected |= set(metrics.rank_best(labels, preds, probs, cls, 3 + 5).tolist())
    # Streaming over batches of 64, keeping only the current selection, as the inference pass does.
    kept = np.zeros(0, np.int64)
    for start in range(0, n, 64):
        idx = np.concatenate([kept, np.arange(start, min(start + 64, n))])
        mask = gallery_selection(idx, labels[idx], preds[idx], probs[idx, preds[idx]], probs[idx, labels[idx]], 5, 3)
        kept = idx[mask]
        assert len(kept) <= c * (2 * 5 + 3)        # bounded by the classes, not by the images seen
    assert set(kept.tolist()) == expected


class GapNet(torch.nn.Module):
    def __init__(self, num_classes: int = 6):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU())
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def test_cams_from_the_inference_pass_equal_pytorch_grad_cam_without_a_second_pass():
    torch.manual_seed(0)
    model = GapNet().eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    x = torch.randn(90, 3, 16, 16)
    labels = np.arange(90) % 6
    engine = CamEngine(model, input_shape=(3, 16, 16), batch_size=32)
    assert engine.fast
    store = CamStore(lambda method, layer: engine, x)
    with store.capture(n_worst=4, n_best=2) as keep:
        preds = run_inference(model, x, labels, batch_size=16, progress=False, gallery=keep)
    assert 0 < len(keep) <= keep.max_held <= 6 * (2 * 4 + 2)
    assert isinstance(keep, GalleryActivations) and store.activations is keep   # the store keeps what it captured
    wanted = sorted(i for i in range(90) if i in keep)
    classes = [int(preds.preds[i]) for i in wanted]
    forwarded = []   # images through the model while the CAMs are computed
    handle = model.register_forward_hook(lambda _m, inputs, _out: forwarded.append(len(inputs[0])))
    try:
        got = store.get(wanted, classes)
    finally:
        handle.remove()
    assert store.n_from_activations == len(wanted) > 16
    # Only the one-time check against pytorch-grad-cam ran the model: 4 images, library and fast, 2 target sets.
    assert sum(forwarded) == 16
    model_nchw = model.to(memory_format=torch.contiguous_format)
    with GradCAM(model_nchw, [engine.layer]) as cam:
        ref = np.stack([cam(input_tensor=x[i:i + 1], targets=[ClassifierOutputTarget(c)])[0]
                        for i, c in zip(wanted, classes)])
    assert ref.std() > 0.05
    np.testing.assert_allclose(got, ref, atol=1e-4)
    # Any other image still works: a batched forward pass through the engine.
    other = next(i for i in range(90) if i not in keep)
    store.get([other], [0])
    assert store.n_computed == len(wanted) + 1 and store.n_from_activations == len(wanted)


def test_gallery_content_digest_sees_every_pixel():
    """A kept gallery must be redrawn when any pixel of its content changes; numpy's repr of a large array
    elides the middle ("..."), so the digest must hash the arrays themselves."""
    from helpers.plots.gallery import GalleryRow
    overlay = np.zeros((32, 32, 3), np.uint8)
    changed = overlay.copy()
    changed[16, 16, 1] = 255   # in the part of the array that repr() summarises away
    assert repr(overlay) == repr(changed)
    row = lambda o: GalleryRow(image=np.zeros((32, 32, 3), np.uint8), title="t", panels=[("CAM", o)], ok=False)
    assert digest([row(overlay)]) != digest([row(changed)])
    assert digest([row(overlay)]) == digest([row(overlay.copy())])
    assert digest([row(overlay)]) != digest([GalleryRow(overlay, "t", [("CAM", overlay)], True)])


def test_pass_grid_maps_are_held_small_saved_and_equal_the_library(first_run, cifar_root, tiny_checkpoint, tmp_path):
    """The maps the inference pass's own Grad-CAMs serve are held as grid references, not full maps (a 20,000-image
    224 px run held 13.5 GB of them); they read back from the cache and equal GradCAM called directly."""
    store = first_run.cams
    lazy = [k for k, v in store._cams.items() if v is None]
    assert len(lazy) > len(store) // 2 > 0
    sample = lazy[:: max(1, len(lazy) // 12)][:12]
    idx, cls = [k[0] for k in sample], [k[1] for k in sample]
    got = store.get(idx, cls)
    engine = store.engine()
    ref = GradCAM(model=first_run.loaded.module, target_layers=[engine.layer])(
        input_tensor=first_run.inputs[torch.as_tensor(idx)], targets=[ClassifierOutputTarget(c) for c in cls])
    np.testing.assert_allclose(got, ref, atol=1e-5)
    arrays = store.export()
    assert len(arrays["pass_index"]) == len(lazy) and len(arrays["cam_values"]) == len(store) - len(lazy)
    again = Analysis(make_params(cifar_root, tiny_checkpoint, copy_outputs(first_run, tmp_path)), progress=False)
    again.load_model(); again.load_data(); again.predict()   # noqa: E702
    assert again.cache_hit and again.cams.pass_cams is None
    np.testing.assert_array_equal(again.cams.get(idx, cls), got)
    assert again.cams.n_computed == 0
    bad = dict(arrays, pass_grid=-arrays["pass_grid"] - 1)   # a tampered grid is refused, not drawn
    with pytest.raises(ValueError):
        CamStore(lambda m, l: engine, first_run.inputs, num_classes=first_run.data.num_classes).load(bad)
