"""Swin (windowed-attention transformers, timm and torchvision): the automatic CAM layer (the last block's norm2),
the reshape of its channels-last maps or flattened tokens to (B, C, H, W), CAMs equal to pytorch-grad-cam's
GradCAM called directly, and the whole analysis on a timm Swin-T. Random weights throughout (pretrained=False)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from helpers.data.synthetic import write_fake_imagefolder
from helpers.errors import ConfigError
from helpers.model import layers
from helpers.model.cams import CamEngine
from helpers.pipeline import Analysis

from conftest import run_params
from output_checks import check_outputs

timm = pytest.importorskip("timm")

SWIN_ARCH = "timm:swin_tiny_patch4_window7_224"
# Swin-T's code and stage layout (two blocks per stage, the second shifted) at 64 px: 2-px patches, 4x4 windows,
# narrow, so that the end-to-end run stays short; the last stage's grid is 4x4.
SWIN_KWARGS = {"img_size": 64, "patch_size": 2, "window_size": 4, "embed_dim": 24, "depths": (2, 2, 2, 2)}
SIZE = 64


def small_timm_swin(num_classes: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=num_classes,
                             **SWIN_KWARGS).eval()


def small_torchvision_swin(num_classes: int = 4) -> torch.nn.Module:
    """torchvision's Swin code (swin_t's V1 blocks) in a narrow configuration; its head is initialised to zeros,
    which would make every CAM flat, hence the normal init."""
    from torchvision.models.swin_transformer import SwinTransformer
    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[2, 2], embed_dim=24, depths=[2, 2, 2, 2], num_heads=[3, 6, 12, 24],
                            window_size=[4, 4], num_classes=num_classes)
    torch.nn.init.normal_(model.head.weight, std=0.1)
    return model.eval()


def tokens_to_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """pytorch-grad-cam's documented Swin reshape (its swinT example): (B, H*W, C) -> (B, C, H, W)."""
    result = tokens.reshape(tokens.size(0), height, width, tokens.size(2))
    return result.transpose(2, 3).transpose(1, 2)


def library_gradcam(model, layer, x: torch.Tensor, classes, reshape) -> np.ndarray:
    with GradCAM(model, [layer], reshape_transform=reshape) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes])


def non_constant_share(cams: np.ndarray) -> float:
    return float((cams.reshape(len(cams), -1).std(axis=1) > 1e-3).mean())


# ------------------------------------------------------------------------------------------- the automatic layer

def test_timm_swin_t_layer_is_the_last_blocks_norm2():
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    name, module = layers.find_target_layer(model, (3, 224, 224))
    assert name == "layers.3.blocks.1.norm2" and module is model.layers[-1].blocks[-1].norm2
    # The widget's choices: the last block of each stage, late (7x7) to early (56x56).
    assert layers.target_layer_choices(model, (3, 224, 224)) == [
        "layers.3.blocks.1.norm2", "layers.2.blocks.5.norm2", "layers.1.blocks.1.norm2", "layers.0.blocks.1.norm2"]


def test_torchvision_swin_t_layer_is_the_last_blocks_norm2():
    from torchvision.models import swin_t
    model = swin_t(weights=None)
    name, module = layers.find_target_layer(model, (3, 224, 224))
    assert name == "features.7.1.norm2" and module is model.features[-1][-1].norm2
    assert layers.target_layer_choices(model, (3, 224, 224))[:2] == ["features.7.1.norm2", "features.5.5.norm2"]


def test_vit_whose_attention_has_a_window_size_stays_a_vit():
    """BEiT's attention carries `window_size` (for its relative position bias) but it is a plain ViT: its block's
    norm1 and the CLS-dropping token reshape, as before."""
    vit = timm.create_model("beit_base_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=4,
                            embed_dim=48, num_heads=3).eval()
    name, layer = layers.find_target_layer(vit, (3, 32, 32))
    assert name == "blocks.1.norm1"
    reshape = layers.reshape_transform_for(vit, layer, (3, 32, 32))
    assert reshape.grid == 8 and reshape.prefix_tokens == 1


# ------------------------------------------------------------------------------------------------------ reshape

def test_timm_norm2_tokens_become_the_blocks_grid():
    model = small_timm_swin()
    name, layer = layers.find_target_layer(model, (3, SIZE, SIZE))
    reshape = layers.reshape_transform_for(model, layer, (3, SIZE, SIZE))
    assert reshape.grid == (4, 4)
    tokens = torch.randn(2, 16, 192)
    np.testing.assert_array_equal(reshape(tokens).numpy(), tokens_to_map(tokens, 4, 4).numpy())
    # Other layers: channels-last stages and final norm are permuted, the patch convolution is left alone.
    stage = layers.reshape_transform_for(model, model.layers[2], (3, SIZE, SIZE))
    hwc = torch.randn(2, 8, 8, 96)
    np.testing.assert_array_equal(stage(hwc).numpy(), hwc.numpy().transpose(0, 3, 1, 2))
    assert layers.reshape_transform_for(model, model.norm, (3, SIZE, SIZE)).grid == (4, 4)
    assert layers.reshape_transform_for(model, model.patch_embed.proj, (3, SIZE, SIZE)) is None
    with pytest.raises(ConfigError, match="neither a channels-last"):   # window tokens, not the grid
        layers.reshape_transform_for(model, model.layers[2].blocks[1].attn, (3, SIZE, SIZE))


def test_torchvision_layers_are_channels_last_but_the_patch_convolution():
    model = small_torchvision_swin()
    assert layers.find_target_layer(model, (3, SIZE, SIZE))[0] == "features.7.1.norm2"
    reshape = layers.reshape_transform_for(model, model.features[-1][-1].norm2, (3, SIZE, SIZE))
    assert reshape.grid == (4, 4)
    assert layers.reshape_transform_for(model, model.features[0][0], (3, SIZE, SIZE)) is None


# ----------------------------------------------------------------------------- CAMs against pytorch-grad-cam

def test_torchvision_swin_gradcam_equals_pytorch_grad_cam():
    model = small_torchvision_swin()
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    classes = [0, 1, 2, 3]
    engine = CamEngine(model, "gradcam", None, (3, SIZE, SIZE), batch_size=4)
    assert engine.layer_name == "features.7.1.norm2"
    cams = engine.compute(x, classes, progress=False)
    reference = library_gradcam(model, model.features[-1][-1].norm2, x, classes, lambda t: t.permute(0, 3, 1, 2))
    assert cams.shape == (4, SIZE, SIZE) and non_constant_share(cams) == 1.0
    np.testing.assert_allclose(cams, reference, atol=1e-5)


@pytest.fixture(scope="module")
def swin_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("swin")
    write_fake_imagefolder(folder / "data", classes=4, n_per_class=6, size=SIZE, seed=0)
    torch.save(small_timm_swin().state_dict(), folder / "swin.pt")
    an = Analysis(run_params(folder / "data", folder / "swin.pt", folder / "out", arch=SWIN_ARCH,
                             MODEL_KWARGS=SWIN_KWARGS, DATASET="imagefolder", EMBEDDING="tsne"), progress=False)
    an.run_all()
    return an


def test_timm_swin_runs_the_whole_analysis(swin_run):
    check_outputs(swin_run.out, num_classes=4, n_pair_galleries=5)
    engine = swin_run.cams.engine()
    assert engine.layer_name == "layers.3.blocks.1.norm2" and engine.reshape_transform.grid == (4, 4)
    # torch.fx splits timm's Swin after the target layer (the block's B, H, W, C read again after the cut are the
    # batch size and constants), so the galleries' CAMs come from the inference pass's kept values
    assert engine.cam_path.kind == "tail" and engine.cam_path.verified
    notes = " ".join(swin_run.results["class_galleries"].notes)
    assert "(layer layers.3.blocks.1.norm2; 32 of 32 CAMs from activations kept in the inference pass)" in notes


def test_timm_swin_cams_equal_pytorch_grad_cam_and_vary(swin_run):
    idx = list(range(8))
    classes = [int(c) for c in swin_run.preds.preds[:8]]
    cams = swin_run.cams.get(idx, classes)
    assert cams.shape == (8, SIZE, SIZE) and cams.dtype == np.float32
    assert np.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1
    assert non_constant_share(cams) >= 0.75
    model = swin_run.loaded.inner
    reference = library_gradcam(model, model.layers[-1].blocks[-1].norm2, swin_run.inputs[:8].clone(), classes,
                                lambda t: tokens_to_map(t, 4, 4))
    np.testing.assert_allclose(cams, reference, atol=1e-5)
