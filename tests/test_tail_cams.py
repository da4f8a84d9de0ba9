"""The torch.fx tail path (helpers.model.tail): Grad-CAM from the target layer onward equals pytorch-grad-cam's
GradCAM on a flatten + MLP head CNN, a timm ViT and a torchvision ResNet-18; a model torch.fx cannot trace falls
back to the library with the reason; the inference pass keeps the tail's inputs of the gallery images only."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.reshape_transforms import vit_reshape_transform as library_vit_reshape
from torch import nn

from helpers.model.cam_path import CamPath
from helpers.model.cam_store import CamStore, gallery_selection
from helpers.model.cams import CamEngine
from helpers.model.inference import run_inference
from helpers.model.tail import gradcam_from_images, split_at_layer

TOL = 1e-5


class MlpHeadCNN(nn.Module):
    """Convs -> flatten -> two-layer MLP: Grad-CAM's gradients depend on the position, so no fast path."""

    def __init__(self, num_classes: int = 6, side: int = 16):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * (side // 2) ** 2, 32), nn.ReLU(),
                                        nn.Linear(32, num_classes))
        for m in self.modules():   # visible BN statistics so the random maps are not near-constant
            if isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.2, 0.2)

    def forward(self, x):
        return self.classifier(self.features(x))


class Untraceable(MlpHeadCNN):
    """Data-dependent control flow: torch.fx cannot trace a branch on a tensor's value."""

    def forward(self, x):
        x = self.features(x)
        if x.mean() > 0:
            x = x * 2.0
        return self.classifier(x)


class ShapeReader(MlpHeadCNN):
    """Reads its map's shape before the target layer and uses it after (as a Swin block's B, H, W, C = x.shape):
    the tail reads the batch size and three constants."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm2d(16)
        self.mlp = self.classifier[1:]   # the classifier without its Flatten

    def forward(self, x):
        y = self.features(x)
        b, c, h, w = y.shape
        return self.mlp(self.norm(y).reshape(b, c * h * w))


class ShapeAsValue(MlpHeadCNN):
    """Reads a value that is neither the batch size nor a constant (a float that grows with the batch)."""

    def forward(self, x):
        scale = x.shape[0] * 1.5 + 1.0   # before the cut, read after it
        return self.classifier(self.features(x)) * scale


def library_gradcam(model, layer, x, classes, reshape=None) -> np.ndarray:
    """pytorch-grad-cam's GradCAM, one image at a time (no batching shared with the code under test)."""
    with GradCAM(model, [layer], reshape_transform=reshape) as cam:
        return np.stack([cam(input_tensor=x[i:i + 1], targets=[ClassifierOutputTarget(int(c))])[0]
                         for i, c in enumerate(classes)])


def images(n: int, side: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def tiny_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4,
                             num_classes=10).eval()


def test_mlp_head_cnn_tail_cams_equal_pytorch_grad_cam():
    torch.manual_seed(0)
    model = MlpHeadCNN().eval()
    x, classes = images(6, 16), np.array([0, 1, 2, 3, 4, 5])
    engine = CamEngine(model, input_shape=(3, 16, 16), batch_size=4)
    assert engine.cam_path.kind == "tail" and not engine.fast
    assert "fast path not used: head runs ReLU" in engine.path   # why the GAP shortcut did not apply
    got = engine.compute(x, classes)
    assert engine.cam_path.verified and "verified against pytorch-grad-cam" in engine.path
    ref = library_gradcam(model, engine.layer, x, classes)
    assert ref.std() > 0.05
    np.testing.assert_allclose(got, ref, atol=TOL)


def test_a_tail_that_reads_the_batch_size_and_shape_constants_equals_pytorch_grad_cam():
    torch.manual_seed(0)
    model = ShapeReader().eval()
    split, why = split_at_layer(model, model.norm, (3, 16, 16))
    assert split is not None and why == ""
    engine = CamEngine(model, target_layer="norm", input_shape=(3, 16, 16), batch_size=4)
    assert engine.cam_path.kind == "tail"
    x, classes = images(7, 16), np.array([0, 1, 2, 3, 4, 5, 0])   # batches of 4 and 3: the batch size varies
    got = engine.compute(x, classes)
    np.testing.assert_allclose(got, library_gradcam(model, engine.layer, x, classes), atol=TOL)


def test_a_tail_reading_a_value_that_is_not_the_batch_nor_constant_is_refused():
    torch.manual_seed(0)
    model = ShapeAsValue().eval()
    split, why = split_at_layer(model, model.features, (3, 16, 16))
    assert split is None and "neither a tensor, the batch size nor a constant" in why


def test_vit_tail_recomputes_norm1_from_the_residual_stream_and_equals_pytorch_grad_cam():
    vit = tiny_vit()
    layer = vit.blocks[-1].norm1
    x, classes = images(4, 32, seed=2), np.array([1, 2, 3, 4])
    engine = CamEngine(vit, input_shape=(3, 32, 32), batch_size=2)
    assert engine.layer is layer and engine.cam_path.kind == "tail"
    split, why = split_at_layer(vit, layer, (3, 32, 32))
    # One value per image crosses the cut: the last block's input (norm1 is recomputed from it in the tail).
    assert why == "" and split.recomputes_layer and split.sources == (0,)
    seen = {}
    handle = vit.blocks[-1].register_forward_pre_hook(lambda _m, args: seen.update(x=args[0]))
    with torch.no_grad():
        vit(x)
    handle.remove()
    kept = split.head(x)
    assert len(kept) == 1 and torch.allclose(kept[0], seen["x"], atol=1e-6)
    got = engine.compute(x, classes)
    # Independent reference: the library's own ViT reshape with an explicit 8x8 grid.
    ref = library_gradcam(vit, layer, x, classes, reshape=lambda t: library_vit_reshape(t, height=8, width=8))
    assert ref.std() > 0.05
    np.testing.assert_allclose(got, ref, atol=TOL)


def test_torchvision_resnet18_keeps_the_fast_path_and_splits_too():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x, classes = images(3, 64, seed=3), np.array([0, 5, 9])
    engine = CamEngine(model, input_shape=(3, 64, 64), batch_size=4)
    assert engine.layer_name == "layer4.1" and engine.cam_path.kind == "fast"   # GAP -> Linear: no backward at all
    ref = library_gradcam(model, model.layer4[1], x, classes)
    np.testing.assert_allclose(engine.compute(x, classes), ref, atol=1e-4)
    split, why = split_at_layer(model, model.layer4[1], (3, 64, 64))
    assert why == "" and not split.recomputes_layer and split.sources == (-1,)
    np.testing.assert_allclose(gradcam_from_images(split, x, classes, None), ref, atol=TOL)


def test_a_model_torch_fx_cannot_trace_falls_back_to_the_library_with_the_reason():
    torch.manual_seed(0)
    model = Untraceable().eval()
    split, why = split_at_layer(model, model.features[5], (3, 16, 16))
    assert split is None and "TraceError" in why
    engine = CamEngine(model, input_shape=(3, 16, 16))
    assert engine.cam_path.kind == "library" and engine.inference_keep is None
    assert "torch.fx tail not used" in engine.path and "TraceError" in engine.path
    x, classes = images(3, 16), np.array([0, 1, 2])
    np.testing.assert_allclose(engine.compute(x, classes), library_gradcam(model, engine.layer, x, classes), atol=TOL)
    store = CamStore(lambda method, layer: engine, x)
    with store.capture(n_worst=2, n_best=1) as keep:
        assert keep is None   # nothing to keep for the library


def test_inference_pass_keeps_the_tail_inputs_of_the_gallery_images_only():
    torch.manual_seed(0)
    model = MlpHeadCNN().eval()
    n, n_worst, n_best = 120, 3, 2
    x, labels = images(n, 16, seed=4), np.arange(n) % 6
    engine = CamEngine(model, input_shape=(3, 16, 16), batch_size=32)
    store = CamStore(lambda method, layer: engine, x)
    with store.capture(n_worst=n_worst, n_best=n_best) as keep:
        preds = run_inference(model, x, labels, batch_size=16, progress=False, gallery=keep)
    # The memory bound, counted: at most classes * (2 * N_WORST + N_BEST) images' values held at any time.
    assert 0 < len(keep) <= keep.max_held <= 6 * (2 * n_worst + n_best)
    idx = np.arange(n)
    p = preds.probs
    expected = idx[gallery_selection(idx, labels, preds.preds, p[idx, preds.preds], p[idx, labels], n_worst, n_best)]
    wanted = [i for i in range(n) if i in keep]
    assert wanted == expected.tolist()   # exactly the gallery images, selected over the whole set at once
    assert isinstance(keep.stack(wanted[:2]), tuple)
    classes = [int(preds.preds[i]) for i in wanted]
    forwarded = []
    handle = model.register_forward_hook(lambda _m, inputs, _out: forwarded.append(len(inputs[0])))
    try:
        got = store.get(wanted, classes)
    finally:
        handle.remove()
    assert store.n_from_activations == len(wanted)
    # Only the one-time check ran the model (pytorch-grad-cam on 4 images, for 2 sets of classes).
    assert sum(forwarded) == 8
    np.testing.assert_allclose(got, library_gradcam(model, engine.layer, x[wanted], classes), atol=TOL)


def test_cam_path_tail_text_and_json():
    path = CamPath("tail", reason="head runs ReLU", verified=True)
    assert str(path) == ("exact Grad-CAM from the target layer onward (torch.fx tail, verified against "
                         "pytorch-grad-cam; fast path not used: head runs ReLU)")
    assert CamPath.from_json(path.to_json()) == path
    assert CamPath.from_json({"kind": "fast", "verified": True}) == CamPath("fast", verified=True)   # older entries
    with pytest.raises(ValueError):
        CamPath.from_json({"kind": "tails"})


def test_a_randomised_copy_reroots_the_runs_split_and_its_cams_are_the_copys(monkeypatch):
    from helpers.model import tail as tail_module
    from helpers.model.cam_trust import randomised_copy
    torch.manual_seed(0)
    model = MlpHeadCNN().eval()
    engine = CamEngine(model, input_shape=(3, 16, 16))
    assert engine.cam_path.kind == "tail"
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    copy = randomised_copy(model, names, seed=4)

    def no_trace(*_args, **_kwargs):
        raise AssertionError("the copy traced its own split")
    monkeypatch.setattr(tail_module, "_trace", no_trace)
    copy_engine = CamEngine(copy, input_shape=(3, 16, 16), tail_of=engine)
    assert copy_engine.cam_path.kind == "tail"
    x, classes = images(6, 16, seed=2), np.array([0, 1, 2, 3, 4, 5])
    got = copy_engine.compute(x, classes, progress=False)   # its first batch is checked against the library too
    np.testing.assert_allclose(got, library_gradcam(copy, copy_engine.layer, x, classes), atol=TOL)
    own = engine.compute(x, classes, progress=False)
    np.testing.assert_allclose(own, library_gradcam(model, engine.layer, x, classes), atol=TOL)   # split untouched
    assert np.abs(got - own).max() > 0.1   # the copy's weights, not the run's
    assert copy_engine.cam_path.verified and engine.tail_split.tail is not copy_engine.tail_split.tail


@pytest.mark.parametrize("kind", ["mlp_head_cnn", "vit"])
def test_finercam_on_the_tail_equals_pytorch_grad_cams_finercam_without_a_backward_through_the_head(kind):
    """compute_finer on the torch.fx tail path: after the one-time check against the library, the head part runs
    without autograd and only the tail is differentiated (a backward hook before the cut never fires), and the
    maps equal pytorch-grad-cam's FinerCAM, one image at a time, for true vs predicted and for true = pred
    (the nearest classes by logit)."""
    from pytorch_grad_cam import FinerCAM
    from pytorch_grad_cam.utils.model_targets import FinerWeightedTarget
    if kind == "vit":
        model, side, first = tiny_vit(), 32, None
        reshape = lambda t: library_vit_reshape(t, height=8, width=8)
    else:
        torch.manual_seed(0)
        model, side, reshape = MlpHeadCNN().eval(), 16, None
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))   # the stem: before any cut
    x = images(6, side, seed=4)
    true, pred = np.array([1, 2, 3, 4, 5, 0]), np.array([0, 5, 3, 1, 2, 0])   # images 2 and 5: true = pred
    engine = CamEngine(model, input_shape=(3, side, side), batch_size=4)
    assert engine.cam_path.kind == "tail"
    engine.compute_finer(x[:2], true[:2], pred[:2])   # the one-time check (it runs the library once)
    assert engine._finer_fast and engine.finer_fast_max_diff <= 1e-4
    backward = []
    handle = first.register_full_backward_hook(lambda *_: backward.append(1))
    try:
        got = engine.compute_finer(x, true, pred)
    finally:
        handle.remove()
    assert backward == [] and got.shape == (6, side, side)
    for i in range(6):
        with FinerCAM(model, [engine.layer], reshape_transform=reshape) as cam:
            if true[i] != pred[i]:
                ref = cam(x[i:i + 1], targets=[FinerWeightedTarget(int(true[i]), [int(pred[i])], 1)])
            else:
                ref = cam(x[i:i + 1], targets=None, target_idx=int(true[i]))
        assert ref.std() > 0.01
        np.testing.assert_allclose(got[i], ref[0], atol=1e-4)


def test_finercam_after_the_grad_cam_path_is_refuted_runs_the_library():
    """FinerCAM checked on the tail, then the engine falls back to the library (a later Grad-CAM check failed):
    compute_finer follows it to pytorch-grad-cam instead of calling the tail it no longer has."""
    torch.manual_seed(0)
    model = MlpHeadCNN().eval()
    x, true, pred = images(4, 16, seed=4), np.array([1, 2, 3, 4]), np.array([0, 5, 3, 1])
    engine = CamEngine(model, input_shape=(3, 16, 16), batch_size=4)
    first = engine.compute_finer(x, true, pred)
    assert engine._finer_fast and engine.cam_path.kind == "tail"
    engine._set_library_path("refuted in this test")
    assert engine.cam_path.kind == "library" and not engine.exact
    again = engine.compute_finer(x, true, pred)
    np.testing.assert_allclose(again, first, atol=1e-4)   # the library's maps: what the tail had matched
