"""Image folders are decoded when read and streamed through a DataLoader: the same images, logits, features and
gallery activations as the in-memory path, with nothing of the whole set held; the model's pretrained config gives
the input size and normalisation; mixed precision stays within a stated tolerance of float32."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from helpers.data.datasets import load_dataset, model_normalisation
from helpers.data.images import FileImages
from helpers.data.synthetic import write_fake_imagefolder
from helpers.errors import DataError
from helpers.model.cam_store import GalleryActivations
from helpers.model.inference import StreamedInputs, model_inputs, run_inference, to_tensor


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_fake_imagefolder(tmp_path_factory.mktemp("streamed") / "if", classes=4, n_per_class=9, size=40)


def _pil_reference(ds) -> np.ndarray:
    """Every image decoded by Pillow directly: the independent reference for what FileImages returns."""
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in ds.images.paths])


def test_file_images_index_like_the_array(folder):
    ds = load_dataset("imagefolder", root=folder)
    assert isinstance(ds.images, FileImages) and ds.images.shape == (36, 40, 40, 3) and len(ds.images) == 36
    ref = _pil_reference(ds)
    imgs = ds.images
    assert np.array_equal(imgs[5], ref[5]) and np.array_equal(imgs[-1], ref[-1])
    assert np.array_equal(imgs[3:11:2], ref[3:11:2]) and np.array_equal(imgs[[7, 2, 7]], ref[[7, 2, 7]])
    mask = ds.labels == 2
    assert np.array_equal(imgs[mask], ref[mask]) and np.array_equal(imgs[np.array([1, 30])], ref[[1, 30]])
    assert np.array_equal(np.asarray(imgs), ref) and np.array_equal(imgs[4][10:20, 5], ref[4][10:20, 5])
    assert np.array_equal(np.stack(list(imgs)), ref)
    with pytest.raises(IndexError):
        imgs[36]
    with pytest.raises(IndexError):
        imgs[np.ones(3, bool)]
    # what a DataLoader worker receives: the paths, not the decoded images
    clone = pickle.loads(pickle.dumps(imgs))
    assert clone.paths == imgs.paths and np.array_equal(clone[9], ref[9])
    assert len(pickle.dumps(imgs)) < sum(len(p) + 16 for p in imgs.paths) + 200   # no pixels


def test_gray_conversion_and_resize_match_pillow(folder):
    ds = load_dataset("imagefolder", root=folder, image_size=[24, 30], convert_channels="gray")
    assert ds.images.shape == (36, 24, 30, 1)
    ref = np.asarray(Image.open(ds.images.paths[3]).convert("RGB").convert("L").resize((30, 24), Image.Resampling.BILINEAR))
    assert np.array_equal(ds.images[3][..., 0], ref)
    assert "24x30" in ds.input_note and "gray" in ds.input_note


def test_fingerprint_follows_the_files(folder, tmp_path):
    copy = write_fake_imagefolder(tmp_path / "if", classes=4, n_per_class=9, size=40)
    a = load_dataset("imagefolder", root=copy).fingerprint
    assert load_dataset("imagefolder", root=copy).fingerprint == a
    assert load_dataset("imagefolder", root=copy, image_size=32).fingerprint != a
    path = next((copy / "class_1").iterdir())
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(path)
    assert load_dataset("imagefolder", root=copy).fingerprint != a


@pytest.mark.parametrize("workers", [0, 1])
def test_streamed_pass_equals_the_in_memory_pass(folder, workers):
    ds = load_dataset("imagefolder", root=folder)
    streamed = model_inputs(ds.images, ds.mean, ds.std)
    full = to_tensor(np.asarray(ds.images), ds.mean, ds.std)
    assert isinstance(streamed, StreamedInputs) and streamed.shape == full.shape
    assert torch.equal(streamed[[3, 5]], full[[3, 5]]) and torch.equal(streamed[torch.tensor([8])], full[[8]])
    assert torch.equal(streamed[2:9], full[2:9]) and torch.equal(streamed[7], full[7])
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    ref_gallery = GalleryActivations(model.layer4, 2, 1)
    ref = run_inference(model, full, ds.labels, batch_size=10, progress=False, gallery=ref_gallery)
    gallery = GalleryActivations(model.layer4, 2, 1)
    out = run_inference(model, streamed, ds.labels, batch_size=10, progress=False, gallery=gallery, workers=workers)
    assert np.array_equal(out.logits, ref.logits) and np.array_equal(out.features, ref.features)
    kept = sorted(i for i in range(len(ds.labels)) if i in ref_gallery)
    assert kept and kept == sorted(i for i in range(len(ds.labels)) if i in gallery)
    assert torch.equal(gallery.stack(kept), ref_gallery.stack(kept))


@pytest.mark.parametrize("workers", [0, 1])
def test_a_damaged_file_is_named_by_the_streamed_pass(folder, tmp_path, workers):
    copy = write_fake_imagefolder(tmp_path / "if", classes=2, n_per_class=8, size=40)
    bad = sorted((copy / "class_1").iterdir())[3]
    bad.write_bytes(bad.read_bytes()[:120])   # a valid header, truncated data
    ds = load_dataset("imagefolder", root=copy)   # headers only: loading succeeds
    with pytest.raises(DataError) as err:
        run_inference(torchvision.models.resnet18(num_classes=2).eval(), model_inputs(ds.images, ds.mean, ds.std),
                      ds.labels, batch_size=4, progress=False, workers=workers)
    assert str(bad) in str(err.value) and "Delete or replace it" in str(err.value)


def test_pretrained_config_gives_size_and_normalisation(folder):
    import timm
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=48)
    assert model_normalisation(vit)[:2] == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    ds = load_dataset("imagefolder", root=folder, model=vit)
    assert ds.images.shape[1:3] == (48, 48) and ds.mean == (0.5, 0.5, 0.5)   # as built (img_size), not the config's 224
    assert "pretrained config" in ds.input_note and "48x48" in ds.resize_note
    from types import SimpleNamespace
    tv = SimpleNamespace(inner=torchvision.models.resnet18(weights=None), arch="torchvision:resnet18")
    weights = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    assert model_normalisation(tv)[:2] == (tuple(weights.mean), tuple(weights.std))
    ds = load_dataset("imagefolder", root=folder, model=tv)
    assert ds.images.shape[1:3] == (224, 224) and "torchvision" in ds.input_note
    given = load_dataset("imagefolder", root=folder, model=tv, image_size=40, mean=[0.1] * 3, std=[0.2] * 3)
    assert given.images.shape[1:3] == (40, 40) and given.mean == (0.1,) * 3 and "MEAN/STD" in given.input_note


def test_mixed_precision_within_tolerance_of_float32(folder):
    """bfloat16 autocast (the CPU's mixed precision; CUDA uses float16, 3 more mantissa bits): the same
    predictions, probabilities within 0.02 and the gallery CAMs' activations within 2% of their range."""
    ds = load_dataset("imagefolder", root=folder)
    x = to_tensor(np.asarray(ds.images), ds.mean, ds.std)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    g32, g16 = GalleryActivations(model.layer4, 2, 1), GalleryActivations(model.layer4, 2, 1)
    a = run_inference(model, x, ds.labels, batch_size=12, progress=False, gallery=g32)
    b = run_inference(model, x, ds.labels, batch_size=12, progress=False, gallery=g16, autocast_dtype=torch.bfloat16)
    assert (a.preds == b.preds).mean() >= 0.97 and np.abs(a.probs - b.probs).max() < 0.02
    kept = sorted(set(i for i in range(len(x)) if i in g32) & set(i for i in range(len(x)) if i in g16))
    m32, m16 = g32.stack(kept), g16.stack(kept)
    assert m16.dtype == torch.float32 and (m32 - m16).abs().max() <= 0.02 * (m32.max() - m32.min())
