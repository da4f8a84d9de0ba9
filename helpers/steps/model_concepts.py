"""Contrastive concepts for the confused group: the CAM target layer's activations of the group's images
factorised by NMF into K concepts (compute/concepts.py), each concept shown by its most activating patches
(plots/concepts.py), and per confused pair A → B which concepts carry the logit margin z_B − z_A that moves A
images to B. Writes `deep_dive/concepts.png` and `deep_dive/concept_margins.csv`.

Concepts are numbered from 1 in every output. Exact for a GAP→Linear head (margin = Σ c_k + residual + offset,
offset = b_B − b_A); gradient × activation per concept otherwise, marked approximate wherever shown.
"""
from __future__ import annotations

import dataclasses

import html
import time
from dataclasses import dataclass, field
from typing import Optional

import cv2
import numpy as np
import pandas as pd
import torch

from helpers.compute import concepts as C
from helpers.files.png import preview_data_uri
from helpers.model.cam_store import kept_maps, tail_layer_values
from helpers.model.cams import forward_with_activations, gap_linear_head
from helpers.plots.concepts import ConceptRow, plot_concept_patches
from helpers.steps.confusion import Confusion
from helpers.steps.context import Run, Section
from helpers.steps.deep_dive import DeepDive

SUB = "deep_dive"
CSV, PNG = f"{SUB}/concept_margins.csv", f"{SUB}/concepts.png"
MAX_IMAGES = 2000             # group images analysed: every in-group error, then a seeded sample of the rest
MAX_ACT_BYTES = 512 << 20     # and no more than this many bytes of float32 activations
# Large images (run.large_images): this many, half of them in-group errors when there are more. The forward pass
# over 300 group images took 15.8 s of a 2,000-image 224 px ResNet-18 run whose inference pass took 77 s.
LARGE_MAX_IMAGES = 120
MAX_PAIRS = 6                 # confused pairs reported (most errors first)
MIN_PAIR_ERRORS = 3
MAX_CORRECT = 500             # correctly classified A (and B) images per pair (seeded sample)
N_PATCHES = 6
BATCH = 256
APPROX = "approximate (gradient × activation; the head is not GAP→Linear)"


@dataclass(kw_only=True)
class Concepts(Section):
    title: str = "Contrastive concepts of the confused group"
    k: int = 0
    k_how: str = ""                                   # how K was chosen, as a sentence
    explained: dict = field(default_factory=dict)     # K tried -> share of the activations' energy explained
    exact: bool = False                               # GAP→Linear exact split (else gradient × activation)
    head_note: str = ""                               # why the split is approximate ("" when exact)
    layer: str = ""
    group: list[int] = field(default_factory=list)
    images: np.ndarray = None                         # test-set indices analysed (sorted)
    patches: dict = field(default_factory=dict)       # concept (1..K) -> list[PatchBox], strongest first
    pairs: pd.DataFrame = None                        # per pair, see concepts_step
    margins: pd.DataFrame = None                      # per pair x image (errors and correct A images)
    seconds: float = 0.0


def _select(run: Run, group: list[int], seed: int, cap: int, max_error_share: float = 1.0
            ) -> tuple[np.ndarray, list[str]]:
    """The group's images (true class in the group): all of them up to `cap`, else every in-group error (up to
    cap * max_error_share while the rest can fill the remainder) and a seeded sample of the rest."""
    pr = run.preds
    in_group = np.isin(pr.labels, group)
    errors = np.flatnonzero(in_group & np.isin(pr.preds, group) & (pr.preds != pr.labels))
    rest = np.setdiff1d(np.flatnonzero(in_group), errors)
    if len(errors) + len(rest) <= cap:
        return np.flatnonzero(in_group), []
    rng = np.random.default_rng(seed)
    max_errors = max(int(cap * max_error_share), cap - len(rest))
    if len(errors) > max_errors:
        errors = rng.choice(errors, max_errors, replace=False)
    take = rng.choice(rest, cap - len(errors), replace=False) if cap > len(errors) else []
    note = (f"Concepts: {cap} of the {int(in_group.sum())} group images ({len(errors)} in-group errors and a "
            f"seeded sample of the rest).")
    return np.sort(np.concatenate([errors, np.asarray(take, np.int64)])), [note]


def _image_cap(run: Run, engine) -> int:
    """MAX_IMAGES, or fewer where one image's activations are large (MAX_ACT_BYTES in all)."""
    _, a = forward_with_activations(engine.model, engine.layer, run.inputs[:1].to(engine.device))
    a = _as_map(engine, a)
    cap = LARGE_MAX_IMAGES if run.large_images else MAX_IMAGES
    return int(max(1, min(cap, MAX_ACT_BYTES // (4 * a[0].numel()))))


def _as_map(engine, a: torch.Tensor) -> torch.Tensor:
    """The layer's output as (N, C, h, w): token layers through the engine's own reshape transform (ViTs)."""
    return engine.reshape_transform(a) if engine.reshape_transform is not None else a


def _activations(run: Run, engine, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Target-layer maps (n, C, h, w) and logits of test images idx: the fast path's maps the inference pass kept
    (with the pass's logits), then, for the rest, the torch.fx tail from its kept inputs where one exists, or a
    forward pass."""
    from tqdm.auto import tqdm
    held, maps = kept_maps(run.cams, idx)
    rest = idx[~held]
    acts, logits = [], []
    for s in tqdm(range(0, len(rest), BATCH), desc="Concept activations", unit="batch", disable=not run.progress):
        tail = tail_layer_values(run.cams, rest[s:s + BATCH])   # the tail from the pass's kept inputs
        if tail is not None:
            acts.append(tail[0])
            logits.append(tail[2])
            continue
        x = run.inputs[torch.as_tensor(rest[s:s + BATCH])].to(engine.device)
        lg, a = forward_with_activations(engine.model, engine.layer, x)
        acts.append(_as_map(engine, a).float().cpu().numpy())
        logits.append(lg.float().cpu().numpy())
    if maps is None:
        return np.concatenate(acts), np.concatenate(logits)
    out_acts = np.empty((len(idx),) + maps.shape[1:], np.float32)
    out_logits = np.empty((len(idx), run.preds.logits.shape[1]), np.float32)
    out_acts[held], out_logits[held] = maps, run.preds.logits[idx[held]]
    if len(rest):
        out_acts[~held], out_logits[~held] = np.concatenate(acts), np.concatenate(logits)
    return out_acts, out_logits


def _pair_list(conf: Confusion, group: list[int]) -> list[tuple[int, int, int]]:
    cm = np.asarray(conf.cm)
    out = [(int(cm[a, b]), a, b) for a in group for b in group if a != b and cm[a, b] >= MIN_PAIR_ERRORS]
    return [(a, b, n) for n, a, b in sorted(out, key=lambda t: (-t[0], t[1], t[2]))[:MAX_PAIRS]]


def concepts_step(run: Run, conf: Confusion, deep: Optional[DeepDive]) -> Concepts:
    """Factorise the confused group's target-layer activations into K concepts and split each confused pair's
    logit margins over them. `pairs` columns: true_id, pred_id, pair, n_errors, n_correct_true, mean_margin
    (z_B − z_A over the errors), top_concept (1..K, the largest share), top_share, top_gap_share (the top
    concept's part of the margin gap between the errors and the correct A images; the bias cancels in it),
    share_c1..share_cK, share_residual, share_offset (shares of the mean error margin; they sum to 1),
    correct_c1..correct_cK (mean contribution, in logits, in the correctly classified A images),
    strength_in_pred_class (the top concept's mean amount in correctly classified B images / in the A errors),
    exact. `margins`: per pair and image
    (role "error" or "correct"): margin, c1..cK, residual, offset."""
    start = time.perf_counter()
    if deep is None:
        return Concepts(notes=["Concepts: not measured (the deep dive, which finds the group, did not run)."])
    group = [int(g) for g in deep.group.group]
    sec = Concepts(group=group)
    if run.cams is None:
        sec.notes.append("Concepts: not measured (no CAM engine, so no target layer, in this run).")
        return sec
    engine = run.cams.engine()
    linear, why = gap_linear_head(engine.model, engine.layer, engine.input_shape, engine.num_classes)
    sec.exact, sec.head_note, sec.layer = linear is not None, ("" if linear is not None else why), engine.layer_name
    idx, notes = _select(run, group, run.params.SEED, _image_cap(run, engine), 0.5 if run.large_images else 1.0)
    sec.notes += notes
    if not len(idx):   # GROUP_CLASSES that a LIMIT left without test images
        sec.notes.append("Concepts: not measured (no test images of the group's classes).")
        return sec
    with run.model_threads():
        acts, logits = _activations(run, engine, idx)
    factors = C.factorise(acts, seed=run.params.SEED)
    sec.k, sec.k_how, sec.explained, sec.images = factors.k, factors.how, factors.explained, idx
    labels, preds = run.preds.labels[idx], run.preds.preds[idx]
    rng = np.random.default_rng(run.params.SEED)
    pair_rows, margin_rows = [], []
    for a, b, _ in _pair_list(conf, group):
        err = np.flatnonzero((labels == a) & (preds == b))
        ok = np.flatnonzero((labels == a) & (preds == a))
        if len(ok) > MAX_CORRECT:
            ok = np.sort(rng.choice(ok, MAX_CORRECT, replace=False))
        if not len(err):
            continue
        rows = np.concatenate([err, ok])
        t, q = np.full(len(rows), a), np.full(len(rows), b)
        split = (C.gap_linear_split(acts[rows], factors, linear.weight.detach().float().cpu().numpy(),
                                    None if linear.bias is None else linear.bias.detach().float().cpu().numpy(),
                                    t, q, logits[rows], rows) if linear is not None
                 else _gradient_split(run, engine, factors, idx, rows, t, q))
        ok_b = (labels == b) & (preds == b)
        pair_rows.append(_pair_row(run, factors, split, a, b, len(err), ok_b, err))
        margin_rows.append(_margin_rows(split, idx[rows], len(err), a, b, run.names))
    sec.pairs = pd.DataFrame(pair_rows, columns=_pair_columns(factors.k))
    sec.margins = (pd.concat(margin_rows, ignore_index=True) if margin_rows
                   else pd.DataFrame(columns=_margin_columns(factors.k)))
    for k in range(factors.k):
        sec.patches[k + 1] = [dataclasses.replace(p, concept=k + 1)
                              for p in C.top_patches(factors.amounts, idx, k, N_PATCHES, tuple(run.inputs.shape[-2:]))]
    run.outputs.save_csv(_csv_table(sec), SUB, "concept_margins.csv")
    fig = plot_concept_patches(_rows(run, sec, factors, idx), title=_figure_title(sec))
    sec.figures["concepts"] = fig
    run.outputs.save_figure(fig, SUB, "concepts.png")
    sec.files += [CSV, PNG]
    sec.notes += summary_lines(sec)
    sec.seconds = time.perf_counter() - start
    return sec


def _gradient_split(run: Run, engine, factors: C.Factors, idx, rows, t, q) -> C.MarginSplit:
    parts = []
    for s in range(0, len(rows), BATCH):
        r = rows[s:s + BATCH]
        tail = tail_layer_values(run.cams, idx[r], t[s:s + BATCH], q[s:s + BATCH])   # through the tail only
        if tail is not None:
            a, g, lg = tail
        else:
            x = run.inputs[torch.as_tensor(idx[r])].to(engine.device)
            a, g, lg = C.margin_gradients(engine.model, engine.layer, x, t[s:s + BATCH], q[s:s + BATCH],
                                          engine.reshape_transform)
        parts.append(C.gradient_split(a, g, factors, t[s:s + BATCH], q[s:s + BATCH], lg, r))
    return C.MarginSplit(contributions=np.concatenate([p.contributions for p in parts]),
                         residual=np.concatenate([p.residual for p in parts]),
                         offset=np.concatenate([p.offset for p in parts]),
                         margin=np.concatenate([p.margin for p in parts]), exact=False)


def _pair_columns(k: int) -> list[str]:
    return (["true_id", "pred_id", "pair", "n_errors", "n_correct_true", "mean_margin", "top_concept", "top_share",
             "top_gap_share"]
            + [f"share_c{j + 1}" for j in range(k)] + ["share_residual", "share_offset"]
            + [f"correct_c{j + 1}" for j in range(k)] + ["strength_in_pred_class", "exact"])


def _margin_columns(k: int) -> list[str]:
    return (["true_id", "pred_id", "pair", "index", "role", "margin"] + [f"c{j + 1}" for j in range(k)]
            + ["residual", "offset", "exact"])


def _pair_row(run: Run, factors: C.Factors, split: C.MarginSplit, a: int, b: int, n_err: int, ok_b: np.ndarray,
              err: np.ndarray) -> list:
    e, c = slice(0, n_err), slice(n_err, None)
    mean_margin = float(split.margin[e].mean())
    shares = split.contributions[e].mean(0) / mean_margin
    top = int(np.argmax(shares))
    errors = np.zeros(len(ok_b), bool)
    errors[err] = True
    correct = (split.contributions[c].mean(0) if split.contributions[c].shape[0]
               else np.full(factors.k, np.nan))
    # against the correct A images: the margin gap (errors minus correct) and the top concept's part of it; the
    # bias difference is the same for both, so it cancels exactly
    gap = mean_margin - float(split.margin[c].mean()) if split.margin[c].shape[0] else float("nan")
    gap_share = float((split.contributions[e, top].mean() - correct[top]) / gap) if np.isfinite(gap) else gap
    return ([a, b, f"{run.names[a]} → {run.names[b]}", n_err, int(split.margin[c].shape[0]), mean_margin, top + 1,
             float(shares[top]), gap_share] + [float(v) for v in shares]
            + [float(split.residual[e].mean() / mean_margin), float(split.offset[e].mean() / mean_margin)]
            + [float(v) for v in correct] + [C.strength_ratio(factors.amounts, ok_b, errors, top), split.exact])


def _margin_rows(split: C.MarginSplit, images: np.ndarray, n_err: int, a: int, b: int, names) -> pd.DataFrame:
    k = split.contributions.shape[1]
    df = pd.DataFrame({"true_id": a, "pred_id": b, "pair": f"{names[a]} → {names[b]}", "index": images,
                       "role": np.where(np.arange(len(images)) < n_err, "error", "correct"), "margin": split.margin})
    for j in range(k):
        df[f"c{j + 1}"] = split.contributions[:, j]
    df["residual"], df["offset"], df["exact"] = split.residual, split.offset, split.exact
    return df


def _csv_table(sec: Concepts) -> pd.DataFrame:
    """The per-image margins with the pair summaries as rows of role "pair mean" (shares in the c columns)."""
    summary = pd.DataFrame({"true_id": sec.pairs["true_id"], "pred_id": sec.pairs["pred_id"],
                            "pair": sec.pairs["pair"], "index": -1, "role": "share of mean error margin",
                            "margin": sec.pairs["mean_margin"], "exact": sec.pairs["exact"]})
    for j in range(sec.k):
        summary[f"c{j + 1}"] = sec.pairs[f"share_c{j + 1}"]
    summary["residual"], summary["offset"] = sec.pairs["share_residual"], sec.pairs["share_offset"]
    return pd.concat([summary[_margin_columns(sec.k)], sec.margins[_margin_columns(sec.k)]], ignore_index=True)


def _concept_title(sec: Concepts, k: int) -> str:
    tops = sec.pairs[sec.pairs["top_concept"] == k] if len(sec.pairs) else sec.pairs
    where = "; ".join(f"{r.top_share:.0%} of the {r.pair} margin" for r in tops.itertuples())
    return f"concept {k}" + (f": carries {where}" if where else "") + ("" if sec.exact else " (approximate)")


def _rows(run: Run, sec: Concepts, factors: C.Factors, idx: np.ndarray) -> list[ConceptRow]:
    pos = {int(i): n for n, i in enumerate(idx)}
    h, w = run.inputs.shape[-2:]
    rows = []
    for k, boxes in sec.patches.items():
        scale = max(float(factors.amounts[..., k - 1].max()), 1e-12)   # one scale per concept: patches compare
        crops, heats, caps = [], [], []
        for p in boxes:
            amount = factors.amounts[pos[p.image], :, :, k - 1].astype(np.float32) / scale
            heat = cv2.resize(amount, (int(w), int(h)), interpolation=cv2.INTER_LINEAR)
            crops.append(run.data.images[p.image][p.y0:p.y1, p.x0:p.x1])
            heats.append(heat[p.y0:p.y1, p.x0:p.x1])
            t, q = int(run.preds.labels[p.image]), int(run.preds.preds[p.image])
            caps.append(f"#{p.image} {run.names[t]}" + ("" if t == q else f"→{run.names[q]}"))
        rows.append(ConceptRow(title=_concept_title(sec, k), crops=crops, heats=heats, captions=caps))
    return rows


def _figure_title(sec: Concepts) -> str:
    how = "exact split (GAP→Linear head)" if sec.exact else APPROX
    return f"Concepts of the confused group: K={sec.k}, top {N_PATCHES} patches each; margins: {how}"


def _strength_words(r: float) -> str:
    if not np.isfinite(r):
        return "absent from the A errors" if r == np.inf else "not measurable in correctly classified B images"
    if 0.8 <= r <= 1.25:
        return f"as strong in correctly classified {{b}} images ({r:.2f}×)"
    return f"{r:.2f}× as strong in correctly classified {{b}} images"


def result_line(sec: Concepts, row) -> str:
    """'concept 3 (shown in deep_dive/concepts.png) carries 58% of the margin that moves Dress images to
    Trouser ...'."""
    a, b = row.pair.split(" → ", 1)
    line = (f"concept {row.top_concept} (shown in {PNG}) carries {row.top_share:.0%} of the mean margin that moves "
            f"{a} images to {b} ({row.n_errors} errors; {row.top_gap_share:.0%} of the margin gap between them and "
            f"the correctly classified {a} images); it is "
            + _strength_words(row.strength_in_pred_class).replace("{b}", b))
    correct = getattr(row, f"correct_c{row.top_concept}")
    if np.isfinite(correct):
        line += f"; in correctly classified {a} images it adds {correct:+.2f} to the margin on average"
    return line + ("" if row.exact else f" [{APPROX}]")


def summary_lines(sec: Concepts) -> list[str]:
    """Plain-English lines for analysis_summary.txt."""
    if sec.images is None:
        return [n for n in sec.notes if n.startswith("Concepts:")]
    how = ("exact: margin = Σ concepts + NMF residual + bias difference" if sec.exact
           else f"{APPROX}: {sec.head_note}")
    lines = [f"Contrastive concepts ({CSV}, {PNG}): {sec.k} NMF concepts of layer {sec.layer} over "
             f"{len(sec.images)} images of the group; {sec.k_how}. Margin split {how}."]
    if sec.pairs is None or not len(sec.pairs):
        lines.append(f"  No pair in the group has {MIN_PAIR_ERRORS} or more errors.")
        return lines
    lines += ["  " + result_line(sec, r) for r in sec.pairs.itertuples()]
    return lines


def index_section(run: Run, sec: Concepts) -> str:
    """HTML fragment for index.html: a row per pair and the patch sheet."""
    esc = html.escape
    if sec.images is None:
        return f"<h2>{esc(sec.title)}</h2>" + "".join(f"<p>{esc(n)}</p>" for n in sec.notes)
    mark = "" if sec.exact else f" <em>{esc(APPROX)}</em>"
    head = ("<tr><th>pair</th><th>errors</th><th>mean margin</th><th>top concept</th><th>share of margin</th>"
            "<th>in correct true-class images</th><th>strength in predicted class</th></tr>")
    body = "".join(
        f"<tr><td>{esc(r.pair)}</td><td>{r.n_errors}</td><td>{r.mean_margin:.2f}</td><td>{r.top_concept}</td>"
        f"<td>{r.top_share:.0%}{'' if r.exact else ' (approx.)'}</td>"
        f"<td>{getattr(r, f'correct_c{r.top_concept}'):+.2f}</td><td>{r.strength_in_pred_class:.2f}×</td></tr>"
        for r in sec.pairs.itertuples())
    run.outputs.flush()   # the PNG is written in the background
    uri = preview_data_uri(run.outputs.current(PNG))
    img = f'<p><img src="{uri}" alt="concept patches" style="max-width:100%"></p>' if uri else ""
    return (f"<h2>{esc(sec.title)}</h2><p>{esc(sec.k_how)}. Per confused pair A → B: the concept carrying the "
            f"largest share of the mean logit margin z_B − z_A of the errors{mark} "
            f'(<a href="{esc(CSV)}">{esc(CSV)}</a>).</p><table>{head}{body}</table>' + img)
