"""helpers.model.cams, helpers.model.layers and helpers.plots.overlay against pytorch-grad-cam's own output,
on tiny random-weight models and 32x32 inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from pytorch_grad_cam import FinerCAM, GradCAM
from pytorch_grad_cam.metrics.road import ROADMostRelevantFirst
from pytorch_grad_cam.utils.model_targets import (ClassifierOutputSoftmaxTarget, ClassifierOutputTarget,
                                                  FinerWeightedTarget)
from pytorch_grad_cam.utils.reshape_transforms import vit_reshape_transform as library_vit_reshape

from helpers.model import cams, layers
from helpers.model.cams import CAM_METHODS, CamEngine, gradcam_from_activations
from helpers.model.faithfulness import faithfulness
from helpers.model.layers import find_target_layer, resolve_target_layer, vit_reshape_transform
from helpers.plots.overlay import cam_colormap_rgb, overlay
from helpers.errors import ConfigError, NumericalError


# ----------------------------------------------------------------------------- tiny models

class Block(nn.Module):
    """He et al. CIFAR basic block (same layout as helpers.model.architectures, kept local on purpose)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class HeResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs, GAP -> Linear head via torch.flatten (functional)."""

    def __init__(self, n: int = 1, widths=(8, 16, 32), num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(*[Block(cin if j == 0 else w, w, 2 if (i and j == 0) else 1) for j in range(n)]))
            cin = w
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():   # visible BN statistics so the random maps are not near-constant
            if isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.2, 0.2)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def vgg_mlp(num_classes: int = 10) -> nn.Module:
    """VGG-like: `features` ends in a 4x4 max-pooled map, then flatten -> MLP (not a GAP head)."""

    class VGGish(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2))
            self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, num_classes))

        def forward(self, x):
            return self.classifier(self.features(x))

    return VGGish()


class Wrapper(nn.Module):
    """Like the project's LogitsWrapper: the network lives at `.model`."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def tv_resnet(depth: int, cifar_stem: bool) -> nn.Module:
    m = getattr(torchvision.models, f"resnet{depth}")(num_classes=10)
    if cifar_stem:
        m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        m.maxpool = nn.Identity()
    return m.eval()


def seeded(fn, *args, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return fn(*args, **kwargs).eval()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 3, 32, 32, generator=g)


@pytest.fixture(scope="module")
def targets():
    return np.array([0, 3, 7, 3, 9])


def library_one_by_one(model, layer, x, classes, cls=GradCAM, reshape=None):
    """Reference: one pytorch-grad-cam call per image, one target each."""
    out = []
    for i, c in enumerate(classes):
        cam = cls(model, [layer], reshape_transform=reshape)
        out.append(cam(input_tensor=x[i:i + 1], targets=[ClassifierOutputTarget(int(c))])[0])
        cam.activations_and_grads.release()
    return np.stack(out)


def assert_nontrivial(maps: np.ndarray, at_least: float = 0.6):
    """Most maps use the full [0, 1] range, so equality checks are not comparing all-zero maps."""
    ranges = maps.max(axis=(1, 2)) - maps.min(axis=(1, 2))
    assert np.mean(ranges > 0.5) >= at_least, ranges


# ----------------------------------------------------------------------------- equality with the library

@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam", "xgradcam", "eigencam", "scorecam"])
def test_batched_engine_equals_single_image_library_calls(method, images, targets):
    model = seeded(HeResNet)
    engine = CamEngine(model, method=method, batch_size=2, fast_path=False)
    assert engine.layer_name == "layer3.0"
    assert engine.path.startswith(f"pytorch-grad-cam {CAM_METHODS[method].__name__}, batched")
    got = engine.compute(images, targets)
    ref = library_one_by_one(model, model.layer3[-1], images, targets, CAM_METHODS[method])
    assert got.shape == (5, 32, 32) and got.dtype == np.float32
    assert_nontrivial(ref)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert got.min() >= 0 and got.max() <= 1


def test_finercam_method_matches_library_default_comparison(images, targets):
    """compute() with finercam = FinerCAM's own default: target vs the 3 classes with the closest logits."""
    model = seeded(HeResNet)
    engine = CamEngine(model, method="finercam", batch_size=2)
    got = engine.compute(images, targets)
    ref = []
    for i, t in enumerate(targets):
        cam = FinerCAM(model, [model.layer3[-1]])
        ref.append(cam(images[i:i + 1], targets=None, target_idx=int(t))[0])
        cam.base_cam.activations_and_grads.release()
    np.testing.assert_allclose(got, np.stack(ref), atol=1e-5)


def test_fast_path_on_gap_head_equals_library(images, targets):
    model = seeded(HeResNet, n=2)
    engine = CamEngine(model, method="gradcam", batch_size=2)
    got = engine.compute(images, targets)
    assert engine.path.startswith("fast exact Grad-CAM")
    assert engine.fast_max_diff is not None and engine.fast_max_diff <= 1e-4
    ref = library_one_by_one(model, model.layer3[-1], images, targets)
    assert_nontrivial(ref)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    # The fast path must leave no hooks behind (they would record every later forward pass).
    assert not any(m._forward_hooks for m in model.modules())


def test_non_gap_head_falls_back_and_still_matches(images, targets):
    model = seeded(vgg_mlp)
    engine = CamEngine(model, method="gradcam", batch_size=4)
    assert engine.layer_name == "features.8"
    assert engine.path.startswith("exact Grad-CAM from the target layer onward (torch.fx tail")   # not GAP: the tail
    assert "Linear" in engine.path or "ReLU" in engine.path
    got = engine.compute(images, targets)
    ref = library_one_by_one(model, model.features[8], images, targets)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_gradcam_from_activations_hand_computed():
    acts = np.zeros((1, 2, 2, 2), np.float32)
    acts[0, 0] = [[1, 0], [0, 0]]
    acts[0, 1] = [[0, 2], [0, 1]]
    weights = np.array([[1.0, -1.0], [2.0, 1.0]], np.float32)
    # class 0: relu([[1,-2],[0,-1]]) = [[1,0],[0,0]]; class 1: [[2,2],[0,1]] -> min-max
    got = gradcam_from_activations(acts, weights, [0], (2, 2))
    np.testing.assert_allclose(got[0], [[1, 0], [0, 0]], atol=1e-6)
    got = gradcam_from_activations(acts, weights, [1], (2, 2))
    np.testing.assert_allclose(got[0], [[1, 1], [0, 0.5]], atol=1e-6)


def test_wrapper_model_paths_and_fast_path(images, targets):
    inner = seeded(HeResNet)
    model = Wrapper(inner)
    assert find_target_layer(model)[0] == "model.layer3.0"
    name, module = resolve_target_layer(model, "layer2[-1]")
    assert name == "model.layer2.0" and module is inner.layer2[0]
    assert resolve_target_layer(model, "model.layer2.0")[1] is inner.layer2[0]
    engine = CamEngine(model, target_layer="layer3.0")
    np.testing.assert_allclose(engine.compute(images, targets),
                               library_one_by_one(inner, inner.layer3[0], images, targets), atol=1e-4)
    assert engine.path.startswith("fast exact")


def test_earlier_layer_is_not_a_gap_head(images, targets):
    model = seeded(HeResNet)
    engine = CamEngine(model, target_layer="layer2.0")
    assert engine.path.startswith("exact Grad-CAM from the target layer onward (torch.fx tail")
    np.testing.assert_allclose(engine.compute(images, targets),
                               library_one_by_one(model, model.layer2[0], images, targets), atol=1e-5)


# ----------------------------------------------------------------------------- errors

def test_bad_arguments_raise_config_error(images):
    model = seeded(HeResNet)
    with pytest.raises(ConfigError, match="gradcam\\+\\+.*layercam"):
        CamEngine(model, method="nope")
    engine = CamEngine(model)
    with pytest.raises(ConfigError, match="one class per image"):
        engine.compute(images, [1, 2])
    with pytest.raises(ConfigError, match="class ids in"):
        engine.compute(images, [1, 2, 3, 4, 10])
    with pytest.raises(ConfigError, match="one class per image"):
        engine.compute_finer(images, [1] * 5, [2] * 4)


def test_nan_model_raises_numerical_error(images):
    model = seeded(HeResNet)
    with torch.no_grad():
        model.layer3[0].conv2.weight[0, 0, 0, 0] = float("nan")
    engine = CamEngine(model)
    with pytest.raises(NumericalError):
        engine.compute(images, [0] * 5)
    assert "fast path not used" in engine.path


# ----------------------------------------------------------------------------- layer finding

def test_find_target_layer_cnns():
    assert find_target_layer(seeded(HeResNet, n=9))[0] == "layer3.8"          # ResNet-56 layout
    assert find_target_layer(tv_resnet(34, cifar_stem=True))[0] == "layer4.2"
    assert find_target_layer(tv_resnet(18, cifar_stem=False), (3, 64, 64))[0] == "layer4.1"
    # ImageNet stem on 32x32: layer4 is 1x1, so the last map before pooling is layer3's.
    assert find_target_layer(tv_resnet(18, cifar_stem=False))[0] == "layer3.1"
    vgg = seeded(vgg_mlp)
    name, module = find_target_layer(vgg)
    assert name == "features.8" and module is vgg.features[8]


def test_find_target_layer_builtin_architectures():
    arch = pytest.importorskip("helpers.model.architectures")
    assert find_target_layer(arch.BUILTIN_ARCHS["resnet56"](num_classes=10))[0] == "layer3.8"
    assert find_target_layer(arch.BUILTIN_ARCHS["resnet18"](num_classes=10))[0] == "layer4.1"


def test_find_target_layer_skips_replicating_adaptive_pool():
    """torchvision VGG layout (features, avgpool=AdaptiveAvgPool2d(7), classifier), narrowed: five max-pools
    take 32x32 to 1x1, and the adaptive pool only copies that into a 7x7 map, so the last computed map
    larger than 1x1 is the 2x2 output of the final ReLU, features.13."""

    class MiniVGG(nn.Module):
        def __init__(self):
            super().__init__()
            layers, cin = [], 3
            for _ in range(4):
                layers += [nn.Conv2d(cin, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
                cin = 4
            layers += [nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            self.features = nn.Sequential(*layers)
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(nn.Linear(4 * 49, 10))

        def forward(self, x):
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    vgg = MiniVGG().eval()
    name, module = find_target_layer(vgg)
    assert name == "features.13" and module is vgg.features[13]


def test_resolve_target_layer_error_lists_candidates():
    model = seeded(HeResNet)
    with pytest.raises(ConfigError) as err:
        resolve_target_layer(model, "layer9.1")
    msg = str(err.value)
    assert "layer9.1" in msg and "layer3.0" in msg and "layer2.0" in msg
    name, module = resolve_target_layer(model, "layer3.0.conv2")
    assert module is model.layer3[0].conv2 and name == "layer3.0.conv2"
    with pytest.raises(ConfigError, match="not found"):
        resolve_target_layer(model, "layer3.5")


# ----------------------------------------------------------------------------- ViT

def test_timm_vit_layer_reshape_and_cams():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10).eval()
    name, layer = find_target_layer(vit)
    assert name == "blocks.11.norm1" and layer is vit.blocks[-1].norm1
    reshape = vit_reshape_transform(vit, (3, 32, 32))
    assert reshape.grid == 8 and reshape.prefix_tokens == 1
    assert tuple(reshape(torch.zeros(2, 65, 192)).shape) == (2, 192, 8, 8)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    classes = np.array([1, 2, 3, 4])
    engine = CamEngine(vit, method="gradcam", batch_size=2)
    assert engine.layer_name == "blocks.11.norm1" and "torch.fx tail" in engine.path
    got = engine.compute(x, classes)
    assert got.shape == (4, 32, 32)
    assert_nontrivial(got, at_least=0.75)
    # Independent reference: the library's own ViT reshape with an explicit 8x8 grid.
    ref = library_one_by_one(vit, layer, x, classes,
                             reshape=lambda t: library_vit_reshape(t, height=8, width=8))
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_timm_vit_with_register_tokens():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10,
                            depth=2, reg_tokens=4).eval()
    reshape = vit_reshape_transform(vit, (3, 32, 32))
    assert reshape.grid == 8 and reshape.prefix_tokens == 5
    tokens = torch.arange(2 * 69 * 3, dtype=torch.float32).reshape(2, 69, 3)
    # The first patch token (index 5) lands at grid position (0, 0).
    assert torch.equal(reshape(tokens)[:, :, 0, 0], tokens[:, 5, :])
    got = CamEngine(vit, batch_size=4).compute(torch.randn(2, 3, 32, 32), [0, 1])
    assert got.shape == (2, 32, 32) and np.isfinite(got).all()


def test_torchvision_vit_layer_and_grid():
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=2,
                                               hidden_dim=16, mlp_dim=32, num_classes=10).eval()
    name, layer = find_target_layer(vit)
    assert name == "encoder.layers.encoder_layer_1.ln_1" and layer is vit.encoder.layers[-1].ln_1
    assert vit_reshape_transform(vit, (3, 32, 32)).grid == 8
    cnn = seeded(HeResNet)
    assert layers.reshape_transform_for(cnn, cnn.layer3[0], (3, 32, 32)) is None
    with pytest.raises(ConfigError, match="not used"):
        layers.reshape_transform_for(cnn, nn.Conv2d(3, 3, 1), (3, 32, 32))


# ----------------------------------------------------------------------------- FinerCAM

def test_compute_finer_true_vs_pred(images):
    model = seeded(HeResNet)
    engine = CamEngine(model, batch_size=2)
    true = np.array([1, 2, 3, 4, 5])
    pred = np.array([6, 7, 3, 8, 0])   # image 2 is "correct": compared with its nearest classes instead
    got = engine.compute_finer(images, true, pred)
    assert got.shape == (5, 32, 32) and got.dtype == np.float32
    assert got.min() >= 0 and got.max() <= 1
    plain = engine.compute(images, true)
    assert np.abs(got - plain).max() > 0.05
    for i in (0, 1, 2):
        cam = FinerCAM(model, [model.layer3[-1]])
        if true[i] != pred[i]:
            ref = cam(images[i:i + 1], targets=[FinerWeightedTarget(int(true[i]), [int(pred[i])], 1)])
        else:
            ref = cam(images[i:i + 1], targets=None, target_idx=int(true[i]))
        cam.base_cam.activations_and_grads.release()
        np.testing.assert_allclose(got[i], ref[0], atol=1e-5)
    assert got[2].max() == pytest.approx(1.0, abs=1e-5)   # not the all-zero map of logit_t - logit_t
    # GAP -> Linear head: computed from the logits' gradients (no backward pass), after a check against the
    # library that covers both comparisons; the maps above equal pytorch-grad-cam's FinerCAM all the same.
    assert engine._finer_fast and engine.finer_fast_max_diff <= cams.FAST_PATH_TOLERANCE
    library = CamEngine(model, batch_size=2, fast_path=False).compute_finer(images, true, pred)
    np.testing.assert_allclose(got, library, atol=1e-5)


def test_compute_finer_on_a_non_gap_head_runs_the_tail_or_else_the_library(images):
    """A non-GAP head: FinerCAM through the torch.fx tail once it matched the library, or the library itself
    (fast_path=False); both equal pytorch-grad-cam's FinerCAM."""
    model = seeded(vgg_mlp)
    true, pred = np.array([1, 2, 3, 4, 5]), np.array([6, 7, 3, 8, 0])
    cam = FinerCAM(model, [CamEngine(model).layer])
    ref = cam(images[:1], targets=[FinerWeightedTarget(1, [6], 1)])
    cam.base_cam.activations_and_grads.release()
    for fast_path, kind in ((True, "tail"), (False, "library")):
        engine = CamEngine(model, batch_size=2, fast_path=fast_path)
        got = engine.compute_finer(images, true, pred)
        assert engine.cam_path.kind == kind and engine._finer_fast == fast_path
        assert (engine.finer_fast_max_diff is None) == (not fast_path)
        np.testing.assert_allclose(got[0], ref[0], atol=1e-5)


def test_gradcam_from_logit_gradients_is_gradcam_for_one_hot_gradients(images, targets):
    model = seeded(HeResNet)
    engine = CamEngine(model)
    store = {}
    handle = engine.layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    with torch.no_grad():
        model(images)
    handle.remove()
    onehot = np.eye(10, dtype=np.float32)[np.asarray(targets)]
    weight = engine._linear.weight.detach()
    np.testing.assert_allclose(cams.gradcam_from_logit_gradients(store["a"], weight, onehot, (32, 32)),
                               cams.gradcam_from_activations(store["a"], weight, targets, (32, 32)), atol=1e-6)
    with pytest.raises(ConfigError, match="shapes do not fit"):
        cams.gradcam_from_logit_gradients(store["a"], weight, onehot[:, :5], (32, 32))


# ----------------------------------------------------------------------------- overlay / colours

def test_overlay_is_rgb_with_red_for_high_cam():
    gray = np.full((32, 32, 1), 128, np.uint8)
    cam = np.zeros((32, 32), np.float32)
    cam[:8, :8] = 1.0
    out = overlay(gray, cam)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    hot, cold = out[2, 2].astype(int), out[20, 20].astype(int)
    assert hot[0] > hot[2] + 40      # red channel first: RGB, not BGR
    assert cold[2] > cold[0] + 40    # low CAM is blue
    assert overlay(np.zeros((32, 32, 3), np.uint8), cam, image_weight=0.3).shape == (32, 32, 3)
    with pytest.raises(ConfigError):
        overlay(np.zeros((32, 32, 4), np.uint8), cam)


def test_overlay_many_is_bit_identical_to_show_cam_on_image():
    """The galleries' vectorised overlays against pytorch-grad-cam's own show_cam_on_image, image by image:
    colour and grey uint8 images, float images on both scales, NaN and out-of-range CAM values, a CAM at
    a lower resolution (resized), and a non-default image weight."""
    import cv2
    from pytorch_grad_cam.utils.image import show_cam_on_image

    from helpers.plots.overlay import overlay_many
    rng = np.random.default_rng(3)
    colour = list(rng.integers(0, 256, (5, 16, 12, 3), dtype=np.uint8))
    grey = list(rng.integers(0, 256, (3, 16, 12, 1), dtype=np.uint8))
    floats = [rng.random((16, 12, 3)).astype(np.float32), 255 * rng.random((16, 12, 3)).astype(np.float32)]
    cams_ = [rng.random((16, 12)).astype(np.float32) * 1.4 - 0.2 for _ in range(5)]
    cams_[1][0, 0] = np.nan
    for images in (colour, grey, floats):
        maps = cams_[:len(images)]
        for weight in (0.5, 0.3):
            got = overlay_many(images, maps, image_weight=weight)
            assert got.shape == (len(images), 16, 12, 3) and got.dtype == np.uint8
            for k, (img, cam) in enumerate(zip(images, maps)):
                rgb = np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img
                rgb = rgb.astype(np.float32) / (255.0 if rgb.dtype == np.uint8 or rgb.max() > 1 else 1.0)
                mask = np.clip(np.nan_to_num(cam), 0, 1)
                ref = show_cam_on_image(rgb, mask, use_rgb=True, image_weight=weight)
                assert np.array_equal(got[k], ref), (k, weight)
                assert np.array_equal(got[k], overlay(img, cam, image_weight=weight))
    small = [rng.random((4, 3)).astype(np.float32) for _ in range(2)]
    got = overlay_many(colour[:2], small)
    for k in range(2):
        ref = show_cam_on_image(colour[k].astype(np.float32) / 255, cv2.resize(small[k], (12, 16)), use_rgb=True)
        assert np.array_equal(got[k], ref)
    assert overlay_many([], []).shape[0] == 0
    with pytest.raises(ConfigError, match="one CAM per image"):
        overlay_many(colour[:2], cams_[:1])


def test_cam_colormap_rgb_matches_overlay_colours():
    colours = cam_colormap_rgb(np.array([0.0, 1.0]))
    assert colours.shape == (2, 3)
    assert colours[0, 2] > 0.4 and colours[0, 0] < 0.1   # blue
    assert colours[1, 0] > 0.4 and colours[1, 2] < 0.1   # red
    # A pure-colour overlay (image_weight=0) of a constant CAM is that colour, rescaled to max 255.
    rgb = overlay(np.zeros((4, 4, 3), np.uint8), np.full((4, 4), 1.0), image_weight=0.0)[0, 0] / 255.0
    np.testing.assert_allclose(rgb, colours[1] / colours[1].max(), atol=1 / 255)


# ----------------------------------------------------------------------------- faithfulness

class PatchDetector(nn.Module):
    """Class 0 logit = 40 * mean of the top-left 16x16 quarter; class 1 logit = 0."""

    def forward(self, x):
        s = 40 * x[:, 0, :16, :16].mean(dim=(1, 2))
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def _blob(cy: float, cx: float) -> np.ndarray:
    yy, xx = np.mgrid[:32, :32]
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 50.0).astype(np.float32)


def test_faithfulness_sign_convention():
    x = torch.zeros(2, 1, 32, 32)
    x[:, :, 2:10, 2:10] = 1.0                    # the evidence: a bright patch in the top-left quarter
    on, off = _blob(5.5, 5.5), _blob(27, 27)     # CAM on the patch, CAM on empty background
    maps = np.stack([on, off])
    road = faithfulness(PatchDetector(), x, [0, 0], maps, metric="road")
    assert road.shape == (2,) and np.isfinite(road).all()
    assert road[0] < -0.3 and abs(road[1]) < 0.05   # removing the true evidence drops confidence
    keep = faithfulness(PatchDetector(), x, [0, 0], np.stack([on / on.max(), off]), metric="confidence_change")
    assert keep[1] < -0.3 and keep[1] < keep[0]     # keeping only the background loses the evidence
    with pytest.raises(ConfigError, match="road"):
        faithfulness(PatchDetector(), x, [0, 0], maps, metric="nope")


@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")
def test_faithfulness_equals_library_road(images, targets):
    model = seeded(HeResNet)
    maps = CamEngine(model).compute(images, targets)
    got = faithfulness(model, images, targets, maps, seed=3)
    torch.manual_seed(3)
    ref = ROADMostRelevantFirst(percentile=80)(images, maps, [ClassifierOutputSoftmaxTarget(int(t)) for t in targets],
                                               model)
    assert got.shape == (5,) and np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, atol=1e-6)
    # Target objects, as pytorch-grad-cam takes them, give the same scores as the class ids.
    as_targets = faithfulness(model, images, [ClassifierOutputSoftmaxTarget(int(t)) for t in targets], maps, seed=3)
    np.testing.assert_array_equal(as_targets, got)
    # With p(target) on the originals given (as the analysis passes them from its inference pass), the
    # library only scores the perturbed images, and the result is the same.
    with torch.no_grad():
        before = torch.softmax(model(images), dim=1)[torch.arange(5), torch.as_tensor(targets)].numpy()
    np.testing.assert_allclose(faithfulness(model, images, targets, maps, seed=3, scores_before=before), ref, atol=1e-6)
    shifted = faithfulness(model, images, targets, maps, seed=3, scores_before=before + 0.25)
    np.testing.assert_allclose(shifted, ref - 0.25, atol=1e-6)   # the given scores really are the ones used
    with pytest.raises(ConfigError, match="one finite score per image"):
        faithfulness(model, images, targets, maps, scores_before=before[:4])


def test_saved_bytes_per_image_counts_what_autograd_keeps():
    # A conv saves its input (3 x 16 x 16 floats) and its weight (once per call: not per image); a ReLU its output.
    assert layers.saved_bytes_per_image(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)), (3, 16, 16)) == 3 * 256 * 4
    relu = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    assert layers.saved_bytes_per_image(relu, (3, 16, 16)) == (3 + 4) * 256 * 4


def test_library_batches_hold_no_more_than_the_memory_budget(images, monkeypatch):
    model = seeded(vgg_mlp)
    per_image = layers.saved_bytes_per_image(model, (3, 32, 32))
    assert CamEngine(model, batch_size=64, fast_path=False).batch_size == 64   # 1 GiB holds 64 such images
    monkeypatch.setattr(cams, "LIBRARY_BATCH_BYTES", 2 * per_image)
    engine = CamEngine(model, batch_size=64, fast_path=False)
    assert engine.cam_path.kind == "library" and engine.batch_size == 2
    got = engine.compute(images, [1, 2, 3, 4, 5])   # 3 batches of at most 2
    cam = GradCAM(model, [engine.layer])
    ref = cam(images, targets=[ClassifierOutputTarget(c) for c in (1, 2, 3, 4, 5)])
    cam.activations_and_grads.release()
    np.testing.assert_allclose(got, ref, atol=1e-5)
