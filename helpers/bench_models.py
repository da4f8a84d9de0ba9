"""The model families `python -m helpers.bench` measures: their models, data and checkpoints, and the streamed
loader of the bare pass over image folders.

The two model classes load through ARCH="<this file>:FlattenMLPCNN" / ":TinyConvNet" (helpers.model.load imports
the file by path), so a clean clone has them without the tests folder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

MODELS_FILE = Path(__file__).resolve()
SYSTEM_FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")   # Debian's dataset-fashion-mnist
IMAGEFOLDER_CLASSES = 20
IMAGEFOLDER_SIDE = 224


# ----------------------------------------------------------------------------- models

def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FlattenMLPCNN(nn.Module):
    """28x28 Fashion-MNIST CNN with a flatten + MLP head (not GAP -> Linear): convs to a 7x7 map, flatten
    (4*width*49 values), Linear to `hidden` (the 128-d penultimate features the issue's separability timing
    is about), ReLU, Linear to the classes."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 8, hidden: int = 128):
        super().__init__()
        self.features = nn.Sequential(_conv(in_channels, width), _conv(width, 2 * width, stride=2),
                                      _conv(2 * width, 4 * width, stride=2), _conv(4 * width, 4 * width))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 7 * 7, hidden), nn.ReLU(inplace=True),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class TinyConvNet(nn.Module):
    """A cheap 224 px CNN for the RSS mode, where the model does not matter for data memory: two strided
    convs (224 -> 56 -> 14), global average pooling, one Linear."""

    def __init__(self, num_classes: int = IMAGEFOLDER_CLASSES, in_channels: int = 3, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 7, stride=4, padding=3, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True), _conv(width, 2 * width, stride=4))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def train_quickly(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 2, batch_size: int = 128,
                  lr: float = 0.01, seed: int = 0) -> nn.Module:
    """A few seeded AdamW epochs on normalised inputs: weights with the confusion structure of a real model
    (random weights predict one class for nearly everything, which no analysis step is timed on)."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            idx = perm[start:start + batch_size]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


# ----------------------------------------------------------------------------- families

@dataclass(frozen=True)
class Family:
    name: str       # the --families name
    label: str      # what the table shows
    arch: str       # the ARCH the analysis loads; "file:" prefix = a class in this file
    dataset: str    # "cifar" (the --dataset format, generated), "fashion_mnist" (real) or "imagefolder" (generated)
    weights: str    # "builtin" (released or random), "trained" (a few epochs here) or "random"
    target: float = 1.5   # b/a at most

    @property
    def arch_string(self) -> str:
        return f"{MODELS_FILE}:{self.arch[len('file:'):]}" if self.arch.startswith("file:") else self.arch


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("resnet56", "ResNet-56", "resnet56", "cifar", "builtin"),
    Family("resnet34", "ResNet-34-CIFAR", "resnet34", "cifar", "builtin", target=1.3),
    Family("resnet20", "ResNet-20", "resnet20", "cifar", "builtin"),
    Family("resnet18", "ResNet-18-CIFAR", "resnet18", "cifar", "builtin"),
    Family("fmnist_mlp", "flatten+MLP CNN, Fashion-MNIST 28 px", "file:FlattenMLPCNN", "fashion_mnist", "trained"),
    Family("tv_resnet18", "torchvision ResNet-18, 224 px", "torchvision:resnet18", "imagefolder", "random"),
    Family("tv_resnet50", "torchvision ResNet-50, 224 px", "torchvision:resnet50", "imagefolder", "random"),
    Family("vit_tiny", "timm ViT-Ti/16, 224 px", "timm:vit_tiny_patch16_224", "imagefolder", "random"),
    Family("swin_tiny", "timm Swin-T, 224 px", "timm:swin_tiny_patch4_window7_224", "imagefolder", "random"),
)}
DEFAULT_FAMILIES = ("fmnist_mlp", "tv_resnet18", "tv_resnet50", "vit_tiny", "swin_tiny", "resnet56", "resnet34")
RSS_FAMILY = Family("rss_tiny", "tiny CNN, 224 px (RSS)", "file:TinyConvNet", "imagefolder", "random")


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise SystemExit(f"Unknown model family {name!r}; choose from {', '.join(FAMILIES)}.")
    return FAMILIES[name]


def prepare_imagefolder(folder: Path, n: int, n_classes: int = IMAGEFOLDER_CLASSES,
                        side: int = IMAGEFOLDER_SIDE) -> Path:
    """A generated ImageFolder of n JPEGs (n // n_classes per class) under folder, written once and reused."""
    from helpers.data.synthetic import write_sized_imagefolder
    stamp = folder / "bench_n.txt"
    key = f"imagefolder {n} {n_classes} {side}"
    if not (stamp.exists() and stamp.read_text().strip() == key):
        write_sized_imagefolder(folder, n_images=n, n_classes=n_classes, size=side, seed=0)
        stamp.write_text(key)
    return folder


def fmnist_checkpoint(folder: Path, root: Path, n_train: int, epochs: int = 2) -> Path:
    """FlattenMLPCNN trained for `epochs` on the first n_train Fashion-MNIST training images (seeded, once)."""
    path = folder / f"fmnist_mlp-train{n_train}-e{epochs}.pt"
    if not path.exists():
        from helpers.data.datasets import load_dataset
        from helpers.model.inference import to_tensor
        train = load_dataset("fashion_mnist", root=root, download=False, split="train", limit=n_train)
        model = FlattenMLPCNN(num_classes=train.num_classes, in_channels=train.images.shape[-1])
        train_quickly(model, to_tensor(train.images, train.mean, train.std), torch.as_tensor(train.labels),
                      epochs=epochs)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return path


def random_checkpoint(fam: Family, folder: Path, num_classes: int) -> Path:
    """Seeded random weights of a family's architecture, saved as a state_dict."""
    path = folder / f"{fam.name}-{num_classes}-random.pt"
    if not path.exists():
        from helpers.model.load import build_model
        torch.manual_seed(0)
        model = (globals()[fam.arch[len("file:"):]](num_classes=num_classes) if fam.arch.startswith("file:")
                 else build_model(fam.arch, num_classes=num_classes, download=False))
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return path


# ----------------------------------------------------------------------------- the bare pass over image files

class ImageFiles(torch.utils.data.Dataset):
    """An image folder's files, decoded one at a time into uint8 (C, H, W) tensors: RGB, resized (bilinear, as
    helpers.data.readers does) when a file is not (h, w). The workers send uint8 (a quarter of float32's
    bytes); `normalise` turns a batch into what helpers.model.inference.to_tensor gives."""

    def __init__(self, root: Path, hw: Optional[tuple[int, int]], mean, std, limit: Optional[int] = None):
        import torchvision
        self.samples = torchvision.datasets.ImageFolder(str(root)).samples[:limit]
        self.hw = hw
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image
        with Image.open(self.samples[i][0]) as im:
            im = im.convert("RGB")
            if self.hw is not None and im.size != (self.hw[1], self.hw[0]):
                im = im.resize((self.hw[1], self.hw[0]), Image.Resampling.BILINEAR)
            return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)

    def normalise(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> (x / 255 - mean) / std, float32."""
        return (batch.float().div_(255.0) - self.mean) / self.std


def image_batches(files: ImageFiles, batch_size: int, workers: int):
    """Normalised float32 batches of the folder's images, in order, decoded in `workers` DataLoader processes."""
    loader = torch.utils.data.DataLoader(files, batch_size=batch_size, num_workers=workers, shuffle=False,
                                         prefetch_factor=2 if workers else None)
    for batch in loader:
        yield files.normalise(batch)
