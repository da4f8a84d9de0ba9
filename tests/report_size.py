"""How big index.html is and how fast Chromium draws it, at 100 and at 1,000 classes (the numbers in the
issue-15 note):

    TORCH_HOME=$PWD/.cache/torch .venv/bin/python tests/report_size.py [--images 10000] [--work /tmp/report-size]

100 classes: the CIFAR-100 ResNet-56 on generated CIFAR-100-format images (nearly every image an error: the
worst case for the cells' images). 1,000 classes: tests/tiny_model.py's TinyNet, untrained, on a generated
image folder. Prints the page's size, its parts, and the time from navigation to the first drawn figure.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]


def run(params) -> tuple[Path, float]:
    from helpers.pipeline import Analysis
    an = Analysis(params, progress=False)
    start = time.perf_counter()
    an.run_all()
    return an.out / "index.html", time.perf_counter() - start


def first_figure_seconds(index: Path) -> float:
    from browser import browser_page
    with browser_page(width=1400, height=1000) as (page, problems):
        start = time.perf_counter()
        page.goto(index.as_uri(), wait_until="commit")
        page.wait_for_selector("#confusion-matrix .main-svg", timeout=120_000)
        took = time.perf_counter() - start
        if problems:
            raise RuntimeError(f"{index}: {problems}")
    return took


def parts(index: Path) -> str:
    text = index.read_text(encoding="utf-8")
    sheets = sum(len(m) for m in re.findall(r'<script type="text/plain" id="cell-sheet-\d+">[^<]*', text))
    data = sum(len(m) for m in re.findall(r'<script type="application/json" id="cm-data">[^<]*', text))
    previews = sum(len(m) for m in re.findall(r'src="data:image/jpeg;base64,[^"]*', text))
    return (f"cell-image sheets {sheets / 1e6:.2f} MB, explorer numbers {data / 1e6:.2f} MB, "
            f"figure previews {previews / 1e6:.2f} MB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--work", default="/tmp/report-size")
    args = ap.parse_args()
    import torch

    from conftest import run_params
    from helpers.config import Params
    from helpers.data.synthetic import write_cifar100, write_fake_imagefolder
    from tiny_model import TinyNet
    work = Path(args.work)
    cifar = work / "cifar100"
    if not (cifar / "cifar-100-python").exists():
        write_cifar100(cifar, n_test=args.images, n_train=10, seed=0)
    folder = work / "imagefolder1000"
    if not folder.exists():
        write_fake_imagefolder(folder, classes=1000, n_per_class=max(1, args.images // 1000), size=32)
    ckpt = work / "tiny1000.pt"
    torch.manual_seed(0)
    torch.save(TinyNet(num_classes=1000).state_dict(), ckpt)
    runs = {
        "100 classes": Params(DATA_ROOT=str(cifar), DOWNLOAD=False, OUTPUT_DIR=str(work / "out100"), DEVICE="cpu",
                              EMBEDDING="tsne"),
        "1,000 classes": run_params(folder, ckpt, work / "out1000", arch=f"{HERE / 'tiny_model.py'}:TinyNet",
                                    DATASET="imagefolder", MODEL_KWARGS={"num_classes": 1000}, EMBEDDING="tsne"),
    }
    for label, params in runs.items():
        index, took = run(params)
        print(f"{label}: index.html {index.stat().st_size / 1e6:.2f} MB ({parts(index)}); "
              f"run_all {took:.1f} s; first figure in Chromium {first_figure_seconds(index):.2f} s")


if __name__ == "__main__":
    main()
