"""Can these CAMs be trusted? (model/cam_trust.py, steps/cam_trust.py): the rank correlation against scipy, the
Sobel map by hand and against scipy.ndimage, the randomised copy (seeded, cascading, the original untouched), the
randomisation test on the real Fashion-MNIST CNN (Grad-CAM changes, a weight-free map and EigenCAM's head-blind
map are flagged), class sensitivity on a GAP -> Linear model whose CAMs are known by hand, and the ROAD verdicts."""
from __future__ import annotations

import textwrap
import time

import numpy as np
import pandas as pd
import pytest
import scipy.ndimage
import scipy.stats
import torch
from torch import nn

from helpers.model import cam_trust as T


# ---------------------------------------------------------------------------------------------- rank correlation
def test_rank_correlation_matches_scipy_with_ties_and_nan_for_a_constant_map():
    rng = np.random.default_rng(0)
    a = np.round(rng.random((6, 9, 7)) * 4) / 4          # quantised: many ties, as ReLU'd CAMs have
    b = np.where(rng.random((6, 9, 7)) < 0.5, a, np.round(rng.random((6, 9, 7)) * 3) / 3)
    b[1] = a[1] ** 3                                      # monotone: exactly 1
    b[2] = -a[2]                                          # reversed: exactly -1
    rho = T.rank_correlation(a, b)
    ref = [scipy.stats.spearmanr(x.ravel(), y.ravel()).statistic for x, y in zip(a, b)]
    np.testing.assert_allclose(rho, ref, atol=1e-12)
    assert rho[1] == pytest.approx(1) and rho[2] == pytest.approx(-1)
    const = T.rank_correlation(np.zeros((1, 4, 4)), rng.random((1, 4, 4)))
    assert np.isnan(const[0]) and len(T.rank_correlation(np.zeros((0, 3, 3)), np.zeros((0, 3, 3)))) == 0
    with pytest.raises(ValueError):
        T.rank_correlation(a, b[:, :3])


# ---------------------------------------------------------------------------------------------- Sobel
def test_sobel_of_a_vertical_step_by_hand():
    # Columns 0-1 are 0, columns 2-4 are 255 (luminance 1); every row the same, so d/dy is 0 and the [1, 2, 1]
    # smoothing down the rows gives 4x the column difference y[j+1] - y[j-1] (borders mirrored: y[-1] = y[0]):
    # columns 0..4 -> 0, 4, 4, 0, 0; scaled like a CAM (max 4 -> 1).
    img = np.zeros((1, 4, 5, 1), np.uint8)
    img[..., 2:, 0] = 255
    got = T.sobel_maps(img)[0]
    np.testing.assert_allclose(got, np.tile([0, 1, 1, 0, 0], (4, 1)), atol=1e-6)
    # Transposed: a horizontal step, the same by symmetry (d/dy instead of d/dx).
    np.testing.assert_allclose(T.sobel_maps(img.transpose(0, 2, 1, 3))[0], got.T, atol=1e-6)


def test_sobel_matches_scipy_ndimage_on_rgb_images():
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (3, 11, 13, 3), dtype=np.uint8)
    y = imgs.astype(np.float64) / 255 @ np.array([0.299, 0.587, 0.114])
    for got, g in zip(T.sobel_maps(imgs), y):
        mag = np.hypot(scipy.ndimage.sobel(g, axis=1), scipy.ndimage.sobel(g, axis=0))   # mode 'reflect'
        ref = (mag - mag.min()) / (1e-7 + mag.max() - mag.min())
        np.testing.assert_allclose(got, ref, atol=1e-6)
        assert got.min() == 0 and got.max() == pytest.approx(1, abs=1e-6)


# ---------------------------------------------------------------------------------------------- randomised copy
def _fashion_cnn():
    import fmnist_model
    torch.manual_seed(0)
    return fmnist_model.FashionCNN().eval()


def test_randomised_copy_is_seeded_cascading_and_leaves_the_model_alone():
    model = _fashion_cnn()
    with torch.no_grad():   # "trained": no weight or BatchNorm statistic left at its initial value
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            t.copy_(torch.rand(t.shape) + 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.random.get_rng_state()
    head = T.randomised_copy(model, ["fc"], seed=3)
    both = T.randomised_copy(model, ["fc", "features.3"], seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)        # the global generator is not consumed
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)   # the original is untouched
    h, b = head.state_dict(), both.state_dict()
    for k in before:
        changed_h, changed_b = not torch.equal(before[k], h[k]), not torch.equal(before[k], b[k])
        assert changed_h == (k.startswith("fc.")), k
        # conv weight redrawn; BN reset to weight 1, bias 0, running mean 0, var 1 (the trained ones differ)
        if k.startswith("features.3.") and not k.endswith("num_batches_tracked"):
            assert changed_b, k
        elif not k.startswith(("fc.", "features.3.")):
            assert not changed_b, k
    assert torch.equal(h["fc.weight"], b["fc.weight"])            # cascading: the same new head in both
    again = T.randomised_copy(model, ["fc", "features.3"], seed=3).state_dict()
    assert all(torch.equal(b[k], again[k]) for k in b)
    other = T.randomised_copy(model, ["fc"], seed=4).state_dict()
    assert not torch.equal(other["fc.weight"], h["fc.weight"])
    # PyTorch's default Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert h["fc.weight"].abs().max() <= 1 / np.sqrt(model.fc.in_features)


def test_last_block_and_head_names():
    from helpers.model.architectures import BUILTIN_ARCHS
    from helpers.model.layers import find_target_layer
    cnn = _fashion_cnn()
    layer, _ = find_target_layer(cnn, (1, 28, 28))
    assert layer == "features.3.2" and T.last_block_name(cnn, layer) == "features.3"
    assert T.head_name(cnn, 10) == "fc"
    assert T.cascade(cnn, layer, 10) == [T.Stage("head", ("fc",)), T.Stage("head + last block", ("fc", "features.3"))]
    resnet = BUILTIN_ARCHS["resnet20"](num_classes=10, in_channels=3)
    layer, _ = find_target_layer(resnet, (3, 32, 32))
    assert T.last_block_name(resnet, layer) == layer == "layer3.2"    # a BasicBlock of the stage layer3
    vgg = nn.Module()
    vgg.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())
    assert T.last_block_name(vgg, "features.3") == "features.2"    # a flat stage: the conv before the ReLU
    import timm
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, depth=2, img_size=32,
                            patch_size=8)
    assert T.last_block_name(vit, "blocks.1.norm1") == "blocks.1" and T.head_name(vit, 10) == "head"


# ---------------------------------------------------------------------------------------------- ROAD verdicts
def test_road_verdict_needs_both_baselines_beaten():
    assert T.road_verdict("m", "p", 5, -0.2, -0.1, -0.15)["trustworthy"]
    v = T.road_verdict("m", "p", 5, -0.2, -0.1, -0.3)          # Sobel removes more: not trusted
    assert v["beats_random"] and not v["beats_sobel"] and not v["trustworthy"]
    v = T.road_verdict("m", "p", 5, -0.1, -0.1, 0.0)           # a tie is not a win
    assert not v["beats_random"] and not v["trustworthy"]
    assert not T.road_verdict("m", "p", 5, float("nan"), 0.0, 0.0)["trustworthy"]


def test_tie_breaking_makes_a_sparse_map_lose_a_fifth_of_its_pixels_not_all():
    rng = np.random.default_rng(2)
    sparse = np.zeros((2, 10, 10))
    sparse[0, 2:4, 2:6] = rng.random((2, 4)) + 0.1        # 8 non-zero pixels of 100: 92% ties at 0
    sparse[1] = rng.random((10, 10))                     # no ties
    assert T.share_removed(sparse)[0] == 1.0              # pytorch-grad-cam's ROAD would impute everything
    fixed = T.tie_broken(sparse, seed=0)
    np.testing.assert_allclose(T.share_removed(fixed), 0.2)
    # the order of distinct values is kept: exactly scipy's ranks when there is no tie
    np.testing.assert_allclose(fixed[1].ravel(), (scipy.stats.rankdata(sparse[1].ravel()) - 1) / 99)
    nz = sparse[0] > 0
    assert fixed[0][nz].min() > fixed[0][~nz].max()       # every non-zero pixel still above every zero one
    assert len(np.unique(fixed[0])) == 100                # no ties left
    np.testing.assert_array_equal(fixed, T.tie_broken(sparse, seed=0))
    # what the library does with it: ROAD keeps the pixels below the 80th percentile
    from pytorch_grad_cam.metrics.perturbation_confidence import RemoveMostRelevantFirst
    seen = {}
    RemoveMostRelevantFirst(80, lambda img, mask: seen.setdefault(len(seen), mask))(
        torch.zeros(1, 10, 10), torch.from_numpy(sparse[0].astype(np.float32)))
    RemoveMostRelevantFirst(80, lambda img, mask: seen.setdefault(len(seen), mask))(
        torch.zeros(1, 10, 10), torch.from_numpy(fixed[0]))
    assert float(seen[0].mean()) == 0.0 and float(seen[1].mean()) == pytest.approx(0.8)


# ---------------------------------------------------------------------------------------------- real runs
def _analysis(tmp_path, model_path, arch, limit, **kw):
    from helpers.config import Params
    from helpers.data.readers import SYSTEM_FASHION_MNIST
    from helpers.pipeline import Analysis
    if not (SYSTEM_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    an = Analysis(Params(MODEL_PATH=str(model_path), ARCH=arch, DATASET="fashion_mnist",
                         DATA_ROOT=str(SYSTEM_FASHION_MNIST), DOWNLOAD=False, LIMIT=limit,
                         OUTPUT_DIR=str(tmp_path / "out"), DEVICE="cpu", SEED=0, **kw), progress=False)
    an.load_model()
    an.load_data()
    an.predict()
    return an


@pytest.fixture(scope="module")
def fmnist_trust(fmnist_checkpoint, tmp_path_factory):
    """The real Fashion-MNIST CNN on the full test set: pair galleries, then the step, timed."""
    from conftest import FMNIST_ARCH
    from helpers.steps.cam_trust import cam_trust
    an = _analysis(tmp_path_factory.mktemp("trust"), fmnist_checkpoint, FMNIST_ARCH, None)
    conf = an.confusion()
    galleries = an.pair_galleries()
    before = {k: v.clone() for k, v in an.run.model.module.state_dict().items()}
    t0 = time.perf_counter()
    sec = cam_trust(an.run, conf)
    step_s = time.perf_counter() - t0
    print(f"\ncam_trust: {step_s:.2f} s for {sec.n_images} images; inference pass over {len(an.preds.labels)} "
          f"images {an.timings['inference']:.2f} s (ratio {step_s / an.timings['inference']:.1f})")
    print("\n".join(sec.notes))
    yield an, conf, galleries, sec, before
    an.outputs.close(raise_errors=False)


def test_step_on_the_real_model_files_weights_and_galleries(fmnist_trust):
    from PIL import Image
    from helpers.steps.cam_trust import CSV, PNG, index_section, summary_lines
    an, conf, galleries, sec, before = fmnist_trust
    after = an.run.model.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)     # run.model never changed
    p = an.params
    assert sec.n_images == len(sec.images) == p.N_PAIR_GALLERIES * p.PAIR_EXAMPLES   # 5 pairs with >= 6 errors
    assert list(sec.pairs["pair"]) == [f"{an.run.names[t]} → {an.run.names[q]}"
                                       for t, q in zip(conf.pairs["true_id"][:5], conf.pairs["pred_id"][:5])]
    # The step scores the galleries' own CAMs on the galleries' own images: untreated, the same ROAD score as
    # theirs; tie-broken (what the step reports), each map loses exactly its top 20%.
    from helpers.steps.cam_trust import baseline_maps, road_table
    idx, true, pred = (sec.images[c].to_numpy() for c in ("index", "true_id", "pred_id"))
    cams = {"gradcam": an.run.cams.get(idx.tolist(), pred.tolist())}
    raw = road_table(an.run, idx, true, pred, cams, baseline_maps(an.run, idx), tie_break=False)
    assert raw["road"][0] == pytest.approx(galleries.faithfulness["gradcam"], abs=1e-9)
    shares = T.share_removed(cams["gradcam"])
    print(f"untreated ROAD would remove {shares.min():.3f}-{shares.max():.3f} of a Grad-CAM map's pixels; "
          f"gradcam ROAD raw {raw['road'][0]:+.4f}, tie-broken {sec.road['road'][0]:+.4f}")
    # class sensitivity per image, against scipy on the store's maps
    i, t, q = (int(sec.images[c][0]) for c in ("index", "true_id", "pred_id"))
    ct, cp = an.run.cams.get([i], [t])[0], an.run.cams.get([i], [q])[0]
    assert sec.images["class_sensitivity"][0] == pytest.approx(scipy.stats.spearmanr(ct.ravel(), cp.ravel())[0])
    csv = pd.read_csv(an.run.outputs.current(CSV))
    assert set(csv["check"]) == {"class sensitivity", "randomisation", "ROAD baselines"}
    assert len(csv) == len(sec.pairs) + len(sec.randomisation) + len(sec.road)
    an.outputs.flush()
    with Image.open(an.run.outputs.current(PNG)) as im:
        assert im.size[0] > 600 and im.size[1] > 400
    lines = summary_lines(sec)
    assert lines[0].startswith("Can these CAMs be trusted") and any("Randomisation, head" in x for x in lines)
    page = index_section(an.run, sec)
    assert "data:image/jpeg;base64," in page and "Shirt" in page


def test_randomising_the_real_model_changes_gradcam_a_lot(fmnist_trust):
    """Adebayo et al.: Grad-CAM of a trained model must depend on its weights. Checked against pytorch-grad-cam
    run directly on a randomised copy, then the verdicts: both stages well below 0.5, not flagged."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    an, _, _, sec, _ = fmnist_trust
    r = sec.randomisation.set_index("stage")
    assert list(r.index) == ["head", "head + last block"]
    assert r.loc["head + last block", "randomised"] == "fc + features.3"
    assert (r["median_rank_corr"] < 0.25).all() and not r["flagged"].any(), r
    model = an.run.model.module
    copy = T.randomised_copy(model, ["fc", "features.3"], seed=an.params.SEED)
    idx, pred = sec.images["index"].to_numpy()[:4].copy(), sec.images["pred_id"].to_numpy()[:4].copy()

    def library(m):
        cam = GradCAM(m, [m.get_submodule("features.3.2")])
        try:
            return cam(input_tensor=an.run.inputs[idx], targets=[ClassifierOutputTarget(int(c)) for c in pred])
        finally:
            cam.activations_and_grads.release()
    ref = [scipy.stats.spearmanr(a.ravel(), b.ravel())[0] for a, b in zip(library(model), library(copy))]
    np.testing.assert_allclose(sec.images["rand_head_last_block_pred"][:4], ref, atol=1e-4)


def test_a_map_that_ignores_the_weights_is_flagged(fmnist_trust):
    # The Sobel edge map of the input "explains" every model alike: randomisation cannot change it.
    an, _, _, sec, _ = fmnist_trust
    idx = sec.images["index"].to_numpy()
    model = an.run.model.module
    stages = T.cascade(model, sec.layer, 10)
    table, maps = T.randomisation_test(model, stages, lambda m: T.sobel_maps(an.run.data.images[idx]))
    assert table["flagged"].all() and np.allclose(table["median_rank_corr"], 1.0)


def test_maps_that_do_not_beat_the_sobel_baseline_are_untrustworthy(fmnist_trust):
    from helpers.steps.cam_trust import baseline_maps, road_table
    an, _, _, sec, _ = fmnist_trust
    idx, true, pred = (sec.images[c].to_numpy() for c in ("index", "true_id", "pred_id"))
    base = baseline_maps(an.run, idx)
    table = road_table(an.run, idx, true, pred, {"edges": base["sobel"], "noise": base["random"]}, base)
    table = table.set_index("method")
    assert not table.loc["edges", "beats_sobel"] and not table.loc["edges", "trustworthy"]
    assert not table.loc["noise", "beats_random"] and not table.loc["noise", "trustworthy"]
    assert table.loc["edges", "road"] == table.loc["edges", "sobel"]    # the same maps, the same seeded ROAD
    # and the step's own verdicts follow the same rule
    for r in sec.road.itertuples():
        assert r.trustworthy == (r.road < r.random and r.road < r.sobel)


@pytest.mark.slow
def test_eigencam_ignores_the_head_and_the_class(fmnist_checkpoint, tmp_path):
    """EigenCAM is the first principal component of the target layer's activations: re-initialising the head
    cannot change it (flagged), and its true- and predicted-class maps are one map (every difference is noise)."""
    from conftest import FMNIST_ARCH
    from helpers.steps.cam_trust import cam_trust, summary_lines
    an = _analysis(tmp_path, fmnist_checkpoint, FMNIST_ARCH, 2000, CAM_METHOD="eigencam")
    sec = cam_trust(an.run, an.confusion())
    r = sec.randomisation.set_index("stage")
    assert r.loc["head", "flagged"] and r.loc["head", "median_rank_corr"] == pytest.approx(1.0)
    assert not r.loc["head + last block", "flagged"], r
    assert sec.pairs["difference_is_noise"].all() and np.allclose(sec.images["class_sensitivity"], 1.0)
    assert any("difference panel (true − pred) is noise" in x for x in summary_lines(sec))
    assert list(sec.road["method"]) == ["eigencam"]    # no FinerCAM row: its base would be another method
    an.outputs.close(raise_errors=False)


HAND_MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    class HandGap(nn.Module):
        """x -> 1x1 conv (weight 1) -> global average pool -> Linear(1, 10): logit_c = w_c * mean(x) + b_c."""
        def __init__(self, num_classes=10, in_channels=1):
            super().__init__()
            self.conv = nn.Conv2d(in_channels, 1, 1, bias=False)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(1, num_classes)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.conv(x)), 1))
''')


def test_class_sensitivity_by_hand_on_a_gap_linear_model(tmp_path):
    """Grad-CAM of class c for this model is ReLU(w_c * x) (the GAP gradient is w_c / (h*w) everywhere), so:
    classes 0 and 1 (w = +1 both) have the same map, rank correlation 1, difference flagged as noise; a class with
    w = -1 has ReLU(-x) against class 1's ReLU(x), whose rank correlation is computed here from x by hand."""
    from helpers.steps.cam_trust import cam_trust
    (tmp_path / "hand.py").write_text(HAND_MODEL)
    import importlib.util
    spec = importlib.util.spec_from_file_location("hand", tmp_path / "hand.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.HandGap()
    with torch.no_grad():
        model.conv.weight.fill_(1.0)
        model.fc.weight[:] = -1.0
        model.fc.weight[:2] = 1.0
        model.fc.bias[:] = -5.0
        model.fc.bias[0], model.fc.bias[1] = 0.0, 5.0    # class 1 always wins: every image is predicted 1
    torch.save(model.state_dict(), tmp_path / "hand.pt")
    an = _analysis(tmp_path, tmp_path / "hand.pt", f"{tmp_path / 'hand.py'}:HandGap", 600, N_PAIR_GALLERIES=9,
                   PAIR_EXAMPLES=4)
    assert (an.preds.preds == 1).all()
    sec = cam_trust(an.run, an.confusion())
    pairs = sec.pairs.set_index("true_id")
    assert set(pairs.index) == set(range(10)) - {1} and (pairs["pred_id"] == 1).all()
    assert pairs.loc[0, "class_sensitivity_median"] == pytest.approx(1.0) and pairs.loc[0, "difference_is_noise"]
    img = sec.images
    for row in img[img["true_id"] != 0].itertuples():
        x = an.run.inputs[row.index, 0].numpy().astype(np.float64)
        by_hand = scipy.stats.spearmanr(np.maximum(-x, 0).ravel(), np.maximum(x, 0).ravel())[0]
        assert row.class_sensitivity == pytest.approx(by_hand, abs=1e-6)
    assert not pairs.drop(index=0)["difference_is_noise"].any()
    assert (pairs.drop(index=0)["class_sensitivity_median"] < 0).all()   # disjoint supports: negative
    an.outputs.close(raise_errors=False)


def test_step_without_cams_or_pairs(tmp_path):
    from types import SimpleNamespace
    from helpers.files.outputs import Outputs
    from helpers.steps.cam_trust import CSV, cam_trust, index_section, summary_lines
    run = SimpleNamespace(params=SimpleNamespace(CAM_METHOD="gradcam", N_PAIR_GALLERIES=5, PAIR_EXAMPLES=6, SEED=0),
                          cams=None, model=None, inputs=torch.zeros(3, 1, 8, 8), outputs=Outputs(tmp_path / "out"),
                          names=["a", "b"])
    sec = cam_trust(run, SimpleNamespace(pairs=pd.DataFrame({"true_id": [], "pred_id": []})))
    assert sec.n_images == 0 and len(sec.road) == 0 and sec.skipped
    assert summary_lines(sec)[0].startswith("Can these CAMs be trusted") and "<h2>" in index_section(run, sec)
    assert pd.read_csv(run.outputs.current(CSV)).columns[0] == "check"
    run.outputs.close()
