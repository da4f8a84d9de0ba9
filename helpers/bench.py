"""Benchmark: the full analysis against one inference pass and against a typical notebook pipeline.

    python -m helpers.bench --n 10000 --archs resnet56,resnet34 --out bench_results

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
from pathlib import Path
from typing import Optional

STAGES = ("a", "b", "c", "d")
STAGE_NAMES = {
    "a": "(a) bare channels_last inference",
    "b": "(b) full analysis, every output",
    "c": "(c) naive notebook pipeline",
    "d": "(d) cached re-run of (b)",
}
ARCH_NAMES = {"resnet56": "ResNet-56", "resnet34": "ResNet-34-CIFAR", "resnet20": "ResNet-20", "resnet18": "ResNet-18-CIFAR"}
# The targets: b/a at most, c/b at least, d at most (seconds), RSS at most (MB).
TARGETS = {"resnet56": {"b/a": 1.5, "c/b": 3.0}, "resnet34": {"b/a": 1.3, "c/b": 1.6}}
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
                  N_BEST=N_BEST, N_PAIR_GALLERIES=N_PAIRS, PAIR_EXAMPLES=PAIR_EXAMPLES, EMBEDDING=args.embedding)


def _load(args):
    """Model and normalised inputs, loaded the way the analysis loads them."""
    from helpers.data.datasets import load_dataset
    from helpers.model.inference import to_tensor
    from helpers.model.load import load_model
    data = load_dataset(args.dataset, root=args.data, download=False)
    loaded = load_model(model_path=args.ckpt, arch=args.arch, num_classes=data.num_classes, device="cpu")
    return loaded.module, data, to_tensor(data.images, data.mean, data.std)


def stage_bare(args) -> dict:
    """(a) The floor: one channels_last forward pass, nothing kept but the logits."""
    import torch
    model, data, x = _load(args)
    model = model.to(memory_format=torch.channels_last)
    start = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(x), args.batch_size):
            model(x[s:s + args.batch_size].contiguous(memory_format=torch.channels_last))
    return {"seconds": time.perf_counter() - start}


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
    return {"seconds": seconds, "cache_hit": an.cache_hit, "files": n_files, "threads": an.threads,
            "worker_rss_kb": an.outputs.writer.worker_peak_rss_kb,
            "cams_computed": an.cams.n_computed, "cams_from_inference_pass": an.cams.n_from_activations,
            "cam_path": an.cams.engine().path, "steps": {k: round(v, 2) for k, v in an.timings.items()}}


def stage_naive(args) -> dict:
    """(c) What a typical notebook does: NCHW inference, one GradCAM call per image and class, one
    matplotlib figure per gallery file (saved with savefig defaults)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
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
    out.update(peak_rss_mb=usage.ru_maxrss / 1024 + worker, process_rss_mb=usage.ru_maxrss / 1024,
               worker_rss_mb=worker, threads=out.get("threads", torch.get_num_threads()),
               cpu_seconds=usage.ru_utime + usage.ru_stime)
    print(RESULT_PREFIX + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- orchestration and report

def measure(arch: str, stage: str, ckpt: Path, data: Path, out_dir: Path, args) -> dict:
    cmd = [sys.executable, "-m", "helpers.bench", "--stage", stage, "--arch", arch, "--ckpt", str(ckpt),
           "--data", str(data), "--out-dir", str(out_dir), "--batch-size", str(args.batch_size),
           "--dataset", args.dataset, "--embedding", args.embedding,
           "--threads", str(args.threads or 0)]
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1])] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    process_seconds = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"Stage {stage} for {arch} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
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


def _ratio(x: Optional[float], y: Optional[float]) -> Optional[float]:
    return x / y if x is not None and y else None


def ratios(res: dict) -> dict:
    sec = {s: res[s]["seconds"] for s in STAGES if s in res}
    return {"b/a": _ratio(sec.get("b"), sec.get("a")), "c/b": _ratio(sec.get("c"), sec.get("b")),
            "d/b": _ratio(sec.get("d"), sec.get("b"))}


def _check(arch: str, key: str, value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    target = TARGETS.get(arch, {}).get(key)
    if target is None:
        return f"{value:.2f}"
    ok = value <= target if key == "b/a" else value >= target
    return f"{value:.2f} ({'≤' if key == 'b/a' else '≥'} {target:g} {'✓' if ok else '✗'})"


def markdown_table(results: dict[str, dict], n: int) -> str:
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


def summary_lines(results: dict[str, dict]) -> list[str]:
    lines = []
    for arch, res in results.items():
        d = res.get("d", {}).get("seconds")
        rss = max((r["peak_rss_mb"] for r in res.values()), default=0.0)
        lines.append(f"{ARCH_NAMES.get(arch, arch)}: d = {d:.1f} s ({'≤' if d <= MAX_D_SECONDS else '>'} "
                     f"{MAX_D_SECONDS:g} s), max peak RSS {rss:.0f} MB ({'≤' if rss <= MAX_RSS_MB else '>'} 3 GB)"
                     if d is not None else f"{ARCH_NAMES.get(arch, arch)}: d not measured")
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10000, help="test images to generate (default 10000)")
    parser.add_argument("--archs", default="resnet56,resnet34",
                        help="comma-separated built-in architectures (default resnet56,resnet34)")
    parser.add_argument("--out", default="bench_results", help="working folder: data, checkpoints, outputs, results")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in every stage (default 0: the CPUs free when the benchmark starts, "
                             "chosen as the analysis chooses)")
    parser.add_argument("--stages", default="abcd", help="subset of the stages to run (default abcd)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run (a) and (b) this many times, alternating, and keep the fastest of each "
                             "(default 1; 3 steadies the ratios on a noisy machine)")
    parser.add_argument("--dataset", choices=sorted(NUM_CLASSES), default="cifar100",
                        help="format of the generated test set (default cifar100, 100 classes)")
    parser.add_argument("--embedding", choices=("auto", "umap", "tsne"), default="auto",
                        help="the analysis's EMBEDDING parameter (default auto: UMAP when installed)")
    # internal: one stage in this process
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--arch", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        run_stage(args)
        return 0

    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    stages = [s for s in STAGES if s in args.stages]
    if "d" in stages and "b" not in stages:
        stages.insert(stages.index("d"), "b")   # (d) re-runs (b)'s cache
    load_before = os.getloadavg()
    if not args.threads:
        # One thread count for every stage, so that the ratios compare like with like: the CPUs free now,
        # chosen the way the analysis chooses (helpers.model.inference.default_threads).
        from helpers.model.inference import default_threads
        args.threads = default_threads()
    print(f"Generating {args.n} {args.dataset.upper()}-format test images ...", flush=True)
    data = prepare_data(work / "data", args.n, args.dataset)
    if args.embedding != "tsne" and "b" in stages:
        # UMAP's numba kernels compile once per environment (helpers.compute.jit_cache), not once per run: do it
        # here, unmeasured, so that (b) sees what every run after a user's first one sees.
        import numpy as np

        from helpers.compute.deep_dive import project_2d
        print("Warming up UMAP's numba cache (first time in an environment: ~15 s) ...", flush=True)
        project_2d(np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32), method=args.embedding)
    results: dict[str, dict] = {}
    for arch in archs:
        ckpt, weights = prepare_checkpoint(arch, work / "checkpoints", NUM_CLASSES[args.dataset])
        results[arch] = {}
        for stage in run_order(stages, args.repeat):
            out_dir = work / f"out_{arch}_{'naive' if stage == 'c' else 'analysis'}"
            r = keep_fastest(results[arch].get(stage), measure(arch, stage, ckpt, data, out_dir, args))
            results[arch][stage] = r
            r = r["last_run"]
            extra = f", cache hit: {r['cache_hit']}" if "cache_hit" in r else ""
            print(f"{ARCH_NAMES.get(arch, arch)} ({weights}) {STAGE_NAMES[stage]}: {r['seconds']:.1f} s, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB, CPU {r['cpu_seconds']:.1f} s, {r['threads']} threads, "
                  f"whole process {r['process_seconds']:.1f} s{extra}",
                  flush=True)
        rs = ratios(results[arch])
        print(f"{ARCH_NAMES.get(arch, arch)} ratios: " + ", ".join(
            f"{k} = {v:.2f}" for k, v in rs.items() if v is not None), flush=True)
        if "b" in results[arch]:
            b = results[arch]["b"]
            if args.repeat > 1:
                print("  every run (s): " + "; ".join(
                    f"({s}) " + ", ".join(f"{x:.1f}" for x in results[arch][s]["runs"]) for s in ("a", "b")
                    if s in results[arch]) + " (the table keeps the fastest)", flush=True)
            print(f"  (b) steps (s, fastest run): {b['steps']}; CAM path: {b['cam_path']}; CAMs computed {b['cams_computed']} "
                  f"({b['cams_from_inference_pass']} from activations kept in the inference pass)", flush=True)
    load_after = os.getloadavg()
    table = markdown_table(results, args.n)
    print()
    print(f"n = {args.n} images, {args.threads} torch thread(s) in every stage, batch {args.batch_size}, "
          f"(a) and (b) fastest of {max(1, args.repeat)}; "
          f"1-min load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print(table)
    for line in summary_lines(results):
        print(line)
    (work / "bench_results.json").write_text(json.dumps(
        {"n": args.n, "threads": args.threads, "batch_size": args.batch_size, "results": results}, indent=2))
    (work / "bench_table.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
