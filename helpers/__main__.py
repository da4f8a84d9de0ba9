"""Command line: `python -m helpers analyze ...` writes the same outputs as the notebook, without Jupyter."""
from __future__ import annotations

import argparse
import sys
import time
import typing
from dataclasses import fields

from helpers.config import ENV_PREFIX, Params, parse_structured
from helpers.errors import SuiteError

HELP = {
    "MODEL_PATH": "checkpoint file (state_dict, TorchScript, ...); default: the public CIFAR-100 ResNet-56",
    "ARCH": "resnet20/32/44/56/110, resnet18/34/50 (CIFAR stem), any torchvision.models name, "
            "timm:<name>, or path/to/model.py:ClassName",
    "MODEL_KWARGS": "JSON dict of constructor arguments for ARCH",
    "ALLOW_UNSAFE_PICKLE": "allow loading a full pickled model or a TorchScript file (executes code from the file)",
    "DATASET": "cifar100, cifar10, fashion_mnist, mnist or imagefolder",
    "DATA_ROOT": "folder holding the dataset (e.g. the parent of cifar-100-python/)",
    "DOWNLOAD": "download the dataset if missing",
    "LIMIT": "analyse only the first N test images",
    "MEAN": "normalisation mean, JSON list", "STD": "normalisation std, JSON list",
    "CONVERT_CHANNELS": "'rgb' to feed grayscale data to an RGB model, 'gray' for the reverse",
    "IMAGE_SIZE": "image folders: resize to this side or JSON [h, w]; default: the model's input size when its "
                  "config says (timm, torchvision), else their common size, else 32",
    "MIXED_PRECISION": "float16 autocast for the inference pass; default: on for CUDA only",
    "SUPERCLASS_MAP": "JSON {class: group} for datasets without superclasses",
    "OUTPUT_DIR": "where results are written",
    "DEVICE": "auto, cpu, cuda, cuda:N or mps",
    "CAM_METHOD": "gradcam, gradcam++, layercam, xgradcam, eigencam, scorecam, finercam or eigengradcam",
    "TARGET_LAYER": "dotted layer path such as layer4.1; default: automatic",
    "CLASS_GALLERIES": "per-class galleries to draw: 'all', or N for the N weakest classes",
    "GROUP_CLASSES": "comma-separated class names for the deep dive; default: found automatically",
    "EMBEDDING": "feature-space projection: auto (UMAP if installed, else t-SNE), umap or tsne",
    "FORCE_RECOMPUTE": "ignore the cache of an earlier identical run",
    "COMPARE_WITH": "a second checkpoint (same ARCH and data): also write the before/after comparison to "
                    "OUTPUT_DIR/compare/",
}


def _flag(name: str) -> str:
    return "--" + name.lower().replace("_", "-")


def _add_params(parser: argparse.ArgumentParser, skip: tuple = ()) -> None:
    defaults = Params()
    for f in fields(Params):
        if f.name in skip:
            continue
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
            value = parse_structured(f.name, value, "dict" in kind, _flag(f.name))
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
    comp = sub.add_parser(
        "compare", help="compare two checkpoints on the same test set (before/after re-training)",
        description="Evaluate checkpoints A and B on the same test set (each through its prediction cache) and "
                    "write OUTPUT_DIR/compare/: per-class accuracy deltas, confused pairs that got better or worse, "
                    "images fixed and broken with both models' CAMs, and the change in calibration error and in "
                    "the within-superclass error share.")
    comp.add_argument("checkpoint_a", help="checkpoint A, the baseline ('default' = the default ResNet-56)")
    comp.add_argument("checkpoint_b", help="checkpoint B, e.g. after re-training ('default' = the default ResNet-56)")
    comp.add_argument("--arch-b", default=None, help="ARCH of checkpoint B when it differs from --arch")
    comp.add_argument("--examples", type=int, default=8, help="images per fixed/broken gallery (default: 8)")
    comp.add_argument("--output", default=None, help="where to write the comparison (default: OUTPUT_DIR/compare)")
    _add_params(comp, skip=("MODEL_PATH", "COMPARE_WITH"))
    comp.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _checkpoint(text: str):
    return None if text.strip().lower() == "default" else text


def main(argv: typing.Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "analyze":
            from helpers.model import distributed
            from helpers.pipeline import Analysis
            start = time.perf_counter()
            params = params_from_args(args)
            world, device = distributed.start(params.DEVICE)   # torchrun: join the group; None in one process
            an = Analysis(Params(**{**params.to_dict(), "DEVICE": device}), progress=not args.quiet)
            if world is not None and not world.is_main:   # its shard of the inference pass, for rank 0
                an.predict()   # loads the model and the data once rank 0 has: one download, not one per rank
                return 0
            an.run_all()
            print(f"Accuracy {an.preds.accuracy:.2%}; outputs in {an.out.resolve()} "
                  f"({time.perf_counter() - start:.1f} s). Open {an.out / 'index.html'}.")
            if an.params.COMPARE_WITH:
                from helpers.compare import compare
                res = compare(an, an.params.COMPARE_WITH, progress=not args.quiet)
                print(f"Comparison with {an.params.COMPARE_WITH}: open {res.out / 'index.html'}.")
        elif args.command == "compare":
            from helpers.compare import compare
            start = time.perf_counter()
            params = params_from_args(args)
            a, b = _checkpoint(args.checkpoint_a), _checkpoint(args.checkpoint_b)
            if args.arch_b:
                b = Params(**{**params.to_dict(), "MODEL_PATH": b, "ARCH": args.arch_b})
            res = compare(a, b, params=params, output_dir=args.output, n_examples=args.examples,
                          progress=not args.quiet)
            s = res.summary
            print(f"Accuracy A {s['accuracy_a']:.2%} → B {s['accuracy_b']:.2%}; fixed {s['n_fixed']}, broken "
                  f"{s['n_broken']}; ECE {s['ece_a']:.4f} → {s['ece_b']:.4f} "
                  f"({time.perf_counter() - start:.1f} s). Open {res.out / 'index.html'}.")
    except SuiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.command == "analyze":
            from helpers.model import distributed
            distributed.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
