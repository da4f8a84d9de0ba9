"""The CUDA path, where a CUDA device exists (skipped elsewhere; the CPU tests cover every step): the inference
pass under float16 autocast with pinned, non-blocking batches, CAMs on the GPU, and a whole analysis on
DEVICE='cuda', each against the float32 CPU run within the tolerances the README states."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from conftest import run_params

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device here: the CUDA path is tested where one is")


@pytest.fixture(autouse=True)
def no_tf32():
    """cuDNN's TF32 convolutions (on by default) round to 10 mantissa bits: not what a float32 comparison means."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from helpers.data.synthetic import write_fake_imagefolder
    return write_fake_imagefolder(tmp_path_factory.mktemp("cuda") / "if", classes=4, n_per_class=12, size=64)


def _model():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=4).eval()


def test_float16_autocast_on_streamed_batches_is_within_tolerance_of_the_cpu(folder):
    """Image-folder batches come from pinned memory to the GPU (non-blocking); under the default MIXED_PRECISION
    the pass runs in float16 and keeps float32 logits, features and gallery activations: at least 97% identical
    predictions, probabilities within 0.02 and activations within 2% of their range of the float32 CPU pass."""
    from helpers.data.datasets import load_dataset
    from helpers.model.cam_store import GalleryActivations
    from helpers.model.inference import StreamedInputs, autocast_dtype, run_inference
    ds = load_dataset("imagefolder", root=folder)
    x = StreamedInputs(ds.images, ds.mean, ds.std)
    cuda = torch.device("cuda")
    assert autocast_dtype(cuda, None) == torch.float16 and autocast_dtype(cuda, False) is None
    cpu_model, gpu_model = _model(), _model().to(cuda)
    g32, g16 = GalleryActivations(cpu_model.layer4, 2, 1), GalleryActivations(gpu_model.layer4, 2, 1)
    a = run_inference(cpu_model, x, ds.labels, batch_size=16, progress=False, gallery=g32, workers=0)
    b = run_inference(gpu_model, x, ds.labels, batch_size=16, device=cuda, progress=False, gallery=g16,
                      autocast_dtype=torch.float16, workers=2)
    assert b.logits.dtype == np.float32 and b.features.dtype == np.float32
    assert (a.preds == b.preds).mean() >= 0.97 and np.abs(a.probs - b.probs).max() < 0.02
    np.testing.assert_allclose(b.features, a.features, atol=0.02 * float(np.ptp(a.features)))
    kept = sorted(set(i for i in range(len(x)) if i in g32) & set(i for i in range(len(x)) if i in g16))
    assert kept
    m32, m16 = g32.stack(kept).cpu(), g16.stack(kept).cpu()
    assert m16.dtype == torch.float32 and (m32 - m16).abs().max() <= 0.02 * (m32.max() - m32.min())


def test_cams_on_the_gpu_equal_pytorch_grad_cam_there_and_the_cpus(folder):
    """The fast exact Grad-CAM on CUDA equals pytorch-grad-cam's GradCAM run on CUDA, and the CPU's maps."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from helpers.data.datasets import load_dataset
    from helpers.model.cams import CamEngine
    from helpers.model.inference import to_tensor
    ds = load_dataset("imagefolder", root=folder)
    x = to_tensor(np.asarray(ds.images[:8]), ds.mean, ds.std)
    targets = np.arange(8) % 4
    gpu_model = _model().cuda()
    gpu = CamEngine(gpu_model, input_shape=tuple(x.shape[1:]), batch_size=8, device="cuda")
    cpu = CamEngine(_model(), input_shape=tuple(x.shape[1:]), batch_size=8, device="cpu")
    got = gpu.compute(x, targets, progress=False)
    assert gpu.fast and got.shape == (8, 64, 64)
    with GradCAM(model=gpu_model, target_layers=[gpu_model.layer4[-1]]) as cam:
        ref = cam(input_tensor=x.cuda(), targets=[ClassifierOutputTarget(int(c)) for c in targets])
    np.testing.assert_allclose(got, ref, atol=1e-4)
    np.testing.assert_allclose(got, cpu.compute(x, targets, progress=False), atol=1e-3)


def test_a_whole_analysis_on_cuda_matches_the_cpu_run(cifar_root, tiny_checkpoint, tmp_path):
    """Analysis(DEVICE='cuda').run_all() writes the outputs the CPU run writes, its predictions within the
    float16 tolerance, and its summary says the pass ran under float16 autocast."""
    from helpers.pipeline import Analysis
    runs = {}
    for device in ("cpu", "cuda"):
        an = Analysis(run_params(cifar_root, tiny_checkpoint, tmp_path / device, DEVICE=device, N_PAIR_GALLERIES=2),
                      progress=False)
        an.run_all()
        runs[device] = an
    cpu, gpu = runs["cpu"], runs["cuda"]
    assert gpu.device.type == "cuda"
    assert (cpu.preds.preds == gpu.preds.preds).mean() >= 0.97
    assert np.abs(cpu.preds.probs - gpu.preds.probs).max() < 0.02
    for name in ("index.html", "confusion_matrix_full.png", "per_class_accuracy.csv", "most_confused_pairs.csv",
                 "recommendations.txt", "deep_dive/diagnosis.csv"):
        assert (tmp_path / "cuda" / name).stat().st_size > 0 and (tmp_path / "cpu" / name).exists()
    with Image.open(tmp_path / "cuda" / "confusion_matrix_full.png") as a, \
            Image.open(tmp_path / "cpu" / "confusion_matrix_full.png") as b:
        assert a.size == b.size
    summary = (tmp_path / "cuda" / "analysis_summary.txt").read_text()
    assert "float16 autocast in the inference pass" in summary
    assert "float16 autocast" not in (tmp_path / "cpu" / "analysis_summary.txt").read_text()
