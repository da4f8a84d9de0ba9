"""Regenerate the README's figures from a real run: a small CNN trained on real Fashion-MNIST (Debian's
dataset-fashion-mnist), the whole analysis on its 10,000 test images, then the top pair gallery and a
headless-Chromium screenshot of index.html (and of one confusion-matrix cell's images), and the "Is it the data?"
figures (property slices, nearest training images, near-duplicates; TRAIN_EVIDENCE on) and the "Is it the
model?" ones (CAM trust, failure modes, concepts) copied into gradcam_results/examples/, then the diagnosis.

    .venv/bin/python tests/readme_examples.py [--work /tmp/fmnist_example]

Takes about 3-4 minutes on 2 CPU cores (training is most of it). Not a test: pytest does not collect it.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]
EXAMPLES = REPO / "gradcam_results" / "examples"


def cell_screenshot(out: Path, an, png: Path) -> None:
    """index.html after a click on the top pair's confusion-matrix cell: the panel of that cell's images."""
    from browser import browser_page, click_cell, open_page
    top = an.results["confusion"].pairs.iloc[0]
    with browser_page(width=1400, height=1000) as (page, problems):
        open_page(page, out / "index.html")
        click_cell(page, int(top.true_id), int(top.pred_id))
        page.wait_for_function("() => [...document.querySelectorAll('#cell-images canvas.cell-tile')]"
                               ".every(c => c.dataset.drawn === '1')")
        page.locator("#cell-images").screenshot(path=str(png))
    if problems:
        raise RuntimeError(f"index.html logged errors: {problems}")
    print(f"wrote {png}")


def main(argv: list[str] | None = None) -> int:
    import torch

    from browser import screenshot_report
    from fmnist_model import train_fashion_cnn
    from helpers.config import Params
    from helpers.data.datasets import load_dataset
    from helpers.data.readers import SYSTEM_FASHION_MNIST
    from helpers.model.inference import default_threads
    from helpers.pipeline import Analysis

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/fmnist_example"))
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(default_threads())

    ckpt = args.work / "fmnist_cnn.pt"
    if not ckpt.exists():
        train = load_dataset("fashion_mnist", root=SYSTEM_FASHION_MNIST, split="train", download=False)
        start = time.perf_counter()
        model = train_fashion_cnn(train.images, train.labels, train.mean, train.std, epochs=args.epochs,
                                  seed=0, progress=True)
        torch.save(model.state_dict(), ckpt)
        print(f"trained FashionCNN on {len(train.labels)} images in {time.perf_counter() - start:.0f} s -> {ckpt}")

    out = args.work / "gradcam_results"
    params = Params(MODEL_PATH=str(ckpt), ARCH=f"{HERE / 'fmnist_model.py'}:FashionCNN", DATASET="fashion_mnist",
                    DATA_ROOT=str(SYSTEM_FASHION_MNIST), DOWNLOAD=False, OUTPUT_DIR=str(out), DEVICE="cpu", SEED=0,
                    TRAIN_EVIDENCE=True)
    start = time.perf_counter()
    an = Analysis(params)
    an.run_all()
    print(f"analysis of {len(an.preds.labels)} test images in {time.perf_counter() - start:.1f} s "
          f"(accuracy {an.preds.accuracy:.2%}) -> {out}")

    EXAMPLES.mkdir(parents=True, exist_ok=True)
    pair = sorted(out.glob("confused_pair_1_*.png"))[0]
    shutil.copyfile(pair, EXAMPLES / "confused_pair_example.png")
    shot = screenshot_report(out / "index.html", EXAMPLES / "report_screenshot.png", width=1400, height=1500)
    print(f"wrote {EXAMPLES / 'confused_pair_example.png'} (from {pair.name}) and {shot}")
    cell_screenshot(out, an, EXAMPLES / "cell_images_example.png")
    for rel, name in (("deep_dive/property_slices.png", "property_slices_example.png"),
                      ("deep_dive/near_duplicates.png", "near_duplicates_example.png")):
        shutil.copyfile(out / rel, EXAMPLES / name)
    for pattern, name in (("train_neighbours_1_*.png", "train_neighbours_example.png"),
                          ("failure_modes_1_*.png", "failure_modes_example.png"),
                          ("cam_trust.png", "cam_trust_example.png"), ("concepts.png", "concepts_example.png")):
        found = sorted((out / "deep_dive").glob(pattern))
        if found:
            shutil.copyfile(found[0], EXAMPLES / name)
    print((out / "deep_dive" / "diagnosis.csv").read_text(encoding="utf-8")[:3000])
    print((out / "deep_dive" / "label_errors.csv").read_text(encoding="utf-8")[:2000])
    print((out / "analysis_summary.txt").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
