"""Models that misbehave are told apart (issue section 7), through the entry point the user calls (`Analysis`):
a forward that ends in softmax (handled: its log is used, ECE is the model's own, the report says so), one whose
output depends on the batch, is random, or switches itself to train mode (refused before any figure), and
float16/bfloat16 models (they run, with CAMs, and the report names the dtype)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.compute.metrics import expected_calibration_error
from helpers.errors import ConfigError, NumericalError
from helpers.model.cams import CamEngine
from helpers.model.sanity import ProbabilitiesToLogits, output_kind
from helpers.pipeline import Analysis

from conftest import TINY_ARCH, run_params
from tiny_model import TinyNet

LIMIT = 64

MODEL_FILE = '''
import torch
from torch import nn
from torch.nn import functional as F


class Base(nn.Module):
    def __init__(self, num_classes=100):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def logits(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))

    def forward(self, x):
        return self.logits(x)


class Logits(Base):
    pass


class Softmax(Base):
    def forward(self, x):
        return torch.softmax(self.logits(x), 1)


class LogSoftmax(Base):
    def forward(self, x):
        return torch.log_softmax(self.logits(x), 1)


class BatchCentred(Base):
    def forward(self, x):
        return self.logits(x - x.mean(0))


class TrainsItself(Base):
    def forward(self, x):
        self.train()
        return self.logits(x)


class Random(Base):
    def forward(self, x):
        return self.logits(F.dropout(x, 0.5, training=True))


class Half(Base):
    """float16 weights, a forward that does not convert the float32 images."""

    def __init__(self, num_classes=100):
        super().__init__(num_classes)
        self.half()


class CastsToBF16(Base):
    """bfloat16 weights, a forward that converts its input itself."""

    def __init__(self, num_classes=100):
        super().__init__(num_classes)
        self.to(torch.bfloat16)

    def forward(self, x):
        return self.logits(x.to(torch.bfloat16))


class MixesDtypes(Base):
    """float32 weights, a forward that converts its input to float16."""

    def forward(self, x):
        return self.logits(x.half())


class OnlyHalfInput(Base):
    """Refuses anything but float16 input, also as a float32 copy: no dtype fix can run it."""

    def __init__(self, num_classes=100):
        super().__init__(num_classes)
        self.half()

    def forward(self, x):
        if x.dtype != torch.float16:
            raise TypeError(f"expected float16 input, got dtype {x.dtype}")
        return self.logits(x)
'''


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("behaviour") / "models.py"
    path.write_text(MODEL_FILE)
    return path


@pytest.fixture(scope="module")
def models(model_file):
    spec = importlib.util.spec_from_file_location("behaviour_models", model_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules["behaviour_models"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def base_weights(models, tmp_path_factory) -> dict:
    """One set of weights for every model class (BatchNorm statistics set away from their defaults)."""
    torch.manual_seed(0)
    net = models.Base()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        net.fc.weight.mul_(20)   # confident enough for ECE to mean something
    return net.state_dict()


def save(tmp_path: Path, state_dict: dict, name: str) -> Path:
    path = tmp_path / name
    torch.save(state_dict, path)
    return path


def analysis(cifar_root, tmp_path, model_path, arch, **kw) -> Analysis:
    params = run_params(cifar_root, model_path, tmp_path / "out", arch=arch,
                        **{"EMBEDDING": "tsne", "LIMIT": LIMIT, **kw})
    return Analysis(params, progress=False)


def no_figures(out: Path) -> None:
    assert not list(out.rglob("*.png")) and not list(out.rglob("*.csv")), "figures written despite the error"


# ------------------------------------------------------------------------------------ what the output is
def test_output_kind_tells_probabilities_from_logits_and_log_probabilities():
    torch.manual_seed(0)
    for classes in (2, 10, 100):
        z = torch.randn(8, classes) * 3
        assert output_kind(z) == "logits"
        assert output_kind(torch.softmax(z, 1)) == "probabilities"
        assert output_kind(torch.log_softmax(z, 1)) == "log-probabilities"
        assert output_kind(torch.softmax(z, 1).half()) == "probabilities" or classes > 2
    assert output_kind(torch.rand(8, 10)) == "logits"                   # in [0, 1], rows do not sum to 1
    assert output_kind(torch.full((8, 10), 0.1)) == "probabilities"     # uniform probabilities
    assert output_kind(torch.eye(10)[:8]) == "probabilities"            # one-hot outputs


def test_softmax_model_is_handled_and_its_ece_is_right(cifar_root, tmp_path, model_file, base_weights):
    path = save(tmp_path, base_weights, "w.pt")
    ref = analysis(cifar_root, tmp_path / "ref", path, f"{model_file}:Logits")
    ref.load_model(), ref.load_data()
    ref_preds = ref.predict()
    assert ref.model_check.output == "logits" and ref.model_check.note is None

    an = analysis(cifar_root, tmp_path / "soft", path, f"{model_file}:Softmax")
    an.load_model(), an.load_data()
    with pytest.warns(UserWarning, match="returns probabilities"):
        preds = an.predict()
    assert an.model_check.output == "probabilities"
    assert isinstance(an.loaded.module, ProbabilitiesToLogits)
    np.testing.assert_allclose(preds.probs, ref_preds.probs, atol=1e-5)
    np.testing.assert_array_equal(preds.preds, ref_preds.preds)
    ece, _ = expected_calibration_error(preds.probs, preds.labels)
    ref_ece, _ = expected_calibration_error(ref_preds.probs, ref_preds.labels)
    assert ref_ece > 0.05 and ece == pytest.approx(ref_ece, abs=1e-5)
    # What the bug did: softmax of probabilities as if they were logits (near-uniform, ECE about 0).
    wrong = torch.softmax(torch.as_tensor(ref_preds.probs), 1).numpy()
    assert expected_calibration_error(wrong, preds.labels)[0] < ref_ece / 2

    an.confusion(), an.class_galleries(), an.report()   # CAMs of the wrapped model; the report says so
    summary = (an.out / "analysis_summary.txt").read_text()
    assert "returns probabilities" in summary and "takes their log as logits" in summary
    assert an.cams is not None and list(an.out.rglob("*.png"))


def test_log_softmax_model_is_logits_already(cifar_root, tmp_path, model_file, base_weights):
    an = analysis(cifar_root, tmp_path, save(tmp_path, base_weights, "w.pt"), f"{model_file}:LogSoftmax")
    an.load_model(), an.load_data()
    an.predict()
    assert an.model_check.output == "log-probabilities" and an.model_check.note is None
    assert not isinstance(an.loaded.module, ProbabilitiesToLogits)
    assert "probabilities" not in an.loaded.source


# ------------------------------------------------------------------------------------ refused before figures
@pytest.mark.parametrize("cls, fragments", [
    ("BatchCentred", ["depends on the other images in its batch", "batch of 8", "x - x.mean(0)", "BATCH_SIZE",
                      "Stopping before writing misleading figures", "model.eval()"]),
    ("TrainsItself", ["puts itself in train mode", "training mode after it", "running_mean",
                      "Stopping before writing misleading figures", "Remove the .train() call", "model.eval()"]),
    ("Random", ["differs between two identical forward passes", "random", "training=self.training",
                "Stopping before writing misleading figures"]),
])
def test_misbehaving_model_is_refused_before_any_figure(cifar_root, tmp_path, model_file, base_weights, cls,
                                                        fragments):
    an = analysis(cifar_root, tmp_path, save(tmp_path, base_weights, "w.pt"), f"{model_file}:{cls}")
    with pytest.raises(NumericalError) as err:
        an.run_all()
    message = str(err.value)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"message lacks {missing}:\n{message}"
    no_figures(an.out)


def test_the_check_leaves_a_self_training_model_as_it_found_it(models, base_weights):
    from helpers.model.load import LoadedModel
    from helpers.model.sanity import check_model_behaviour
    net = models.TrainsItself().eval()
    net.load_state_dict(base_weights)
    loaded = LoadedModel(net, "TrainsItself", "test", "", 100, 3)
    with pytest.raises(NumericalError, match="running_mean"):
        check_model_behaviour(loaded, torch.randn(16, 3, 32, 32))
    assert not any(m.training for m in net.modules())
    for name, value in net.state_dict().items():
        assert torch.equal(value, base_weights[name]), name


def test_a_well_behaved_model_passes_and_the_check_is_cheap(cifar_root, tmp_path, tiny_checkpoint):
    an = analysis(cifar_root, tmp_path, tiny_checkpoint, TINY_ARCH)
    an.load_model(), an.load_data()
    before = {k: v.clone() for k, v in an.loaded.module.state_dict().items()}
    an.predict()
    check = an.model_check
    assert check.output == "logits" and check.note is None and check.dtype == torch.float32
    assert check.max_batch_diff < 1e-3
    assert check.seconds < 1.0, check   # about 5 ms for this model (one thread)
    assert all(torch.equal(v, before[k]) for k, v in an.loaded.module.state_dict().items())


# ------------------------------------------------------------------------------------ float16 / bfloat16
def _completes_with_cams(an: Analysis, dtype_name: str, everything: bool = True) -> None:
    if everything:
        an.run_all()
    else:
        an.load_data(), an.predict(), an.confusion(), an.class_galleries(), an.report()
    assert an.cams is not None and list(an.out.rglob("*.png"))
    summary = (an.out / "analysis_summary.txt").read_text()
    assert dtype_name in summary and "image size" not in summary


def test_bf16_state_dict_with_arch_loads_into_float32_and_runs(cifar_root, tmp_path, tiny_checkpoint):
    """The common path: weights saved in bfloat16 for a float32 ARCH. load_state_dict converts them (nothing to
    report); the run completes."""
    sd = torch.load(tiny_checkpoint, weights_only=True)["state_dict"]
    path = save(tmp_path, {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}, "bf.pt")
    an = analysis(cifar_root, tmp_path, path, TINY_ARCH)
    an.load_model()
    assert next(an.loaded.module.parameters()).dtype == torch.float32
    an.load_data(), an.predict(), an.confusion(), an.class_galleries()
    assert an.cams is not None and list(an.out.rglob("*.png"))


@pytest.mark.parametrize("how", ["model file", "pickled"])
def test_fp16_model_runs_in_float32_with_cams(cifar_root, tmp_path, model_file, models, base_weights, how):
    half = {k: v.half() if v.is_floating_point() else v for k, v in base_weights.items()}
    if how == "model file":
        an = analysis(cifar_root, tmp_path, save(tmp_path, half, "half.pt"), f"{model_file}:Half")
    else:   # a full pickled float16 TinyNet (ALLOW_UNSAFE_PICKLE), the other way a half model arrives
        torch.manual_seed(0)
        an = analysis(cifar_root, tmp_path, save(tmp_path, TinyNet(num_classes=100).half(), "half_full.pt"), None,
                      ALLOW_UNSAFE_PICKLE=True)
    an.load_model()
    assert next(an.loaded.module.parameters()).dtype == torch.float32
    assert "float16" in an.loaded.source and "run in float32" in an.loaded.source
    _completes_with_cams(an, "float16", everything=how == "model file")


def test_bf16_model_that_casts_its_input_runs_with_cams(cifar_root, tmp_path, model_file, base_weights):
    bf = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in base_weights.items()}
    an = analysis(cifar_root, tmp_path, save(tmp_path, bf, "bf.pt"), f"{model_file}:CastsToBF16")
    an.load_model()
    assert next(an.loaded.module.parameters()).dtype == torch.bfloat16   # its own choice: kept
    assert "bfloat16" in an.loaded.source and "converts its input itself" in an.loaded.source
    _completes_with_cams(an, "bfloat16")


@pytest.mark.parametrize("cls, fragments", [
    ("OnlyHalfInput", ["weights are float16", "fails on the float32 images, also as a float32 copy",
                       "model.float()"]),
    ("MixesDtypes", ["mixes dtypes", "weights are float32", "float16/bfloat16 tensors", "Remove the conversion"]),
])
def test_model_that_no_dtype_fix_runs_is_told_its_dtype_not_an_image_size(cifar_root, tmp_path, model_file,
                                                                         base_weights, cls, fragments):
    weights = {k: v.half() if v.is_floating_point() and cls == "OnlyHalfInput" else v for k, v in base_weights.items()}
    an = analysis(cifar_root, tmp_path, save(tmp_path, weights, "w.pt"), f"{model_file}:{cls}")
    with pytest.raises(ConfigError) as err:
        an.run_all()
    message = str(err.value)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"message lacks {missing}:\n{message}"
    assert "image size" not in message
    no_figures(an.out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cam_engine_runs_low_precision_models(models, base_weights, dtype):
    """CamEngine directly: a float16/bfloat16 model runs as a float32 copy (the fast path applies and matches the
    float32 model); one that converts its input itself keeps its dtype and its CAMs still come out."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    ref_model = models.Base().eval()
    ref_model.load_state_dict(base_weights)
    ref = CamEngine(ref_model, "gradcam").compute(x, [0, 1, 2, 3], progress=False)
    low = models.Base().eval()
    low.load_state_dict(base_weights)
    engine = CamEngine(low.to(dtype), "gradcam")
    assert engine.dtype == torch.float32 and str(dtype).replace("torch.", "") in engine.dtype_note
    cams = engine.compute(x, [0, 1, 2, 3], progress=False)
    assert np.abs(cams - ref).max() < 0.05
    casting = models.CastsToBF16().eval()
    for method in ("gradcam", "gradcam++", "eigencam"):
        engine = CamEngine(casting, method)
        assert engine.dtype == torch.bfloat16
        cams = engine.compute(x, [0, 1, 2, 3], progress=False)
        assert cams.shape == (4, 32, 32) and np.isfinite(cams).all() and cams.max() > 0


# ------------------------------------------------------------------------------------ other inputs of each kind
class _Net(torch.nn.Module):
    """A small CNN whose forward's misbehaviour is chosen by `kind`."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8, track_running_stats=kind != "bn-without-running-stats")
        self.drop = torch.nn.Dropout(0.5)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        if self.kind.startswith("train()"):
            self.train()
        h = self.conv(x)
        if self.kind == "functional-bn-training":
            h = torch.nn.functional.batch_norm(h, self.bn.running_mean, self.bn.running_var, training=True)
        elif self.kind != "train() without bn or dropout":
            h = self.bn(h)
        if self.kind == "train() with dropout only":
            h = self.drop(h)
        if self.kind == "per-batch max":
            h = h / h.abs().amax(dim=(0, 2, 3), keepdim=True)
        return self.fc(torch.relu(h).mean(dim=(2, 3)))


@pytest.mark.parametrize("kind, fragment", [
    ("bn-without-running-stats", "depends on the other images in its batch"),
    ("per-batch max", "depends on the other images in its batch"),
    ("train() with bn", "puts itself in train mode"),
    ("functional-bn-training", "puts itself in train mode"),
    ("train() with dropout only", "puts itself in train mode"),
    ("train() without bn or dropout", None),   # changes no number: let through
    ("plain", None),
])
def test_each_kind_of_batch_dependence_and_train_mode(kind, fragment):
    from helpers.model.load import LoadedModel
    from helpers.model.sanity import check_model_behaviour
    torch.manual_seed(0)
    net = _Net(kind)
    if kind == "train() with dropout only":
        net.bn = torch.nn.Identity()
    net.eval()
    loaded = LoadedModel(net, kind, "test", "", 10, 3)
    x = torch.randn(16, 3, 32, 32)
    if fragment is None:
        assert check_model_behaviour(loaded, x).output == "logits"
        return
    with pytest.raises(NumericalError, match=fragment.replace("(", r"\(")):
        check_model_behaviour(loaded, x)
