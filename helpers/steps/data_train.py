"""Training-set evidence (opt-in: TRAIN_EVIDENCE, or TRAIN_ROOT for image folders): the training split is
loaded and one batched pass keeps its penultimate features; then, by cosine neighbours in that space, the training images
nearest to each error in the pair galleries, the training images of a confused class whose neighbours are
mostly the other class, and the test images that have a near-duplicate in the training set (candidates by
features, confirmed in pixel space)."""
from __future__ import annotations

import dataclasses
import html
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import pandas as pd

from helpers.compute import metrics
from helpers.compute import neighbours as nb
from helpers.data.datasets import Dataset, load_dataset
from helpers.errors import DataError
from helpers.files.png import preview_data_uri
from helpers.model import distributed
from helpers.model.inference import feature_pass
from helpers.plots.gallery import GalleryRow, render_gallery
from helpers.steps.confusion import Confusion
from helpers.steps.context import Run, Section

MAX_TRAIN_IMAGES: Optional[int] = None   # the first this many training images only (None: all); tests cap it
K_AMBIGUOUS = 10           # training neighbours that vote on whether a training image looks like the other class
N_NEIGHBOURS_SHOWN = 3     # nearest training images shown per class for each error
N_AMBIGUOUS_SHOWN = 4
N_DUPLICATES_SHOWN = 12
# Near-duplicates. Two searches propose training images for each test image: its 10 nearest by the model's
# features (centred cosine >= 0.8) and its 10 nearest by a shift-invariant pixel descriptor (a weak model's
# features move a copy shifted by 1 px behind its look-alikes: FashionCNN finds only ~60 of 100 planted copies
# among its 50 nearest). Pixels decide: mean absolute gray difference <= 3 of 255 after the best shift of up to
# 2 px, at the images' own size. On real Fashion-MNIST (tests/test_train_evidence.py prints the distributions)
# 100 planted copies (+-1 px, noise sd 3) measure <= 2.3, the real test images' closest training images 4.1 and
# more, bar two genuine duplicates (1.4 and 2.0).
DUP_FEATURE_MIN = 0.8
DUP_PIXEL_MAX = 3.0
DUP_CANDIDATES = 10        # training images each search proposes per test image


@dataclass
class ErrorNeighbours:
    """One error of a pair gallery and its nearest training images of the true and of the predicted class."""
    test_index: int
    true_train: list[int]
    true_similarity: list[float]
    pred_train: list[int]
    pred_similarity: list[float]


@dataclass(kw_only=True)
class TrainEvidence(Section):
    title: str = "Training-set evidence"
    search: str                          # which neighbour search ran (compute.neighbours TORCH_/FAISS_SEARCH)
    n_train: int                         # training images in the pass
    train_source: str                    # where they were read from
    load_seconds: float
    pass_seconds: float                  # the feature pass alone
    pass_processes: int                  # the processes that shared it (torchrun ranks; 1: this one alone)
    test_pass_seconds: Optional[float]   # the test inference pass, when the caller timed it
    pass_ratio: Optional[float]          # pass_seconds / test_pass_seconds
    peak_memory_mb: float                # peak resident memory added during the pass (the images already loaded)
    load_memory_mb: float                # ... and while loading the training split (what the images take)
    memory_how: str                      # how peak_memory_mb was measured
    features_mb: float                   # the training features kept (float16)
    pair_labels: list[str] = field(default_factory=list)                   # "A → B", top pairs in order
    pair_neighbours: dict[str, list[ErrorNeighbours]] = field(default_factory=dict)
    ambiguous: dict[str, int] = field(default_factory=dict)      # training images of A whose neighbours are mostly B
    ambiguous_examples: dict[str, list[int]] = field(default_factory=dict)
    near_duplicates: pd.DataFrame = field(default_factory=pd.DataFrame)
    duplicates_per_class: dict[str, int] = field(default_factory=dict)   # test class -> confirmed near-duplicates
    duplicates_per_pair: dict[str, int] = field(default_factory=dict)    # errors of pair A → B with a near-duplicate
    n_duplicate_candidates: int = 0      # test images proposed by the features, before the pixel check
    duplicate_candidates: pd.DataFrame = field(default_factory=pd.DataFrame)   # all of them, with pixel distances
    dup_feature_min: float = DUP_FEATURE_MIN
    dup_pixel_max: float = DUP_PIXEL_MAX
    class_counts: Optional[np.ndarray] = None   # training images per class


# ---------------------------------------------------------------------- loading and measuring
def _train_data(params, test: Dataset) -> tuple[Optional[Dataset], str]:
    """(the training split, "") or (None, why it is unavailable)."""
    p = params
    if test.name == "imagefolder" and not p.TRAIN_ROOT:
        return None, "DATASET='imagefolder' has no training split: set TRAIN_ROOT to the training image folder."
    root = p.TRAIN_ROOT or p.DATA_ROOT
    try:
        train = load_dataset(p.DATASET, root=root, download=p.DOWNLOAD, split="train", mean=test.mean, std=test.std,
                             limit=MAX_TRAIN_IMAGES, convert_channels=p.CONVERT_CHANNELS,
                             image_size=list(test.images.shape[1:3]) if test.name == "imagefolder" else None)
    except DataError as exc:
        return None, f"the training split could not be read ({exc})"
    if train.class_names != test.class_names:
        return None, (f"the training classes ({len(train.class_names)}) are not the test classes "
                      f"({len(test.class_names)}) in the same order")
    if train.images.shape[1:] != test.images.shape[1:]:
        return None, f"training images are {train.images.shape[1:]}, test images {test.images.shape[1:]}"
    return train, ""


@dataclass
class TrainPass:
    """The training split and its penultimate features (None: no final Linear), measured; `why` says why there
    is no training split. `processes`: the torchrun ranks that shared the feature pass (1: this process alone)."""
    train: Optional[Dataset]
    why: str
    load_seconds: float
    load_memory: dict
    features: Optional[np.ndarray] = None
    pass_seconds: float = 0.0
    memory: dict = field(default_factory=lambda: {"mb": 0.0, "how": ""})
    processes: int = 1

    @property
    def seconds(self) -> float:
        """Reading the split and the feature pass: what the test pass's timing leaves out under torchrun."""
        return self.load_seconds + self.pass_seconds


def load_train(params, test: Dataset) -> TrainPass:
    """The training split read (not yet passed through the model), timed and its memory measured."""
    start = time.perf_counter()
    with peak_memory() as mem:
        train, why = _train_data(params, test)
    return TrainPass(train=train, why=why, load_seconds=time.perf_counter() - start, load_memory=mem)


def run_train_pass(loaded: TrainPass, model, params, device, progress: bool, features=feature_pass,
                   processes: int = 1) -> TrainPass:
    """`loaded` with the penultimate features of its training images: `features` is
    helpers.model.inference.feature_pass, or distributed.sharded_features of it (every torchrun rank its shard)."""
    if loaded.train is None:
        return loaded
    start = time.perf_counter()
    with peak_memory() as mem:
        feats = features(model, loaded.train.images, loaded.train.mean, loaded.train.std,
                         batch_size=params.BATCH_SIZE, device=device, progress=progress)
    return dataclasses.replace(loaded, features=feats, pass_seconds=time.perf_counter() - start, memory=mem,
                               processes=processes)


def _rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@contextmanager
def peak_memory() -> Iterator[dict]:
    """Measures the peak resident memory added inside the block: {"mb": ..., "how": ...}. Linux: the resident
    size sampled every 5 ms from /proc/self/statm (torch's allocations included, which tracemalloc misses);
    elsewhere the growth of ru_maxrss (a lower bound: an earlier, higher peak hides it)."""
    result: dict = {}
    start = _rss_bytes()
    if start is None:
        import resource
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        yield result
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        scale = 1 if os.uname().sysname == "Darwin" else 1024   # bytes on macOS, KiB on Linux
        result.update(mb=(after - before) * scale / 2**20, how="ru_maxrss growth (a lower bound)")
        return
    peak, stop = [start], threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], _rss_bytes() or 0)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _rss_bytes() or 0)
        result.update(mb=(peak[0] - start) / 2**20, how="peak resident size sampled every 5 ms, minus the size before")


# ---------------------------------------------------------------------- pictures
def _tile_label(run: Run, train: Dataset, row: int, sim: float) -> str:
    return f"{run.names[int(train.labels[row])]} #{row} · {sim:.2f}"


def _pair_page(run: Run, train: Dataset, label: str, errors: list[ErrorNeighbours], amb_rows: np.ndarray,
               amb_share: np.ndarray, amb_nb: dict[int, tuple[np.ndarray, np.ndarray]], other: int):
    rows = [GalleryRow(image=run.data.images[e.test_index], title=run.conf_title(e.test_index), ok=False,
                       panels=[(_tile_label(run, train, r, s), train.images[r])
                               for r, s in list(zip(e.true_train, e.true_similarity))
                               + list(zip(e.pred_train, e.pred_similarity)) if r >= 0])
            for e in errors]
    amb = []
    for r, share in zip(amb_rows[:N_AMBIGUOUS_SHOWN], amb_share[:N_AMBIGUOUS_SHOWN]):
        idx, sims = amb_nb[int(r)]
        amb.append(GalleryRow(image=train.images[r], ok=None,
                              title=f"train #{int(r)} · labelled {run.names[int(train.labels[r])]} · "
                                    f"{share:.0%} of its {len(idx)} neighbours are {run.names[other]}",
                              panels=[(_tile_label(run, train, i, s), train.images[i])
                                      for i, s in list(zip(idx, sims))[:2 * N_NEIGHBOURS_SHOWN] if i >= 0]))
    return render_gallery(
        f"{label}: nearest training images", colour_bar=False,
        subtitle=(f"Each error, then its {N_NEIGHBOURS_SHOWN} nearest training images of the true class and "
                  f"{N_NEIGHBOURS_SHOWN} of the predicted class (class #index · cosine similarity of features)"),
        sections=[(f"{len(rows)} errors of the pair gallery", rows),
                  (f"{len(amb_rows)} training images of {label.split(' → ')[0]} whose {K_AMBIGUOUS} nearest "
                   f"training neighbours are mostly {run.names[other]}", amb)])


def _duplicates_page(run: Run, train: Dataset, dups: pd.DataFrame):
    rows = [GalleryRow(image=run.data.images[int(r.test_index)], ok=None if r.same_label else False,
                       title=(f"test #{int(r.test_index)} ({r.test_class}) ↔ train #{int(r.train_index)} "
                              f"({r.train_class}) · cosine {r.feature_similarity:.3f} · "
                              f"pixels {r.pixel_distance:.1f}"),
                       panels=[(f"train #{int(r.train_index)}", train.images[int(r.train_index)])])
            for r in dups.head(N_DUPLICATES_SHOWN).itertuples()]
    return render_gallery(f"Near-duplicates: {len(dups)} test images have one in the training set", colour_bar=False,
                          subtitle=(f"proposed by features or a shift-invariant pixel descriptor, confirmed by a mean "
                                    f"gray difference ≤ {DUP_PIXEL_MAX:g}/255 after the best shift of ≤ "
                                    f"{nb.MAX_SHIFT} px (red: the labels differ)"),
                          sections=[("test image, then its training near-duplicate", rows)])


def sharded_train_pass(params, test: Dataset, loaded, device, progress: bool,
                       timings: Optional[dict] = None) -> Optional[TrainPass]:
    """Under torchrun, when the training evidence is asked for: the training pass with every rank on its shard of
    the training images, right after the test pass, gathered on rank 0 (its seconds in `timings["train_pass"]`).
    The ranks run it only when every one of them read the training split (they read the same files). None in one
    process (data_causes runs it)."""
    world = distributed.current()
    if world is None or not (params.TRAIN_EVIDENCE or params.TRAIN_ROOT):
        return None
    with distributed.main_first(world, params.DOWNLOAD):   # one download into the shared folder, then the others read
        try:   # whatever fails here, every rank still reaches all_agree (else the others wait for it forever)
            split = load_train(params, test)
        except Exception as exc:
            split = TrainPass(train=None, why=f"the training split could not be read ({type(exc).__name__}: {exc})",
                              load_seconds=0.0, load_memory={"mb": 0.0, "how": ""})
    if not distributed.all_agree(world, split.train is not None):
        return split if split.train is None else dataclasses.replace(
            split, train=None, why="another torchrun process could not read the training split")
    done = run_train_pass(split, loaded.module, params, device, progress and world.is_main,
                          distributed.sharded_features(world, feature_pass), processes=world.world_size)
    if timings is not None:
        timings["train_pass"] = done.seconds
    return done


# ---------------------------------------------------------------------- the step
def train_evidence(run: Run, conf: Confusion, test_pass_s: Optional[float] = None) -> Optional[TrainEvidence]:
    """The training-set evidence section, or None when it was not asked for (TRAIN_EVIDENCE / TRAIN_ROOT) or
    cannot run (then it prints why). `test_pass_s`: the test inference pass's seconds, for the cost ratio."""
    sec, why = train_evidence_or_reason(run, conf, test_pass_s)
    if why:
        print(f"Training-set evidence skipped: {why}.")
    return sec


def train_evidence_or_reason(run: Run, conf: Confusion, test_pass_s: Optional[float] = None,
                             done: Optional[TrainPass] = None) -> tuple[Optional[TrainEvidence], str]:
    """(the section, "") ; (None, "") when not asked for; (None, why it could not run) when asked for. `done`: the
    training pass already run (under torchrun, by every rank right after the test pass), else it runs here."""
    p, pr = run.params, run.preds
    if not (p.TRAIN_EVIDENCE or p.TRAIN_ROOT):
        return None, ""
    if pr.features is None:
        return None, "the model has no final Linear, so no penultimate features"
    tp = done if done is not None else load_train(p, run.data)
    if done is None and tp.train is not None:
        tp = run_train_pass(tp, run.model.module, p, run.device, run.progress)
    train, feats = tp.train, tp.features
    if train is None or feats is None:
        return None, tp.why or "the model gave no penultimate features"
    sec = TrainEvidence(search="", n_train=len(train.labels), train_source=", ".join(train.source_files) or "",
                        pass_processes=tp.processes,
                        load_seconds=tp.load_seconds, pass_seconds=tp.pass_seconds, test_pass_seconds=test_pass_s,
                        pass_ratio=tp.pass_seconds / test_pass_s if test_pass_s else None,
                        peak_memory_mb=float(tp.memory["mb"]), load_memory_mb=float(tp.load_memory["mb"]),
                        memory_how=tp.memory["how"], features_mb=feats.nbytes / 2**20,
                        class_counts=np.bincount(train.labels, minlength=run.data.num_classes))
    # centred on the training mean: post-ReLU features all share one positive direction, which puts every
    # cosine near 1 and drowns the ranking (uncentred, a planted copy's original is often not in its top 5)
    centre = feats.astype(np.float32).mean(axis=0)
    feats = feats.astype(np.float32) - centre
    test_feats = pr.features - centre
    searches = set()
    _pairs(run, conf, train, feats, test_feats, sec, searches)
    _near_duplicates(run, conf, train, feats, test_feats, sec, searches)
    sec.search = " and ".join(sorted(searches))
    sec.notes += summary_lines(sec)
    return sec, ""


def _pairs(run: Run, conf: Confusion, train: Dataset, feats: np.ndarray, test_feats: np.ndarray, sec: TrainEvidence,
           searches: set) -> None:
    p, pr = run.params, run.preds
    top = [(int(r.true_id), int(r.pred_id)) for r in conf.pairs.head(p.N_PAIR_GALLERIES).itertuples()]
    sources = sorted({t for t, _ in top})
    # the k nearest training neighbours of every training image of a true class among the top pairs, once
    rows = np.flatnonzero(np.isin(train.labels, sources))
    found = nb.nearest(feats[rows], feats, K_AMBIGUOUS, exclude=rows)
    searches.add(found.search)
    where = {int(r): i for i, r in enumerate(rows)}
    for k, (t, q) in enumerate(top, start=1):
        label = f"{run.names[t]} → {run.names[q]}"
        idx = [int(i) for i in metrics.pair_examples(pr.labels, pr.preds, pr.probs, t, q, p.PAIR_EXAMPLES)]
        near_t = nb.nearest_in_class(test_feats[idx], feats, train.labels, t, N_NEIGHBOURS_SHOWN)
        near_q = nb.nearest_in_class(test_feats[idx], feats, train.labels, q, N_NEIGHBOURS_SHOWN)
        searches.update({near_t.search, near_q.search})
        errors = [ErrorNeighbours(test_index=i, true_train=near_t.index[j].tolist(),
                                  true_similarity=near_t.similarity[j].tolist(), pred_train=near_q.index[j].tolist(),
                                  pred_similarity=near_q.similarity[j].tolist()) for j, i in enumerate(idx)]
        mine = np.flatnonzero(train.labels[rows] == t)
        amb_rows, amb_share = nb.ambiguous_training(train.labels, found.index[mine], rows[mine], q)
        amb_nb = {int(r): (found.index[where[int(r)]], found.similarity[where[int(r)]])
                  for r in amb_rows[:N_AMBIGUOUS_SHOWN]}
        sec.pair_labels.append(label)
        sec.pair_neighbours[label] = errors
        sec.ambiguous[label] = int(len(amb_rows))
        sec.ambiguous_examples[label] = [int(r) for r in amb_rows[:N_AMBIGUOUS_SHOWN]]
        name = f"train_neighbours_{k}_{run.class_slug(t)}_to_{run.class_slug(q)}.png"
        img = _pair_page(run, train, label, errors, amb_rows, amb_share, amb_nb, q)
        run.outputs.save_figure(img, "deep_dive", name)
        sec.files.append(f"deep_dive/{name}")
        if k == 1:
            sec.figures[name] = img


def _near_duplicates(run: Run, conf: Confusion, train: Dataset, feats: np.ndarray, test_feats: np.ndarray,
                     sec: TrainEvidence, searches: set) -> None:
    pr, names = run.preds, run.names
    cand, search = nb.near_duplicate_candidates(test_feats, feats, run.data.images, train.images, DUP_FEATURE_MIN,
                                                k=DUP_CANDIDATES, pixel_k=DUP_CANDIDATES)
    searches.update(search.split(" and "))
    sec.n_duplicate_candidates, sec.duplicate_candidates = int(len(cand)), cand
    dups = cand[cand["pixel_distance"] <= DUP_PIXEL_MAX].copy()
    t_lab, tr_lab = pr.labels[dups["test_index"].to_numpy()], train.labels[dups["train_index"].to_numpy()]
    dups["test_class"] = [names[int(c)] for c in t_lab]
    dups["train_class"] = [names[int(c)] for c in tr_lab]
    dups["train_label"] = tr_lab.astype(np.int64)
    dups["predicted_class"] = [names[int(c)] for c in pr.preds[dups["test_index"].to_numpy()]]
    dups["same_label"] = t_lab == tr_lab
    dups = dups.sort_values(["pixel_distance", "test_index"], kind="stable").reset_index(drop=True)
    sec.near_duplicates = dups
    counts = np.bincount(t_lab, minlength=run.data.num_classes) if len(dups) else np.zeros(run.data.num_classes, int)
    sec.duplicates_per_class = {names[c]: int(n) for c, n in enumerate(counts) if n}
    wrong = pr.preds[dups["test_index"].to_numpy()]
    for r in conf.pairs.head(run.params.N_PAIR_GALLERIES).itertuples():
        sec.duplicates_per_pair[f"{names[int(r.true_id)]} → {names[int(r.pred_id)]}"] = int(
            ((t_lab == int(r.true_id)) & (wrong == int(r.pred_id))).sum())
    run.outputs.save_csv(dups, "deep_dive", "near_duplicates.csv")
    img = _duplicates_page(run, train, dups)
    run.outputs.save_figure(img, "deep_dive", "near_duplicates.png")
    sec.files += ["deep_dive/near_duplicates.csv", "deep_dive/near_duplicates.png"]
    sec.figures["near_duplicates.png"] = img


# ---------------------------------------------------------------------- text and the index page
def summary_lines(sec: TrainEvidence) -> list[str]:
    ratio = f", {sec.pass_ratio:.1f}× the test pass" if sec.pass_ratio is not None else ""
    shared = f" on {sec.pass_processes} torchrun processes" if sec.pass_processes > 1 else ""
    lines = [f"Training-set evidence: {sec.n_train} training images in {sec.pass_seconds:.1f} s{shared}{ratio} "
             f"(+{sec.load_seconds:.1f} s loading); peak memory +{sec.peak_memory_mb:.0f} MB in the pass, "
             f"+{sec.load_memory_mb:.0f} MB loading ({sec.memory_how}); "
             f"features {sec.features_mb:.1f} MB; search: {sec.search}",
             f"Near-duplicates of training images in the test set: {len(sec.near_duplicates)} "
             f"(of {sec.n_duplicate_candidates} with a proposed match; confirmed in pixel space)"
             + (f"; by class: {', '.join(f'{k} {v}' for k, v in sec.duplicates_per_class.items())}"
                if sec.duplicates_per_class else "")]
    for label in sec.pair_labels:
        lines.append(f"  {label}: {sec.ambiguous.get(label, 0)} training images of the true class with mostly "
                     f"predicted-class neighbours; errors with a near-duplicate: "
                     f"{sec.duplicates_per_pair.get(label, 0)}")
    return lines


def index_section(run: Run, sec: TrainEvidence) -> str:
    """HTML fragment for index.html: the numbers in short tables, and previews of the pictures."""
    esc = html.escape
    run.outputs.flush()
    rows = "".join(f"<tr><td>{esc(label)}</td><td>{sec.ambiguous.get(label, 0)}</td>"
                   f"<td>{sec.duplicates_per_pair.get(label, 0)}</td></tr>" for label in sec.pair_labels)
    by_class = "".join(f"<tr><td>{esc(k)}</td><td>{v}</td></tr>" for k, v in sec.duplicates_per_class.items())
    parts = [f"<h2>{esc(sec.title)}</h2>", "<p>" + "<br>".join(esc(line) for line in summary_lines(sec)[:2]) + "</p>",
             "<table><tr><th>pair</th><th>ambiguous training images</th><th>errors with a near-duplicate</th></tr>"
             f"{rows}</table>"]
    if by_class:
        parts.append(f"<table><tr><th>test class</th><th>near-duplicates</th></tr>{by_class}</table>")
    for rel in sec.files:
        if rel.endswith(".png"):
            uri = preview_data_uri(run.outputs.current(rel))
            if uri:
                parts.append(f'<p><a href="{esc(rel)}"><img src="{uri}" alt="{esc(rel)}" loading="lazy"></a></p>')
        else:
            parts.append(f'<p><a href="{esc(rel)}">{esc(rel)}</a></p>')
    return "\n".join(parts)
