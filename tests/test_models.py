"""Model loading: the real CIFAR-100 ResNet-56, checkpoint layouts, arch kinds and every error path."""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import random
import shutil
import sys
import urllib.error
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers.model import checkpoint, load as models
from helpers.model.architectures import BUILTIN_ARCHS, CifarResNet, resnet18, resnet20, resnet56
from helpers.errors import CheckpointError, ConfigError, DataError, ModelLoadError, SuiteError
from helpers.model.load import (
    DEFAULT_MODEL_FILENAME,
    DEFAULT_MODEL_SHA256,
    LoadedModel,
    LogitsWrapper,
    check_model_fits_data,
    extract_logits,
    load_model,
    unwrap,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REAL_CKPT = SHARED / "models" / "cifar100_resnet56-f2eff4c8.pt"
needs_real = pytest.mark.skipif(not REAL_CKPT.is_file(), reason=f"{REAL_CKPT} not available")


# ---------------------------------------------------------------------------------------------
# fixtures and small helpers

@pytest.fixture(scope="session")
def seeded_hub_home(tmp_path_factory) -> Path:
    if not REAL_CKPT.is_file():
        pytest.skip(f"{REAL_CKPT} not available")
    home = tmp_path_factory.mktemp("torch_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    shutil.copyfile(REAL_CKPT, home / "hub" / "checkpoints" / DEFAULT_MODEL_FILENAME)
    return home


@pytest.fixture
def hub_home(seeded_hub_home, monkeypatch) -> Path:
    """TORCH_HOME whose hub cache holds a copy of the real checkpoint (never inside the repo)."""
    monkeypatch.setenv("TORCH_HOME", str(seeded_hub_home))
    return seeded_hub_home


@pytest.fixture
def no_download(monkeypatch):
    """Any attempt to download fails, as it would offline."""
    def refuse(url, dst, *args, **kwargs):
        raise urllib.error.URLError("network is unreachable")
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture(scope="module")
def tv18_checkpoint(tmp_path_factory) -> tuple[nn.Module, Path]:
    """torchvision's ImageNet-stem resnet18 with 10 classes, saved once for the tests that need it."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    return model, save(model.state_dict(), tmp_path_factory.mktemp("tv18") / "tv18.pt")


def save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def small_resnet20(num_classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = resnet20(num_classes=num_classes)
    # Non-trivial BatchNorm statistics, so a wrong or missed buffer would change the outputs.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def outputs_match(loaded: LoadedModel, reference: nn.Module, shape=(2, 3, 32, 32)) -> bool:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.allclose(loaded.module(x), reference.eval()(x), atol=1e-5)


def functional_resnet56(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """An independent forward pass written from ../shared/README.md with torch.nn.functional."""
    def bn(t, prefix):
        return F.batch_norm(t, sd[prefix + ".running_mean"], sd[prefix + ".running_var"],
                            sd[prefix + ".weight"], sd[prefix + ".bias"], False, 0.0, 1e-5)

    out = F.relu(bn(F.conv2d(x, sd["conv1.weight"], padding=1), "bn1"))
    for layer, first_stride in ((1, 1), (2, 2), (3, 2)):
        for block in range(9):
            p = f"layer{layer}.{block}"
            stride = first_stride if block == 0 else 1
            y = F.relu(bn(F.conv2d(out, sd[p + ".conv1.weight"], stride=stride, padding=1), p + ".bn1"))
            y = bn(F.conv2d(y, sd[p + ".conv2.weight"], padding=1), p + ".bn2")
            if p + ".downsample.0.weight" in sd:
                shortcut = bn(F.conv2d(out, sd[p + ".downsample.0.weight"], stride=stride), p + ".downsample.1")
            else:
                shortcut = out
            out = F.relu(y + shortcut)
    return F.linear(out.mean(dim=(2, 3)), sd["fc.weight"], sd["fc.bias"])


# ---------------------------------------------------------------------------------------------
# architectures

def test_cifar_resnet_depths_and_key_names():
    for name, blocks in (("resnet20", 3), ("resnet32", 5), ("resnet44", 7), ("resnet56", 9), ("resnet110", 18)):
        with torch.device("meta"):
            model = BUILTIN_ARCHS[name](num_classes=7, in_channels=1)
        assert isinstance(model, CifarResNet) and len(model.layer1) == blocks
        keys = set(model.state_dict())
        assert {"conv1.weight", "bn1.running_var", "fc.weight", "fc.bias",
                "layer2.0.downsample.0.weight", "layer3.0.downsample.1.running_mean"} <= keys
        assert not any(k.startswith("layer1.0.downsample") for k in keys)
        assert model.fc.out_features == 7 and model.conv1.in_channels == 1
        assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)


def test_cifar_stem_resnets():
    model = resnet18(num_classes=10, in_channels=1).eval()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.bias is None
    assert isinstance(model.maxpool, nn.Identity)
    feats = {}
    model.layer4.register_forward_hook(lambda m, i, o: feats.update(layer4=o.shape))
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 10)
    assert feats["layer4"][-2:] == (4, 4)  # CIFAR stem keeps 4x4 maps at layer4


# ---------------------------------------------------------------------------------------------
# the real default model

@needs_real
def test_default_model_loads_from_torch_hub_cache(hub_home, no_download):
    loaded = load_model()
    assert loaded.arch == "resnet56" and loaded.num_classes == 100 and loaded.in_channels == 3
    assert loaded.weights_sha256 == DEFAULT_MODEL_SHA256
    assert str(hub_home) in loaded.source and models.DEFAULT_MODEL_URL in loaded.source
    assert not loaded.module.training

    reference = torch.load(REAL_CKPT, map_location="cpu", weights_only=True)
    state = loaded.module.state_dict()
    assert len(reference) == 344 and list(state) == list(reference)  # strict: same keys, same order
    assert all(torch.equal(state[k], reference[k]) for k in reference)

    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = loaded.module(x)
    assert logits.shape == (4, 100) and torch.isfinite(logits).all()
    assert torch.allclose(logits, functional_resnet56(reference, x), atol=1e-4)

    maps = {}
    loaded.inner.get_submodule("layer3.8").register_forward_hook(lambda m, i, o: maps.update(cam=o.shape))
    with torch.no_grad():
        loaded.module(x[:1])
    assert maps["cam"] == (1, 64, 8, 8)  # the natural Grad-CAM layer gives an 8x8 map


@needs_real
def test_default_model_infers_arch_from_real_checkpoint():
    loaded = load_model(REAL_CKPT)
    assert loaded.arch == "resnet56" and "inferred" in loaded.source
    assert loaded.weights_sha256 == hashlib.sha256(REAL_CKPT.read_bytes()).hexdigest()


def test_default_model_offline_names_cache_path(tmp_path, monkeypatch, no_download):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    with pytest.raises(ModelLoadError) as err:
        load_model()
    expected = tmp_path / "empty_home" / "hub" / "checkpoints" / DEFAULT_MODEL_FILENAME
    assert str(expected) in str(err.value) and "MODEL_PATH" in str(err.value)
    assert not isinstance(err.value, CheckpointError)


@needs_real
def test_default_model_corrupt_or_foreign_cache(tmp_path, monkeypatch, no_download):
    cache = tmp_path / "hub" / "checkpoints" / DEFAULT_MODEL_FILENAME
    cache.parent.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache.write_bytes(REAL_CKPT.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as err:
        load_model()
    assert str(cache) in str(err.value) and "Delete it" in str(err.value)

    save(resnet56().state_dict(), cache)  # loadable, but not the released weights
    with pytest.raises(CheckpointError, match="not the released file"):
        load_model()


def test_default_model_refuses_other_dataset_sizes():
    with pytest.raises(ConfigError, match="MODEL_PATH") as err:
        load_model(num_classes=10)
    assert "100 classes" in str(err.value)
    with pytest.raises(DataError, match="CONVERT_CHANNELS='rgb'"):
        load_model(in_channels=1)
    with pytest.raises(ConfigError, match="needs MODEL_PATH"):
        load_model(arch="resnet20")


# ---------------------------------------------------------------------------------------------
# checkpoint layouts

def test_dataparallel_prefix_is_stripped_and_arch_inferred(tmp_path):
    model = small_resnet20()
    path = save(nn.DataParallel(model).state_dict(), tmp_path / "dp.pt")
    assert all(k.startswith("module.") for k in torch.load(path, weights_only=True))
    loaded = load_model(path, num_classes=10)
    assert loaded.arch == "resnet20" and "'module.' prefix stripped" in loaded.source
    assert outputs_match(loaded, model)


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model", "net"])
def test_nested_checkpoint_layouts(tmp_path, key):
    model = small_resnet20(seed=3)
    checkpoint = {"epoch": 12, "best_acc": 0.91, key: model.state_dict(),
                  "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}
    loaded = load_model(save(checkpoint, tmp_path / "nested.pt"), arch="resnet20", num_classes=10)
    assert f"under '{key}'" in loaded.source
    assert outputs_match(loaded, model)


def test_lightning_style_prefix_is_stripped(tmp_path):
    model = small_resnet20(seed=4)
    sd = {"model." + k: v for k, v in model.state_dict().items()}
    path = save({"state_dict": sd}, tmp_path / "pl.ckpt")
    assert outputs_match(load_model(path, arch="resnet20", num_classes=10), model)
    assert outputs_match(load_model(path, num_classes=10), model)  # and the arch is still inferred


def test_safetensors_checkpoint(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    model = small_resnet20(seed=6)
    path = tmp_path / "weights.bin"  # detected from the header, not only the .safetensors suffix
    st.save_file(model.state_dict(), str(path))
    loaded = load_model(path, num_classes=10)
    assert loaded.arch == "resnet20" and outputs_match(loaded, model)

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(broken, num_classes=10)


def test_checkpoint_without_state_dict(tmp_path):
    path = save({"epoch": 3, "notes": "no weights here"}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match=r"torch\.save\(model\.state_dict\(\), path\)") as err:
        load_model(path, arch="resnet20")
    assert "'epoch'" in str(err.value)


def test_missing_batchnorm_counters_are_tolerated(tmp_path):
    model = small_resnet20(seed=5)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    loaded = load_model(save(sd, tmp_path / "old.pt"), num_classes=10)
    assert loaded.arch == "resnet20" and outputs_match(loaded, model)


def test_nan_weights_are_refused(tmp_path):
    sd = small_resnet20().state_dict()
    sd["layer2.1.conv1.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"NaN .*layer2\.1\.conv1\.weight"):
        load_model(save(sd, tmp_path / "nan.pt"), arch="resnet20", num_classes=10)


# ---------------------------------------------------------------------------------------------
# the numbered error cases

def test_error_missing_model_path_gives_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_model("checkpoints/missing.pt")
    assert str(tmp_path / "checkpoints" / "missing.pt") in str(err.value)
    assert "MODEL_PATH" in str(err.value)


def test_error_key_mismatch_suggests_best_builtin(tmp_path):
    path = save(small_resnet20().state_dict(), tmp_path / "r20.pt")
    with pytest.raises(CheckpointError) as err:
        load_model(path, arch="resnet56", num_classes=10)
    text = str(err.value)
    assert "layer1.3.conv1.weight" in text  # first missing key, in model order
    assert "ARCH='resnet20'" in text and "100% key overlap" in text

    path56 = save(resnet56(num_classes=10).state_dict(), tmp_path / "r56.pt")
    with pytest.raises(CheckpointError) as err:
        load_model(path56, arch="resnet20", num_classes=10)
    assert "unexpected" in str(err.value) and "layer1.3.conv1.weight" in str(err.value)
    assert "ARCH='resnet56'" in str(err.value)


def test_error_unrelated_keys_with_unknown_arch(tmp_path):
    path = save(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).state_dict(), tmp_path / "mlp.pt")
    with pytest.raises(CheckpointError) as err:
        load_model(path, num_classes=3)
    assert "Cannot infer the architecture" in str(err.value)
    assert "1.weight" in str(err.value)
    assert "model.py:ClassName" in str(err.value)


def test_error_shape_mismatch_names_parameter_and_shapes(tmp_path):
    path = save(small_resnet20(num_classes=10).state_dict(), tmp_path / "ten.pt")
    with pytest.raises(CheckpointError) as err:
        load_model(path, arch="resnet20", num_classes=100)
    text = str(err.value)
    assert "fc.weight: checkpoint (10, 64) vs model (100, 64)" in text
    assert "fc.bias: checkpoint (10,) vs model (100,)" in text
    assert "10 classes" in text


def test_error_shape_mismatch_imagenet_stem_hint(tv18_checkpoint):
    _, path = tv18_checkpoint
    with pytest.raises(CheckpointError) as err:
        load_model(path, num_classes=10)  # keys match the built-in resnet18, the stem does not
    assert "conv1.weight: checkpoint (64, 3, 7, 7) vs model (64, 3, 3, 3)" in str(err.value)
    assert "ARCH='torchvision:resnet18'" in str(err.value)


class PickledNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_error_full_pickle_refused_without_opt_in(tmp_path):
    torch.manual_seed(0)
    net = PickledNet().eval()
    path = save(net, tmp_path / "full.pt")
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    text = str(err.value)
    assert "arbitrary code" in text and "allow_unsafe_pickle=True" in text and "ALLOW_UNSAFE_PICKLE" in text
    assert "PickledNet" in text

    loaded = load_model(path, allow_unsafe_pickle=True)
    assert isinstance(loaded.inner, PickledNet) and loaded.num_classes == 5
    assert "ALLOW_UNSAFE_PICKLE" in loaded.source
    assert outputs_match(loaded, net)


def test_checkpoint_with_python_objects_needs_opt_in(tmp_path):
    model = small_resnet20()
    path = save({"args": argparse.Namespace(lr=0.1), "state_dict": model.state_dict()}, tmp_path / "ns.pt")
    with pytest.raises(CheckpointError, match="argparse.Namespace"):
        load_model(path, arch="resnet20", num_classes=10)
    loaded = load_model(path, arch="resnet20", num_classes=10, allow_unsafe_pickle=True)
    assert outputs_match(loaded, model)


@needs_real
@pytest.mark.parametrize("keep", [0, 1, 5_000, 1_000_000])
def test_error_truncated_checkpoint(tmp_path, keep):
    path = tmp_path / "trunc.pt"
    path.write_bytes(REAL_CKPT.read_bytes()[:keep])
    with pytest.raises(CheckpointError) as err:
        load_model(path, arch="resnet56")
    assert "corrupt or truncated" in str(err.value) and str(path) in str(err.value)


def test_error_unknown_arch_lists_choices(tmp_path):
    path = save(small_resnet20().state_dict(), tmp_path / "r20.pt")
    with pytest.raises(ConfigError) as err:
        load_model(path, arch="resnet57", num_classes=10)
    text = str(err.value)
    assert "resnet56" in text and "resnet110" in text and "torchvision.models" in text
    assert "timm:<name>" in text and "model.py:ClassName" in text
    assert "Did you mean 'resnet56'" in text


def test_unavailable_device_is_a_config_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    path = save(small_resnet20().state_dict(), tmp_path / "r20.pt")
    with pytest.raises(ConfigError, match="DEVICE='auto'"):
        load_model(path, num_classes=10, device="cuda")


# ---------------------------------------------------------------------------------------------
# other architecture kinds

def test_torchvision_names(tmp_path, tv18_checkpoint):
    import torchvision

    tv18, tv18_path = tv18_checkpoint
    loaded = load_model(tv18_path, arch="torchvision:resnet18", num_classes=10)
    assert loaded.num_classes == 10 and loaded.inner.conv1.kernel_size == (7, 7)
    assert outputs_match(loaded, tv18, shape=(2, 3, 64, 64))

    torch.manual_seed(1)
    squeeze = torchvision.models.squeezenet1_1(num_classes=10).eval()
    loaded = load_model(save(squeeze.state_dict(), tmp_path / "sq.pt"), arch="squeezenet1_1", num_classes=10)
    assert outputs_match(loaded, squeeze, shape=(1, 3, 64, 64))

    with pytest.raises(ConfigError, match="CONVERT_CHANNELS='rgb'"):
        load_model(tmp_path / "sq.pt", arch="squeezenet1_1", num_classes=10, in_channels=1)


USER_MODEL_FILE = '''
import types
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, width, num_classes=2, in_channels=3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(width, num_classes)

    def logits(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))

    def forward(self, x):
        return self.logits(x)


class TupleNet(TinyNet):
    def forward(self, x):
        return self.logits(x), x.mean()


class DictNet(TinyNet):
    def forward(self, x):
        return {"logits": self.logits(x), "aux": x.mean()}


class ObjNet(TinyNet):
    def forward(self, x):
        return types.SimpleNamespace(logits=self.logits(x), hidden_states=None)
'''


@pytest.fixture
def user_file(tmp_path) -> Path:
    path = tmp_path / "user_models" / "model.py"
    path.parent.mkdir()
    path.write_text(USER_MODEL_FILE)
    return path


def _import_user(path: Path):
    spec = importlib.util.spec_from_file_location("independent_user_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_user_file_with_kwargs(tmp_path, user_file):
    torch.manual_seed(0)
    reference = _import_user(user_file).TinyNet(width=8, num_classes=6).eval()
    ckpt = save(reference.state_dict(), tmp_path / "tiny.pt")
    loaded = load_model(ckpt, arch=f"{user_file}:TinyNet", num_classes=6, model_kwargs={"width": 8})
    assert loaded.num_classes == 6 and loaded.inner.head.out_features == 6  # num_classes passed through
    assert not isinstance(loaded.module, LogitsWrapper)
    assert outputs_match(loaded, reference)

    with pytest.raises(ConfigError, match="MODEL_KWARGS") as err:
        load_model(ckpt, arch=f"{user_file}:TinyNet", num_classes=6)  # width missing
    assert "width" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_model(ckpt, arch=f"{user_file}:NoSuchNet", num_classes=6)
    assert "TinyNet" in str(err.value) and "DictNet" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_model(ckpt, arch=f"{tmp_path / 'nowhere.py'}:TinyNet", num_classes=6)
    assert str(tmp_path / "nowhere.py") in str(err.value)


def test_user_file_import_error_is_reported(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom at import')\n")
    ckpt = save(small_resnet20().state_dict(), tmp_path / "r.pt")
    with pytest.raises(ModelLoadError, match="boom at import") as err:
        load_model(ckpt, arch=f"{broken}:Net", num_classes=10)
    assert str(broken) in str(err.value)


@pytest.mark.parametrize("cls", ["TupleNet", "DictNet", "ObjNet"])
def test_logits_wrapper_for_non_tensor_outputs(tmp_path, user_file, cls):
    torch.manual_seed(0)
    reference = getattr(_import_user(user_file), cls)(width=4, num_classes=3).eval()
    ckpt = save(reference.state_dict(), tmp_path / "w.pt")
    loaded = load_model(ckpt, arch=f"{user_file}:{cls}", num_classes=3, model_kwargs={"width": 4})
    assert isinstance(loaded.module, LogitsWrapper) and loaded.num_classes == 3
    assert loaded.inner is loaded.module.model is unwrap(loaded.module)
    assert type(loaded.inner).__name__ == cls
    assert isinstance(loaded.inner.get_submodule("body.0"), nn.Conv2d)  # layer paths are on the inner model
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), reference.logits(x))


def test_extract_logits_variants():
    t = torch.arange(6.0).view(2, 3)

    class ModelOutput(OrderedDict):  # HuggingFace's ModelOutput is an OrderedDict with attributes
        pass

    hf = ModelOutput(logits=t)
    assert extract_logits(t) is t and extract_logits(hf) is t
    assert extract_logits([t, None]) is t and extract_logits(({"logits": t},)) is t
    with pytest.raises(ModelLoadError, match="no 'logits'"):
        extract_logits({"scores": t})
    with pytest.raises(ModelLoadError, match="not a logits tensor"):
        extract_logits("text")


class TupleScriptNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 7)

    def forward(self, x):
        feats = self.conv(x).mean(dim=(2, 3))
        return self.fc(feats), feats


def test_torchscript_round_trip(tmp_path):
    torch.manual_seed(0)
    model = PickledNet().eval()
    path = tmp_path / "scripted.pt"
    torch.jit.script(model).save(str(path))
    assert checkpoint.is_torchscript_file(path) and not checkpoint.is_torchscript_file(save(model.state_dict(), tmp_path / "sd.pt"))
    # TorchScript is code: refused unless opted in (tests/test_security.py has the file-writing case)
    with pytest.raises(CheckpointError, match="ALLOW_UNSAFE_PICKLE"):
        load_model(path, num_classes=5)
    loaded = load_model(path, num_classes=5, allow_unsafe_pickle=True)  # no ARCH needed: the archive holds the code
    assert loaded.arch == "torchscript" and loaded.num_classes == 5 and str(path) in loaded.source
    assert outputs_match(loaded, model)

    traced_path = tmp_path / "traced.pt"
    torch.manual_seed(0)
    tuple_net = TupleScriptNet().eval()
    torch.jit.trace(tuple_net, torch.zeros(1, 3, 32, 32)).save(str(traced_path))
    loaded = load_model(traced_path, num_classes=7, allow_unsafe_pickle=True)
    assert isinstance(loaded.module, LogitsWrapper) and loaded.num_classes == 7
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), tuple_net(x)[0], atol=1e-6)


def test_timm_vit(tmp_path):
    timm = pytest.importorskip("timm")
    kwargs = {"img_size": 32, "patch_size": 4, "depth": 2}  # 2 of 12 blocks: same code path, faster
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, **kwargs).eval()
    path = save(vit.state_dict(), tmp_path / "vit.pt")
    loaded = load_model(path, arch="timm:vit_tiny_patch16_224", num_classes=10, model_kwargs=kwargs)
    assert loaded.arch == "timm:vit_tiny_patch16_224" and loaded.num_classes == 10
    assert outputs_match(loaded, vit)
    check_model_fits_data(loaded, (3, 32, 32), 10)

    with pytest.raises(ConfigError, match="timm has no model"):
        load_model(path, arch="timm:vit_tinyy_patch16_224", num_classes=10)


def test_timm_missing_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    path = save(small_resnet20().state_dict(), tmp_path / "r.pt")
    with pytest.raises(ConfigError, match="pip install timm"):
        load_model(path, arch="timm:resnet18", num_classes=10)


# ---------------------------------------------------------------------------------------------
# check_model_fits_data

@needs_real
def test_check_model_fits_data_on_real_model(hub_home, no_download):
    loaded = load_model()
    assert check_model_fits_data(loaded, (3, 32, 32), 100) is loaded
    with pytest.raises(DataError) as err:
        check_model_fits_data(loaded, (1, 28, 28), 100)
    assert "grayscale" in str(err.value) and "CONVERT_CHANNELS='rgb'" in str(err.value)
    assert "convert_channels" in str(err.value)
    with pytest.raises(ConfigError, match="model outputs 100 classes but the dataset has 10"):
        check_model_fits_data(loaded, (3, 32, 32), 10)


def test_check_model_fits_data_gray_model_and_wrapping(tmp_path):
    model = resnet20(num_classes=10, in_channels=1).eval()
    loaded = load_model(save(model.state_dict(), tmp_path / "gray.pt"), num_classes=10, in_channels=1)
    assert loaded.in_channels == 1
    with pytest.raises(DataError, match="CONVERT_CHANNELS='gray'"):
        check_model_fits_data(loaded, (3, 32, 32), 10)

    tuple_loaded = LoadedModel(module=TupleScriptNet().eval(), arch="x", source="test",
                               weights_sha256="0", num_classes=7, in_channels=3)
    check_model_fits_data(tuple_loaded, (3, 20, 20), 7)
    assert isinstance(tuple_loaded.module, LogitsWrapper)
    assert tuple_loaded.module(torch.zeros(2, 3, 20, 20)).shape == (2, 7)


def test_check_model_fits_data_wrong_image_size():
    fixed = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()
    loaded = LoadedModel(module=fixed, arch="x", source="test", weights_sha256="0", num_classes=10, in_channels=3)
    with pytest.raises(DataError, match="28x28 images"):
        check_model_fits_data(loaded, (3, 28, 28), 10)


# ---------------------------------------------------------------------------------------------
# fuzzing: damaged files only ever raise SuiteError

def _fuzz_cases(tmp_path: Path) -> list[Path]:
    rng = random.Random(1234)
    real = REAL_CKPT.read_bytes() if REAL_CKPT.is_file() else None
    small = tmp_path / "small.pt"
    save(small_resnet20().state_dict(), small)
    sources = [small.read_bytes()] + ([real] if real is not None else [])
    headers = [b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95", b"\x8a\x0alZ\xfc\x9cF\xf9 j\xa8P\x19."]
    cases = []
    for i in range(50):
        kind = i % 3
        if kind == 0:  # random bytes, sometimes behind a zip or pickle header
            data = rng.choice(headers) + rng.randbytes(rng.randint(0, 4096))
        elif kind == 1:  # truncated real checkpoints
            src = rng.choice(sources)
            data = src[:rng.randint(0, len(src) - 1)]
        else:  # a few flipped bytes: may still load, or must fail cleanly
            src = bytearray(rng.choice(sources))
            for _ in range(rng.randint(1, 8)):
                src[rng.randrange(len(src))] = rng.randrange(256)
            data = bytes(src)
        path = tmp_path / f"fuzz_{i}.pt"
        path.write_bytes(data)
        cases.append(path)
    return cases


def test_fuzz_damaged_files_raise_only_suite_errors(tmp_path):
    outcomes = {"loaded": 0, "refused": 0}
    # Flipped exponent bytes create denormal weights, whose CPU arithmetic is ~100x slower.
    flush_was_supported = torch.set_flush_denormal(True)
    try:
        for i, path in enumerate(_fuzz_cases(tmp_path)):
            arch = None if i % 2 else "resnet20"
            try:
                load_model(path, arch=arch, num_classes=10)
                outcomes["loaded"] += 1
            except SuiteError:
                outcomes["refused"] += 1
            except Exception as exc:  # pragma: no cover - the failure being tested for
                pytest.fail(f"case {i} ({path.stat().st_size} bytes) raised {type(exc).__name__}: {exc}")
    finally:
        if flush_was_supported:
            torch.set_flush_denormal(False)
    assert outcomes["refused"] >= 30  # random and truncated files can never load
