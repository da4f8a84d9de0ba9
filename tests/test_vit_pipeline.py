"""Other kinds of model through the whole analysis: vision transformers (timm and torchvision-style) and
models whose forward returns a HuggingFace-style ModelOutput, a tuple or a dict, loaded from a user's
model.py with ARCH="model.py:Class"."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from helpers.config import Params
from helpers.pipeline import Analysis
from helpers.data.synthetic import write_cifar10

from conftest import run_params

from output_checks import check_outputs

VIT_ARCH = "timm:vit_tiny_patch16_224"
VIT_KWARGS = {"img_size": 32, "patch_size": 4, "depth": 2}   # 2 of 12 blocks, 8x8 patches of 4 px


def vit_params(data_root, model_path, arch, out, **kw) -> Params:
    return run_params(data_root, model_path, out, arch=arch, **{"EMBEDDING": "tsne", **kw})


def non_constant_share(cams: np.ndarray) -> float:
    return float((cams.reshape(len(cams), -1).std(axis=1) > 1e-3).mean())


def token_gradcam(model, layer, x, classes, grid: int) -> np.ndarray:
    """Grad-CAM written out for a ViT, independently of helpers/model/cams.py and pytorch-grad-cam: patch tokens of
    `layer`'s output (the CLS token dropped) as a grid x grid map, channel weights = the mean gradient,
    ReLU, bilinear upsampling to the input size and per-image min-max."""
    store = {}

    def hook(module, inputs, output):
        output.retain_grad()
        store["a"] = output

    handle = layer.register_forward_hook(hook)
    try:
        logits = model(x)
        logits[torch.arange(len(x)), torch.as_tensor(classes)].sum().backward()
    finally:
        handle.remove()
    act, grad = store["a"][:, 1:, :], store["a"].grad[:, 1:, :]           # (N, grid*grid, D)
    cam = torch.relu((act * grad.mean(dim=1, keepdim=True)).sum(dim=2))  # (N, grid*grid)
    cam = cam.reshape(-1, 1, grid, grid).detach()
    import cv2
    out = []
    for c in cam[:, 0].numpy():
        c = cv2.resize(c, tuple(x.shape[-2:][::-1]))
        c = np.maximum(c, 0)
        c = (c - c.min()) / (1e-7 + c.max() - c.min())
        out.append(c)
    return np.stack(out).astype(np.float32)


@pytest.fixture(scope="module")
def vit_run(cifar_root, tmp_path_factory):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=100, **VIT_KWARGS).eval()
    folder = tmp_path_factory.mktemp("vit")
    torch.save(vit.state_dict(), folder / "vit.pt")
    an = Analysis(vit_params(cifar_root, folder / "vit.pt", VIT_ARCH, folder / "out", MODEL_KWARGS=VIT_KWARGS,
                             LIMIT=200), progress=False)
    an.run_all()
    return an


def test_timm_vit_runs_the_whole_analysis(vit_run):
    check_outputs(vit_run.out, num_classes=100, n_pair_galleries=5)
    engine = vit_run.cams.engine()
    assert engine.layer_name == "blocks.1.norm1"                     # the last block's norm1, found automatically
    assert engine.reshape_transform.grid == 8 and engine.reshape_transform.prefix_tokens == 1
    assert "(layer blocks.1.norm1" in " ".join(vit_run.results["class_galleries"].notes)


def test_timm_vit_cams_have_the_image_size_and_vary(vit_run):
    idx = list(range(40))
    classes = [int(c) for c in vit_run.preds.preds[:40]]
    cams = vit_run.cams.get(idx, classes)
    assert cams.shape == (40, 32, 32) and cams.dtype == np.float32
    assert np.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1
    assert non_constant_share(cams) >= 0.9
    # The same maps from an independent implementation of Grad-CAM on tokens.
    model = vit_run.loaded.inner
    reference = token_gradcam(model, model.blocks[-1].norm1, vit_run.inputs[:8].clone(), classes[:8], grid=8)
    np.testing.assert_allclose(cams[:8], reference, atol=2e-3)


TORCHVISION_VIT = '''
from torchvision.models.vision_transformer import VisionTransformer


class SmallViT(VisionTransformer):
    """torchvision's ViT-B/16 code with a CIFAR-sized configuration."""

    def __init__(self, num_classes=100):
        super().__init__(image_size=32, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                         num_classes=num_classes)
'''


def test_torchvision_vit_galleries(cifar_root, tmp_path):
    (tmp_path / "tv_vit.py").write_text(TORCHVISION_VIT)
    arch = f"{tmp_path / 'tv_vit.py'}:SmallViT"
    from helpers.model.load import build_model
    torch.manual_seed(0)
    vit = build_model(arch, num_classes=100)
    torch.nn.init.normal_(vit.heads.head.weight, std=0.1)  # torchvision initialises the head to zeros: flat CAMs
    torch.save(vit.state_dict(), tmp_path / "tv_vit.pt")
    an = Analysis(vit_params(cifar_root, tmp_path / "tv_vit.pt", arch, tmp_path / "out", LIMIT=120), progress=False)
    an.load_model(); an.load_data(); an.predict()
    engine = an.cams.engine()
    assert engine.layer_name == "encoder.layers.encoder_layer_1.ln_1"   # torchvision names its blocks
    assert engine.reshape_transform.grid == 8
    cams = an.cams.get(list(range(30)), [int(c) for c in an.preds.preds[:30]])
    assert cams.shape == (30, 32, 32) and non_constant_share(cams) >= 0.9
    img = an.class_gallery(int(an.preds.labels[0]))
    assert img.width > 100 and img.height > 100


# ------------------------------------------------------------------------------------------------ wrapped outputs
WRAPPED_MODELS = '''
from collections import OrderedDict

import torch
from torch import nn


class ModelOutput(OrderedDict):
    """What HuggingFace models return: an OrderedDict whose entries are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        )
        self.head = nn.Linear(32, num_classes)

    def scores(self, x):
        features = self.body(x).mean(dim=(2, 3))
        return self.head(features), features


class HFStyleNet(Net):
    def forward(self, x):
        logits, features = self.scores(x)
        return ModelOutput(logits=logits, hidden_states=(features,))


class TupleNet(Net):
    def forward(self, x):
        return self.scores(x)


class DictNet(Net):
    def forward(self, x):
        logits, features = self.scores(x)
        return {"features": features, "logits": logits}
'''


@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("c10")
    write_cifar10(root, n_test=200, seed=2)
    return root


@pytest.mark.parametrize("cls, layer", [("HFStyleNet", None), ("TupleNet", "body.4"), ("DictNet", "body[-1]")])
def test_models_returning_model_output_tuple_or_dict(cifar10_root, tmp_path, cls, layer):
    file = tmp_path / "model.py"
    file.write_text(WRAPPED_MODELS)
    from helpers.model.load import build_model
    torch.manual_seed(0)
    net = build_model(f"{file}:{cls}", num_classes=10).eval()
    torch.save(net.state_dict(), tmp_path / "net.pt")
    an = Analysis(vit_params(cifar10_root, tmp_path / "net.pt", f"{file}:{cls}", tmp_path / "out",
                             DATASET="cifar10", TARGET_LAYER=layer), progress=False)
    an.run_all()
    check_outputs(an.out, num_classes=10, n_pair_galleries=5)
    # The logits are the ones the model computes, whatever it wraps them in.
    with torch.no_grad():
        expected = net.scores(an.inputs[:16])[0].numpy()
    np.testing.assert_allclose(an.preds.logits[:16], expected, rtol=1e-4, atol=1e-5)
    engine = an.cams.engine()
    wanted = {None: "body.5", "body.4": "body.4", "body[-1]": "body.5"}[layer]
    assert engine.layer_name.endswith(wanted)
    assert f"(layer {engine.layer_name}" in " ".join(an.results["class_galleries"].notes)
    cams = an.cams.get(list(range(20)), [int(c) for c in an.preds.preds[:20]])
    assert cams.shape == (20, 32, 32) and non_constant_share(cams) >= 0.9
