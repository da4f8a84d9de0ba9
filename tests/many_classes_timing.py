"""Time and sizes of a 1,000-class analysis (issue 18): a generated image folder, 1,000 classes x 5 images at 64 px,
tests/tiny_model.py's TinyNet with random weights, every step of run_all(); then index.html's size and the time
Chromium takes to draw its first figure, and how many PNGs the run wrote.

    .venv/bin/python tests/many_classes_timing.py [--per-class 5] [--size 64] [--galleries 100] [--work /tmp/many-classes]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--per-class", type=int, default=5)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--galleries", default="100")
    ap.add_argument("--work", default="/tmp/many-classes")
    args = ap.parse_args()
    import torch

    from conftest import run_params
    from helpers.data.synthetic import write_fake_imagefolder
    from helpers.pipeline import Analysis
    from report_size import first_figure_seconds
    from tiny_model import TinyNet
    work = Path(args.work)
    folder = work / f"folder_{args.classes}x{args.per_class}_{args.size}px"
    if not folder.exists():
        start = time.perf_counter()
        write_fake_imagefolder(folder, classes=[f"n{i:08d}" for i in range(args.classes)],
                               n_per_class=args.per_class, size=args.size)
        print(f"generated {folder} in {time.perf_counter() - start:.1f} s")
    ckpt = work / f"tiny{args.classes}.pt"
    torch.manual_seed(0)
    torch.save(TinyNet(num_classes=args.classes).state_dict(), ckpt)
    params = run_params(folder, ckpt, work / "out", arch=f"{HERE / 'tiny_model.py'}:TinyNet", DATASET="imagefolder",
                        MODEL_KWARGS={"num_classes": args.classes}, EMBEDDING="tsne", FORCE_RECOMPUTE=True,
                        CLASS_GALLERIES=args.galleries)
    an = Analysis(params, progress=False)
    start = time.perf_counter()
    an.run_all()
    total = time.perf_counter() - start
    print(f"{args.classes} classes x {args.per_class} images at {args.size} px, CLASS_GALLERIES={args.galleries}: "
          f"run_all {total:.1f} s")
    for step, seconds in an.timings.items():
        print(f"  {step:<18} {seconds:6.1f} s")
    out = an.out
    index = out / "index.html"
    pngs = [p for p in out.rglob("*.png") if ".cache" not in p.parts]
    print(f"index.html {index.stat().st_size / 1e6:.2f} MB; first figure drawn by Chromium after "
          f"{first_figure_seconds(index):.1f} s")
    print(f"confusion_matrix_interactive.html {(out / 'confusion_matrix_interactive.html').stat().st_size / 1e6:.2f} MB")
    print(f"PNGs written: {len(pngs)} ({len(list((out / 'worst_predictions').glob('*.png')))} class galleries), "
          f"{sum(p.stat().st_size for p in pngs) / 1e6:.1f} MB")
    from PIL import Image
    for name in ("confusion_matrix_full.png", "confusion_matrix_top.png", "confusion_matrix_groups.png"):
        if (out / name).exists():
            with Image.open(out / name) as im:
                print(f"  {name}: {im.width} x {im.height} px, {(out / name).stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
