"""The extra time of each "Is it the data?" and "Is it the model?" part and of the diagnosis, as a ratio to the
inference pass, on a 10,000-image run
(generated CIFAR-100-format images, the real ResNet-56, TRAIN_EVIDENCE on 50,000 generated training images):

    TORCH_HOME=$PWD/.cache/torch .venv/bin/python tests/data_causes_timing.py [--work /tmp/t10k]

Not a test: pytest does not collect it. The first call writes the data (a few minutes).
"""
from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from helpers.config import Params
    from helpers.data.synthetic import write_cifar100
    from helpers.pipeline import Analysis
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/t10k"))
    args = ap.parse_args()
    root = args.work / "data"
    if not (root / "cifar-100-python" / "train").exists():
        write_cifar100(root, n_test=10000, n_train=50000, seed=0)
    an = Analysis(Params(DATA_ROOT=str(root), DOWNLOAD=False, OUTPUT_DIR=str(args.work / "out"), DEVICE="cpu",
                         EMBEDDING="tsne", TRAIN_EVIDENCE=True, FORCE_RECOMPUTE=True), progress=False)
    an.run_all()
    causes, inference = an.results["data_causes"], an.timings["inference"]
    print(f"inference pass: {inference:.1f} s")
    for part, seconds in causes.seconds.items():
        print(f"{part}: {seconds:.1f} s = {seconds / inference:.2f}x the inference pass")
    model = an.results["model_causes"]
    for part, seconds in model.seconds.items():
        print(f"model {part}: {seconds:.1f} s = {seconds / inference:.2f}x the inference pass")
    print(f"diagnosis: {an.timings['diagnosis']:.1f} s = {an.timings['diagnosis'] / inference:.2f}x the inference pass")
    print(f"cell images: {an.timings['cell_images'] / inference:.2f}x the inference pass")
    t = causes.train
    if t is not None:
        print(f"training pass: {t.n_train} images in {t.pass_seconds:.1f} s = {t.pass_ratio:.2f}x the test pass; "
              f"peak +{t.peak_memory_mb:.0f} MB in the pass, +{t.load_memory_mb:.0f} MB loading ({t.memory_how}); "
              f"search: {t.search}")
    print(f"process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
