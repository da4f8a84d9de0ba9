"""Command line: `python -m helpers analyze ...` writes the same outputs as the notebook, without Jupyter."""
from __future__ import annotations

import argparse
import json
import sys
import time
import typing
from dataclasses import fields

from .config import ENV_PREFIX, Params
from .errors import SuiteError

HELP = {
    "MODEL_PATH": "checkpoint file (state_dict, TorchScript, ...); default: the public CIFAR-100 ResNet-56",
    "ARCH": "resnet20/32/44/56/110, resnet18/34/50 (CIFAR stem), any torchvision.models name, "
            "timm:<name>, or path/to/model.py:ClassName",
    "MODEL_KWARGS": "JSON dict of constructor arguments for ARCH",
    "ALLOW_UNSAFE_PICKLE": "allow loading a full pickled model (executes code from the file)",
    "DATASET": "cifar100, cifar10, fashion_mnist, mnist or imagefolder",
    "DATA_ROOT": "folder holding the dataset (e.g. the parent of cifar-100-python/)",
    "DOWNLOAD": "download the dataset if missing",
    "LIMIT": "analyse only the first N test images",
    "MEAN": "normalisation mean, JSON list", "STD": "normalisation std, JSON list",
    "CONVERT_CHANNELS": "'rgb' to feed grayscale data to an RGB model, 'gray' for the reverse",
    "SUPERCLASS_MAP": "JSON {class: group} for datasets without superclasses",
    "OUTPUT_DIR": "where results are written",
    "DEVICE": "auto, cpu, cuda, cuda:N or mps",
    "CAM_METHOD": "gradcam, gradcam++, layercam, xgradcam, eigencam, scorecam or finercam",
    "TARGET_LAYER": "dotted layer path such as layer4.1; default: automatic",
    "GROUP_CLASSES": "comma-separated class names for the deep dive; default: found automatically",
    "EMBEDDING": "feature-space projection: auto (UMAP if installed, else t-SNE), umap or tsne",
    "FORCE_RECOMPUTE": "ignore the cache of an earlier identical run",
}


def _flag(name: str) -> str:
    return "--" + name.lower().replace("_", "-")


def _add_params(parser: argparse.ArgumentParser) -> None:
    defaults = Params()
    for f in fields(Params):
        default = getattr(defaults, f.name)
        kind = str(f.type)
        help_text = HELP.get(f.name, "") + f" (default: {default!r}; env {ENV_PREFIX}{f.name})"
        if "bool" in kind:
            parser.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        elif "int" in kind:
            parser.add_argument(_flag(f.name), dest=f.name, type=int, default=None, help=help_text)
        else:
            parser.add_argument(_flag(f.name), dest=f.name, default=None, help=help_text)


def params_from_args(args: argparse.Namespace) -> Params:
    """Defaults, then GRADCAM_* environment variables, then command-line flags."""
    params = Params().with_env(__import__("os").environ)
    given = {}
    for f in fields(Params):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        kind = str(f.type)
        if isinstance(value, str) and ("dict" in kind or "list" in kind):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = [v.strip() for v in value.split(",") if v.strip()]
        given[f.name] = value
    return Params(**{**params.to_dict(), **given})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m helpers",
        description="Why does my image classifier confuse these classes? Grad-CAM confusion analysis.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    analyze = sub.add_parser("analyze", help="run the whole analysis and write every output",
                             description="Run the analysis headless; same parameters as the notebook.")
    _add_params(analyze)
    analyze.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: typing.Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "analyze":
            from .pipeline import Analysis
            start = time.perf_counter()
            an = Analysis(params_from_args(args), progress=not args.quiet)
            an.run_all()
            print(f"Accuracy {an.preds.accuracy:.2%}; outputs in {an.out.resolve()} "
                  f"({time.perf_counter() - start:.1f} s). Open {an.out / 'index.html'}.")
    except SuiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
