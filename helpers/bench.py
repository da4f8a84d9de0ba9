"""Benchmark: the full analysis against one inference pass and against a typical notebook pipeline.

    python -m helpers.bench --n 10000 --archs resnet56,resnet34 --out bench_results
    python -m helpers.bench --families all --n 10000 --imagefolder-n 2000 --rss-sizes 2000,20000

On a generated CIFAR-100-format test set of --n images, for each architecture it measures:

  (a) bare inference: one channels_last forward pass over the set (the floor);
  (b) the full analysis writing every output: Analysis(params).run_all(), what `python -m helpers analyze` runs;
  (c) a naive pipeline the way typical notebooks do it: NCHW inference, then one pytorch-grad-cam GradCAM call
      per image for the true and the predicted class of every class-gallery image (N_WORST worst and N_BEST
      best per class) and pair-gallery image, and one matplotlib figure per gallery file;
  (d) a cached re-run of (b) (same model, data and parameters; the cache written by (b) is reused).

--repeat N runs (a) and (b) N times, alternating, and keeps the fastest of each: on a shared machine noise
only ever adds time.

Each measurement runs in a fresh subprocess, so peak RSS (getrusage ru_maxrss) is that stage's own; times are
wall-clock seconds inside that process, after the interpreter has imported torch, pytorch-grad-cam and helpers
(the same module-level imports in every stage; what a step imports lazily is timed). resnet56 uses the
released CIFAR-100 weights when they are in the torch hub cache (TORCH_HOME), random weights otherwise; every
other architecture uses random weights (timing does not depend on them).

--families measures model families (helpers.bench_models.FAMILIES) in one run, one table row each (bare pass,
full analysis, b/a against its target, peak RSS; the steps of (b) for those over target): the CIFAR ResNets on
the generated set; fmnist_mlp, a flatten+MLP CNN trained for two epochs, on the first --n images of the real
Fashion-MNIST test set; tv_resnet18, tv_resnet50, vit_tiny and swin_tiny with random weights on a generated
224 px ImageFolder of --imagefolder-n images over 20 classes. For an image folder, (a) streams the files through a
DataLoader (decode, normalise, forward) with the analysis's worker count, the floor for an analysis that must
decode them too. --rss-sizes runs (b) of a tiny 224 px CNN on image folders of each size and compares the peak
RSS of the largest with the smallest (the target: less than 25% apart).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from helpers.bench_models import (DEFAULT_FAMILIES, FAMILIES, IMAGEFOLDER_CLASSES, RSS_FAMILY, SYSTEM_FASHION_MNIST_ROOT,
                                  Family, family, fmnist_checkpoint, prepare_imagefolder, random_checkpoint)

STAGES = ("a", "b", "c", "d")
STAGE_NAMES = {
    "a": "(a) bare channels_last inference",
    "b": "(b) full analysis, every output",
    "c": "(c) naive notebook pipeline",
    "d": "(d) cached re-run of (b)",
}
ARCH_NAMES = {name: fam.label for name, fam in FAMILIES.items()}
# The issue's targets (b/a at most: Family.target): c/b at least, d at most (seconds), RSS at most (MB), and how
# much higher the peak RSS on the largest --rss-sizes set may be than on the smallest.
TARGETS = {"resnet56": {"c/b": 3.0}, "resnet34": {"c/b": 1.6}}
MAX_RSS_GROWTH = 0.25
FMNIST_TEST_IMAGES = 10000
MAX_D_SECONDS = 10.0
MAX_RSS_MB = 3 * 1024
N_WORST, N_BEST, N_PAIRS, PAIR_EXAMPLES = 5, 3, 5, 6
RESULT_PREFIX = "BENCH_RESULT "


# ----------------------------------------------------------------------------- setup (parent process)

NUM_CLASSES = {"cifar100": 100, "cifar10": 10}


def prepare_data(folder: Path, n: int, dataset: str = "cifar100") -> Path:
    """A CIFAR-format test set of n generated images under folder (reused when it already matches)."""
    from helpers.data.synthetic import write_cifar10, write_cifar100
    stamp = folder / "bench_n.txt"
    if not (stamp.exists() and stamp.read_text().strip() == f"{dataset} {n}"):
        (write_cifar100 if dataset == "cifar100" else write_cifar10)(folder, n_test=n, seed=0)
        stamp.write_text(f"{dataset} {n}")
    return folder


def prepare_checkpoint(arch: str, folder: Path, num_classes: int = 100) -> tuple[Path, str]:
    """(checkpoint path, description): the released CIFAR-100 ResNet-56 when it is in the torch hub cache,
    else seeded random weights."""
    import torch

    from helpers.model.architectures import BUILTIN_ARCHS
    from helpers.model.load import DEFAULT_ARCH, default_model_cache_path
    if arch == DEFAULT_ARCH and num_classes == 100 and default_model_cache_path().exists():
        return default_model_cache_path(), "released CIFAR-100 weights"
    if arch not in BUILTIN_ARCHS:
        raise SystemExit(f"Unknown architecture {arch!r}; choose from {', '.join(BUILTIN_ARCHS)}.")
    path = folder / f"{arch}-{num_classes}-random.pt"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.save(BUILTIN_ARCHS[arch](num_classes=num_classes).state_dict(), path)
    return path, "random weights"


# ----------------------------------------------------------------------------- stages (child processes)

def _params(args, out: Path):
    from helpers.config import Params
    return Params(MODEL_PATH=str(args.ckpt), ARCH=args.arch, DATASET=args.dataset, DATA_ROOT=str(args.data),
                  DOWNLOAD=False, OUTPUT_DIR=str(out), DEVICE="cpu", BATCH_SIZE=args.batch_size, N_WORST=N_WORST,
                  N_BEST=N_BEST, N_PAIR_GALLERIES=N_PAIRS, PAIR_EXAMPLES=PAIR_EXAMPLES, EMBEDDING=args.embedding,
                  LIMIT=args.limit or None)


def _load(args):
    """Model and normalised inputs, loaded the way the analysis loads them."""
    from helpers.data.datasets import load_dataset
    from helpers.model.inference import to_tensor
    from helpers.model.load import load_model
    data = load_dataset(args.dataset, root=args.data, download=False, limit=args.limit or None)
    loaded = load_model(model_path=args.ckpt, arch=args.arch, num_classes=data.num_classes, device="cpu")
    return loaded.module, data, to_tensor(np.asarray(data.images), data.mean, data.std)


def _bare_batches(args):
    """(model, batches of normalised inputs, image count) for the bare pass. An image folder is streamed from
    its files through a DataLoader with the worker count the analysis's inference pass uses (decoding is part
    of the floor: the analysis must decode them too); the in-memory datasets are sliced from one tensor."""
    from helpers.bench_models import ImageFiles, image_batches
    from helpers.data.datasets import NORMALISATION, class_count
    from helpers.model.inference import loader_workers
    from helpers.model.load import load_model
    if args.dataset != "imagefolder":
        model, _, x = _load(args)
        return model, (x[s:s + args.batch_size] for s in range(0, len(x), args.batch_size)), len(x)
    loaded = load_model(model_path=args.ckpt, arch=args.arch, num_classes=class_count("imagefolder", args.data),
                        device="cpu")
    files = ImageFiles(Path(args.data), None, *NORMALISATION["imagefolder"], limit=args.limit or None)   # one size
    workers = loader_workers(len(files), args.batch_size)
    return loaded.module, image_batches(files, args.batch_size, workers), len(files)


def stage_bare(args) -> dict:
    """(a) The floor: one channels_last forward pass, nothing kept but the logits (for an image folder: the
    files decoded and normalised on the way, timed)."""
    import torch
    model, batches, n = _bare_batches(args)
    model = model.to(memory_format=torch.channels_last)
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            model(batch.contiguous(memory_format=torch.channels_last))
    return {"seconds": time.perf_counter() - start, "images": n}


def stage_analysis(args, fresh: bool) -> dict:
    """(b) / (d): the full analysis, as the CLI runs it."""
    import torch

    importlib.import_module("helpers.model.cams")   # module-level imports, incl. pytorch-grad-cam, as in (c): not timed
    from helpers.pipeline import Analysis
    out = Path(args.out_dir)
    if fresh and out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    an = Analysis(_params(args, out), progress=False)
    if args.threads:   # the same count as every other stage (the analysis halves it after inference)
        an.threads = args.threads
        torch.set_num_threads(args.threads)
    an.run_all()
    seconds = time.perf_counter() - start
    n_files = sum(1 for p in out.rglob("*") if p.is_file() and ".cache" not in p.parts)
    return {"seconds": seconds, "images": len(an.data.labels), "cache_hit": an.cache_hit, "files": n_files,
            "threads": an.threads, "worker_rss_kb": an.outputs.writer.worker_peak_rss_kb,
            "cams_computed": an.cams.n_computed, "cams_from_inference_pass": an.cams.n_from_activations,
            "cam_path": an.cams.engine().path, "steps": {k: round(v, 2) for k, v in an.timings.items()}}


def stage_naive(args) -> dict:
    """(c) What a typical notebook does: NCHW inference, one GradCAM call per image and class, one
    matplotlib figure per gallery file (saved with savefig defaults)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from helpers.compute import metrics
    from helpers.model.layers import resolve_target_layer

    model, data, x = _load(args)
    out = Path(args.out_dir)
    if out.exists():
        shutil.rmtree(out)
    (out / "worst_predictions").mkdir(parents=True)
    start = time.perf_counter()
    logits = []
    with torch.no_grad():
        for s in range(0, len(x), args.batch_size):
            logits.append(model(x[s:s + args.batch_size]))
    probs = torch.softmax(torch.cat(logits), dim=1).numpy()
    preds, labels = probs.argmax(1), data.labels
    t_inference = time.perf_counter() - start
    _, layer = resolve_target_layer(model, None, tuple(x.shape[1:]))
    cam = GradCAM(model=model, target_layers=[layer])
    names = data.display_names
    n_calls = 0

    def cam_for(i: int, cls: int) -> np.ndarray:
        nonlocal n_calls
        n_calls += 1
        grayscale = cam(input_tensor=x[i:i + 1], targets=[ClassifierOutputTarget(int(cls))])[0]
        return show_cam_on_image(data.images[i].astype(np.float32) / 255.0, grayscale, use_rgb=True)

    def gallery(path: Path, title: str, rows: list[tuple[int, int]]) -> None:
        fig, axes = plt.subplots(max(len(rows), 1), 3, figsize=(9, 3 * max(len(rows), 1)), squeeze=False)
        for r, (i, true_cls) in enumerate(rows):
            pred_cls = int(preds[i])
            axes[r, 0].imshow(data.images[i])
            axes[r, 0].set_title(f"#{i} true {names[true_cls]} / pred {names[pred_cls]} ({probs[i, pred_cls]:.2f})",
                                 fontsize=8)
            axes[r, 1].imshow(cam_for(i, pred_cls))
            axes[r, 1].set_title(f"CAM pred: {names[pred_cls]}", fontsize=8)
            axes[r, 2].imshow(cam_for(i, true_cls))
            axes[r, 2].set_title(f"CAM true: {names[true_cls]}", fontsize=8)
        for ax in axes.ravel():
            ax.axis("off")
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)

    for cls in range(data.num_classes):
        worst, best = metrics.gallery_examples(labels, preds, probs, cls, N_WORST, N_BEST)   # as the analysis
        gallery(out / "worst_predictions" / f"class_{cls:03d}.png", f"Class {cls}: {names[cls]}",
                [(int(i), cls) for i in worst + best])
    cm = metrics.confusion_matrix(labels, preds, data.num_classes)
    np.fill_diagonal(cm, 0)
    for k, flat in enumerate(np.argsort(-cm, axis=None, kind="stable")[:N_PAIRS], start=1):
        t, q = divmod(int(flat), data.num_classes)
        idx = metrics.pair_examples(labels, preds, probs, t, q, PAIR_EXAMPLES)
        gallery(out / f"confused_pair_{k}.png", f"{names[t]} → {names[q]}", [(int(i), t) for i in idx])
    return {"seconds": time.perf_counter() - start, "inference_seconds": t_inference, "gradcam_calls": n_calls}


def run_stage(args) -> None:
    import torch

    from helpers.model.inference import default_threads
    torch.set_num_threads(args.threads or default_threads())   # the analysis chooses the same way
    result = {"a": stage_bare, "c": stage_naive}.get(args.stage)
    out = result(args) if result else stage_analysis(args, fresh=args.stage == "b")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    worker = out.pop("worker_rss_kb", 0) / 1024
    # Peak RSS: this process plus the analysis's figure worker (an upper bound on what both held at once).
    # DataLoader workers are forks sharing this process's pages, so they are not added: the largest child's
    # peak is reported on its own.
    out.update(peak_rss_mb=usage.ru_maxrss / 1024 + worker, process_rss_mb=usage.ru_maxrss / 1024,
               worker_rss_mb=worker, threads=out.get("threads", torch.get_num_threads()),
               children_rss_mb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
               cpu_seconds=usage.ru_utime + usage.ru_stime)
    print(RESULT_PREFIX + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- orchestration and report

@dataclass(frozen=True)
class Setup:
    """What one family's stages run on."""
    fam: Family
    dataset: str            # the load_dataset name
    data: Path
    ckpt: Path
    weights: str            # how the checkpoint's weights came about
    limit: Optional[int]    # LIMIT (the first images of a larger test set)
    tag: str                # names the output folders


def prepare_family(fam: Family, args, work: Path) -> Setup:
    """The data and checkpoint of one family, generated or trained once under `work` and reused."""
    checkpoints = work / "checkpoints"
    if fam.dataset == "cifar":
        ckpt, weights = prepare_checkpoint(fam.arch, checkpoints, NUM_CLASSES[args.dataset])
        return Setup(fam, args.dataset, prepare_data(work / "data", args.n, args.dataset), ckpt, weights, None, fam.name)
    if fam.dataset == "fashion_mnist":
        root = Path(args.fmnist_root)
        ckpt = fmnist_checkpoint(checkpoints, root, args.fmnist_train)
        return Setup(fam, "fashion_mnist", root, ckpt, f"trained 2 epochs on {args.fmnist_train} training images",
                     args.n if args.n < FMNIST_TEST_IMAGES else None, fam.name)
    n = args.imagefolder_n
    data = prepare_imagefolder(work / f"imagefolder_{n}", n)
    return Setup(fam, "imagefolder", data, random_checkpoint(fam, checkpoints, IMAGEFOLDER_CLASSES), "random weights",
                 None, fam.name)


def measure(setup: Setup, stage: str, out_dir: Path, args) -> dict:
    cmd = [sys.executable, "-m", "helpers.bench", "--stage", stage, "--arch", setup.fam.arch_string,
           "--ckpt", str(setup.ckpt), "--data", str(setup.data), "--out-dir", str(out_dir),
           "--batch-size", str(args.batch_size), "--dataset", setup.dataset, "--embedding", args.embedding,
           "--threads", str(args.threads or 0), "--limit", str(setup.limit or 0)]
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1])] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    process_seconds = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"Stage {stage} for {setup.tag} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["process_seconds"] = process_seconds   # including interpreter start, imports and loading
    return result


def run_order(stages: list[str], repeat: int = 1) -> list[str]:
    """(a) and (b) `repeat` times, alternating (a, b, a, b, ...), then (c) and (d) once. (d) comes after a (b)."""
    ab = [s for s in stages if s in ("a", "b")]
    return ab * max(1, repeat) + [s for s in stages if s in ("c", "d")]


def keep_fastest(best: Optional[dict], new: dict) -> dict:
    """The faster of two runs of one stage (as timeit: on a shared machine noise only ever adds time), with the
    seconds of every run in "runs" and the latest run itself in "last_run"."""
    runs = (best["runs"] if best else []) + [new["seconds"]]
    kept = dict(new if best is None or new["seconds"] < best["seconds"] else best)
    kept.pop("last_run", None)
    kept.update(runs=runs, last_run=new)
    return kept


def run_family(setup: Setup, stages: list[str], args, work: Path) -> dict:
    """Every stage of one family, each in a fresh process, printed as it finishes; the fastest run of each."""
    results: dict[str, dict] = {}
    label = setup.fam.label
    for stage in run_order(stages, args.repeat):
        out_dir = work / f"out_{setup.tag}_{'naive' if stage == 'c' else 'analysis'}"
        r = keep_fastest(results.get(stage), measure(setup, stage, out_dir, args))
        results[stage] = r
        r = r["last_run"]
        extra = f", cache hit: {r['cache_hit']}" if "cache_hit" in r else ""
        print(f"{label} ({setup.weights}) {STAGE_NAMES[stage]}: {r['seconds']:.1f} s, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB, CPU {r['cpu_seconds']:.1f} s, {r['threads']} threads, "
              f"whole process {r['process_seconds']:.1f} s{extra}", flush=True)
    rs = ratios(results)
    print(f"{label} ratios: " + ", ".join(f"{k} = {v:.2f}" for k, v in rs.items() if v is not None), flush=True)
    if "b" in results:
        b = results["b"]
        if args.repeat > 1:
            print("  every run (s): " + "; ".join(
                f"({s}) " + ", ".join(f"{x:.1f}" for x in results[s]["runs"]) for s in ("a", "b")
                if s in results) + " (the table keeps the fastest)", flush=True)
        print(f"  (b) steps (s, fastest run): {b['steps']}; CAM path: {b['cam_path']}; CAMs computed "
              f"{b['cams_computed']} ({b['cams_from_inference_pass']} from activations kept in the inference pass)",
              flush=True)
    return results


def _ratio(x: Optional[float], y: Optional[float]) -> Optional[float]:
    return x / y if x is not None and y else None


def ratios(res: dict) -> dict:
    sec = {s: res[s]["seconds"] for s in STAGES if s in res}
    return {"b/a": _ratio(sec.get("b"), sec.get("a")), "c/b": _ratio(sec.get("c"), sec.get("b")),
            "d/b": _ratio(sec.get("d"), sec.get("b"))}


def target(name: str, key: str) -> Optional[float]:
    """The issue's target for a ratio of a family: b/a at most, c/b at least; None when it sets none."""
    if key == "b/a":
        return FAMILIES[name].target if name in FAMILIES else None
    return TARGETS.get(name, {}).get(key)


def _check(name: str, key: str, value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    goal = target(name, key)
    if goal is None:
        return f"{value:.2f}"
    ok = value <= goal if key == "b/a" else value >= goal
    return f"{value:.2f} ({'≤' if key == 'b/a' else '≥'} {goal:g} {'✓' if ok else '✗'})"


def markdown_table(results: dict[str, dict], n: int) -> str:
    """Stages as rows, architectures as columns (the CIFAR ResNets of --archs)."""
    archs = list(results)
    head = "| | " + " | ".join(f"{ARCH_NAMES.get(a, a)}: time (s) | peak RSS (MB)" for a in archs) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(archs)]
    for s in STAGES:
        cells = []
        for a in archs:
            r = results[a].get(s)
            cells += [f"{r['seconds']:.1f}", f"{r['peak_rss_mb']:.0f}"] if r else ["n/a", "n/a"]
        lines.append(f"| {STAGE_NAMES[s]} | " + " | ".join(cells) + " |")
    for key in ("b/a", "c/b", "d/b"):
        cells = []
        for a in archs:
            cells += [_check(a, key, ratios(results[a])[key]), ""]
        lines.append(f"| ratio {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def families_table(results: dict[str, dict]) -> str:
    """One row per family: bare pass, full analysis, b/a against its target, peak RSS of both; (c) and (d)
    when they were measured."""
    extra = [s for s in ("c", "d") if any(s in res for res in results.values())]
    head = ["family", "images", "(a) bare pass (s)", "(b) full analysis (s)", "ratio b/a", "peak RSS (a) (MB)",
            "peak RSS (b) (MB)"] + [f"{STAGE_NAMES[s]} (s)" for s in extra]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]

    def cell(res: dict, stage: str, key: str, fmt: str) -> str:
        return format(res[stage][key], fmt) if stage in res else "n/a"

    for name, res in results.items():
        images = next((res[s]["images"] for s in ("a", "b") if s in res), "n/a")
        lines.append(f"| {ARCH_NAMES.get(name, name)} | {images} | {cell(res, 'a', 'seconds', '.2f')} | "
                     f"{cell(res, 'b', 'seconds', '.2f')} | {_check(name, 'b/a', ratios(res)['b/a'])} | "
                     f"{cell(res, 'a', 'peak_rss_mb', '.0f')} | {cell(res, 'b', 'peak_rss_mb', '.0f')} |"
                     + "".join(f" {cell(res, s, 'seconds', '.1f')} |" for s in extra))
    return "\n".join(lines)


def over_target_lines(results: dict[str, dict]) -> list[str]:
    """The steps of (b), in seconds, of every family over its b/a target: where the time goes."""
    lines = []
    for name, res in results.items():
        ratio, goal = ratios(res)["b/a"], target(name, "b/a")
        if ratio is not None and goal is not None and ratio > goal:
            steps = sorted(res["b"]["steps"].items(), key=lambda kv: -kv[1])
            lines.append(f"- {ARCH_NAMES.get(name, name)}: b/a {ratio:.2f} > {goal:g}; (b) steps (s): "
                         + ", ".join(f"{k} {v:.1f}" for k, v in steps))
    return lines


def rss_growth(rss: dict[int, dict]) -> Optional[float]:
    """How much higher the peak RSS of (b) is on the largest set than on the smallest (0.1 = 10% higher)."""
    if len(rss) < 2:
        return None
    return rss[max(rss)]["peak_rss_mb"] / rss[min(rss)]["peak_rss_mb"] - 1.0


def rss_table(rss: dict[int, dict]) -> str:
    lines = ["| images | (b) full analysis (s) | peak RSS (MB) | process (MB) | figure worker (MB) | largest child (MB) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for n, r in sorted(rss.items()):
        lines.append(f"| {n} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['process_rss_mb']:.0f} | "
                     f"{r['worker_rss_mb']:.0f} | {r['children_rss_mb']:.0f} |")
    growth = rss_growth(rss)
    if growth is not None:
        lines.append("")
        lines.append(f"Peak RSS at {max(rss)} images against {min(rss)}: {growth:+.1%} "
                     f"(target < {MAX_RSS_GROWTH:.0%} {'✓' if abs(growth) < MAX_RSS_GROWTH else '✗'})")
    return "\n".join(lines)


def summary_lines(results: dict[str, dict]) -> list[str]:
    lines = []
    for arch, res in results.items():
        d = res.get("d", {}).get("seconds")
        rss = max((r["peak_rss_mb"] for r in res.values()), default=0.0)
        lines.append(f"{ARCH_NAMES.get(arch, arch)}: d = {d:.1f} s ({'≤' if d <= MAX_D_SECONDS else '>'} "
                     f"{MAX_D_SECONDS:g} s), max peak RSS {rss:.0f} MB ({'≤' if rss <= MAX_RSS_MB else '>'} 3 GB)"
                     if d is not None else f"{ARCH_NAMES.get(arch, arch)}: d not measured")
    return lines


def _names(text: Optional[str], every: tuple[str, ...]) -> list[str]:
    names = [a.strip() for a in (text or "").split(",") if a.strip()]
    return list(every) if names == ["all"] else names


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10000,
                        help="test images of the CIFAR-format set and of Fashion-MNIST (default 10000)")
    parser.add_argument("--archs", help="comma-separated built-in architectures, one table column each "
                                        "(default resnet56,resnet34 when neither --families nor --rss-sizes is given)")
    parser.add_argument("--families", help=f"comma-separated model families, one table row each, or 'all' "
                                           f"({', '.join(DEFAULT_FAMILIES)}); known: {', '.join(FAMILIES)}")
    parser.add_argument("--imagefolder-n", type=int, default=2000,
                        help=f"images of the generated 224 px ImageFolder ({IMAGEFOLDER_CLASSES} classes; default 2000)")
    parser.add_argument("--rss-sizes", help="comma-separated image-folder sizes, e.g. 2000,20000: (b) of a tiny "
                                            "224 px CNN on each, and how far apart their peak RSS is")
    parser.add_argument("--fmnist-root", default=str(SYSTEM_FASHION_MNIST_ROOT),
                        help="folder with the Fashion-MNIST idx files (default Debian's dataset-fashion-mnist)")
    parser.add_argument("--fmnist-train", type=int, default=10000,
                        help="training images for fmnist_mlp's two epochs (default 10000)")
    parser.add_argument("--out", default="bench_results", help="working folder: data, checkpoints, outputs, results")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in every stage (default 0: the CPUs free when the benchmark starts, "
                             "chosen as the analysis chooses)")
    parser.add_argument("--stages", help="subset of the stages to run (default abcd with --archs, ab with --families)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run (a) and (b) this many times, alternating, and keep the fastest of each "
                             "(default 1; 3 steadies the ratios on a noisy machine)")
    parser.add_argument("--dataset", choices=sorted(NUM_CLASSES) + ["fashion_mnist", "imagefolder"], default="cifar100",
                        help="format of the generated CIFAR test set (default cifar100, 100 classes)")
    parser.add_argument("--embedding", choices=("auto", "umap", "tsne"), default="auto",
                        help="the analysis's EMBEDDING parameter (default auto: UMAP when installed)")
    # internal: one stage in this process
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--arch", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        run_stage(args)
        return 0
    if args.dataset not in NUM_CLASSES:
        parser.error(f"--dataset chooses the generated CIFAR format: {' or '.join(sorted(NUM_CLASSES))}")

    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    families = [family(f).name for f in _names(args.families, DEFAULT_FAMILIES)]
    rss_sizes = sorted({int(v) for v in _names(args.rss_sizes, ())})
    archs = [family(a).name for a in _names(args.archs or ("" if families or rss_sizes else "resnet56,resnet34"), ())]
    stages = [s for s in STAGES if s in (args.stages or ("ab" if families and not archs else "abcd"))]
    if "d" in stages and "b" not in stages:
        stages.insert(stages.index("d"), "b")   # (d) re-runs (b)'s cache
    load_before = os.getloadavg()
    if not args.threads:
        # One thread count for every stage, so that the ratios compare like with like: the CPUs free now,
        # chosen the way the analysis chooses (helpers.model.inference.default_threads).
        from helpers.model.inference import default_threads
        args.threads = default_threads()
    if args.embedding != "tsne" and ("b" in stages or rss_sizes):
        # UMAP's numba kernels compile once per environment (helpers.compute.jit_cache), not once per run: do it
        # here, unmeasured, so that (b) sees what every run after a user's first one sees.
        from helpers.compute.deep_dive import project_2d
        print("Warming up UMAP's numba cache (first time in an environment: ~15 s) ...", flush=True)
        project_2d(np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32), method=args.embedding)

    def run_all(names: list[str]) -> dict[str, dict]:
        out = {}
        for name in names:
            fam = FAMILIES[name]
            what = {"cifar": f"{args.n} {args.dataset.upper()}-format test images",
                    "fashion_mnist": f"Fashion-MNIST ({min(args.n, FMNIST_TEST_IMAGES)} test images)",
                    "imagefolder": f"a {args.imagefolder_n}-image 224 px ImageFolder"}[fam.dataset]
            print(f"Preparing {fam.label}: {what} ...", flush=True)
            out[name] = run_family(prepare_family(fam, args, work), stages, args, work)
        return out

    results = run_all(archs)
    family_results = run_all([f for f in families if f not in archs])
    rss: dict[int, dict] = {}
    for n in rss_sizes:
        print(f"Preparing the RSS set: {n} images at 224 px ...", flush=True)
        setup = Setup(RSS_FAMILY, "imagefolder", prepare_imagefolder(work / f"imagefolder_{n}", n),
                      random_checkpoint(RSS_FAMILY, work / "checkpoints", IMAGEFOLDER_CLASSES), "random weights",
                      None, f"rss_{n}")
        rss[n] = measure(setup, "b", work / f"out_rss_{n}_analysis", args)
        print(f"RSS set {n} images, (b): {rss[n]['seconds']:.1f} s, peak RSS {rss[n]['peak_rss_mb']:.0f} MB", flush=True)
    load_after = os.getloadavg()

    print()
    print(f"n = {args.n} images (CIFAR, Fashion-MNIST), {args.imagefolder_n} (ImageFolder), {args.threads} torch "
          f"thread(s) in every stage, batch {args.batch_size}, (a) and (b) fastest of {max(1, args.repeat)}; "
          f"1-min load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    parts = []
    if results:
        parts.append(markdown_table(results, args.n))
        print(parts[-1])
        for line in summary_lines(results):
            print(line)
    if families:
        both = {f: (results.get(f) or family_results[f]) for f in families}
        parts.append(families_table(both))
        print(parts[-1])
        over = over_target_lines(both)
        if over:
            parts.append("Over target:\n\n" + "\n".join(over))
            print(parts[-1])
        family_results = both
    if rss:
        parts.append(rss_table(rss))
        print(parts[-1])
    (work / "bench_results.json").write_text(json.dumps(
        {"n": args.n, "imagefolder_n": args.imagefolder_n, "threads": args.threads, "batch_size": args.batch_size,
         "results": results, "families": family_results, "rss": {str(k): v for k, v in rss.items()}}, indent=2))
    (work / "bench_table.md").write_text("\n\n".join(parts) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
