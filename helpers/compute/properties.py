"""Which kinds of image go wrong: simple per-image properties (brightness, contrast, colourfulness, sharpness,
edge density, and where the CAM of the predicted class looks), and the tests that say which of them separate a
class's errors from its correctly classified images.

Pure functions over arrays: uint8 images (N, H, W, C) and min-max normalised CAMs (N, H, W) in, numbers and
DataFrames out. Images are processed in batches, so memory stays bounded whatever N is.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd
from scipy import stats

IMAGE_PROPERTIES = ("brightness", "contrast", "colourfulness", "sharpness", "edge_density")
SOURCE_PROPERTIES = ("original_size", "aspect_ratio")   # image folders: of the file, before resizing
TESTED_IMAGE_PROPERTIES = IMAGE_PROPERTIES + SOURCE_PROPERTIES
CAM_PROPERTIES = ("cam_area", "cam_border_share")
BATCH_BYTES = 64 << 20      # float32 working set per batch (about four copies of it are alive at once)
EDGE_THRESHOLD = 0.5        # Sobel magnitude (luminance in [0, 1]) counted as an edge: a step of 1/8 of full range
PEAK_QUANTILE = 0.99        # the structure properties see the luminance over this quantile of it (see _exposure_free)
CAM_AREA_LEVEL = 0.5        # share of the map's max above which a pixel counts as "looked at"
BORDER_FRACTION = 1 / 8     # the outer ring, as a share of each side: "looks at the background"
MIN_ERRORS = 5              # comparisons with fewer errors are skipped (recorded, not tested)
N_QUANTILES = 4
TIE = 0.05                  # |Cliff's delta| this close to the top one: reported as close behind

# ---------------------------------------------------------------------------------------------- properties


def _luminance(batch: np.ndarray) -> np.ndarray:
    """(n, H, W) luminance in [0, 1] (Rec. 601 weights for RGB)."""
    if batch.shape[-1] == 3:   # channel by channel: twice as fast as a float copy of the batch times (3,) weights
        return (batch[..., 0] * np.float32(0.299 / 255) + batch[..., 1] * np.float32(0.587 / 255)
                + batch[..., 2] * np.float32(0.114 / 255))
    return batch[..., 0].astype(np.float32) / np.float32(255.0)


def _exposure_free(y: np.ndarray) -> np.ndarray:
    """Luminance divided by its own 99th percentile (clipped to 1): contrast, sharpness and edge density are
    read from it, so they describe structure and not exposure. Read from the raw luminance, darkening an image
    x0.35 lowers all four at once and whichever of them happens to track the errors best wins: on real
    Fashion-MNIST with 30% of the Pullovers darkened, edge density (AUC 0.33) beat brightness (0.41) as the
    top property of Pullover's errors although only the darkening was planted. From this luminance the three
    do not see the darkening (AUC 0.45-0.55 for darkened against the rest) and brightness alone reports it."""
    peak = np.quantile(y.reshape(len(y), -1), PEAK_QUANTILE, axis=1).astype(np.float32)
    safe = np.where(peak > 0, peak, 1.0)[:, None, None]
    return np.minimum(y / safe, 1.0)


def _laplacian_var(y: np.ndarray) -> np.ndarray:
    """Variance of the 4-neighbour Laplacian over the interior (no border convention to argue about)."""
    if y.shape[1] < 3 or y.shape[2] < 3:
        return np.zeros(len(y), np.float64)
    lap = (y[:, :-2, 1:-1] + y[:, 2:, 1:-1] + y[:, 1:-1, :-2] + y[:, 1:-1, 2:] - 4 * y[:, 1:-1, 1:-1])
    return lap.reshape(len(y), -1).var(axis=1, dtype=np.float64)


def _edge_density(y: np.ndarray, threshold: float = EDGE_THRESHOLD) -> np.ndarray:
    """Share of interior pixels whose Sobel gradient magnitude exceeds `threshold`."""
    if y.shape[1] < 3 or y.shape[2] < 3:
        return np.zeros(len(y), np.float64)
    a, b, c = y[:, :-2], y[:, 1:-1], y[:, 2:]           # rows above, at, below
    row = a + 2 * b + c                                  # vertical smoothing for gx
    gx = row[:, :, 2:] - row[:, :, :-2]
    col = y[:, :, :-2] + 2 * y[:, :, 1:-1] + y[:, :, 2:]   # horizontal smoothing for gy
    gy = col[:, 2:] - col[:, :-2]
    mag2 = gx * gx   # the squared magnitude against the squared threshold: no square root (2x faster)
    mag2 += gy * gy
    return (mag2 > threshold * threshold).reshape(len(y), -1).mean(axis=1)


def _colourfulness(batch: np.ndarray) -> np.ndarray:
    """Hasler & Süsstrunk (2003) colourfulness on the 0..255 scale: std and mean of the opponent channels."""
    x = batch.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    rg = (r - g).reshape(len(x), -1)
    yb = (0.5 * (r + g) - b).reshape(len(x), -1)
    sigma = np.sqrt(rg.var(axis=1, dtype=np.float64) + yb.var(axis=1, dtype=np.float64))
    mu = np.sqrt(rg.mean(axis=1, dtype=np.float64) ** 2 + yb.mean(axis=1, dtype=np.float64) ** 2)
    return sigma + 0.3 * mu


def image_properties(images: np.ndarray, batch: Optional[int] = None, workers: Optional[int] = None
                     ) -> pd.DataFrame:
    """One row per image: brightness (mean luminance, 0..1), contrast (the std of the luminance over its 99th
    percentile), colourfulness (RGB only: gray images have no column), sharpness (variance of the Laplacian of
    that luminance) and edge density (share of Sobel edge pixels in it). Only brightness sees exposure: the
    structure properties are the same for an image and a darkened copy (see _exposure_free)."""
    if isinstance(images, (np.ndarray, list, tuple)):   # else decoded when sliced (FileImages): batch by batch
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
    rgb = images.shape[-1] == 3
    if batch is None:   # images per batch from their size: 2,000 CIFAR images, 85 at 224x224 RGB
        batch = max(1, BATCH_BYTES // (4 * int(np.prod(images.shape[1:]))))
    names = [k for k in IMAGE_PROPERTIES if rgb or k != "colourfulness"]

    def one_batch(s: int) -> dict[str, np.ndarray]:
        part = images[s:s + batch]   # FileImages decode here, in the worker thread (PIL releases the GIL)
        y = _luminance(part)
        yn = _exposure_free(y)
        out = {"brightness": y.reshape(len(y), -1).mean(axis=1, dtype=np.float64),
               "contrast": yn.reshape(len(yn), -1).std(axis=1, dtype=np.float64),
               "sharpness": _laplacian_var(yn), "edge_density": _edge_density(yn)}
        if rgb:
            out["colourfulness"] = _colourfulness(part)
        return out

    starts = range(0, len(images), batch)
    workers = max(1, min(len(starts), workers if workers is not None else min(4, os.cpu_count() or 1)))
    # NumPy releases the GIL in these loops: 2 threads took 2,000 224 px JPEGs from 11.9 s to ~6 s on 2 cores.
    with ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(one_batch, starts))
    return pd.DataFrame({k: (np.concatenate([p[k] for p in parts]) if parts else np.zeros(0)) for k in names})


def source_properties(sizes: np.ndarray) -> pd.DataFrame:
    """From (N, 2) original (height, width): original_size, the side of a square of the same pixel count
    (sqrt(h·w), so 100x400 and 200x200 are both 200), and aspect_ratio, width over height (> 1 = landscape)."""
    hw = np.asarray(sizes, np.float64).reshape(-1, 2)
    return pd.DataFrame({"original_size": np.sqrt(hw[:, 0] * hw[:, 1]), "aspect_ratio": hw[:, 1] / hw[:, 0]})


def border_width(side: int, fraction: float = BORDER_FRACTION) -> int:
    return max(1, int(round(side * fraction)))


def cam_properties(cams: np.ndarray, level: float = CAM_AREA_LEVEL,
                   fraction: float = BORDER_FRACTION) -> pd.DataFrame:
    """cam_area: share of pixels above `level` of the map's max; cam_border_share: share of the map's energy
    (sum) in the outer ring, `fraction` of each side wide. An all-zero map has neither (NaN)."""
    cams = np.asarray(cams, np.float64)
    n, h, w = cams.shape if cams.ndim == 3 else (0, 0, 0)
    if n == 0:
        return pd.DataFrame({k: np.zeros(0) for k in CAM_PROPERTIES})
    flat = cams.reshape(n, -1)
    peak = flat.max(axis=1)
    total = flat.sum(axis=1)
    bh, bw = border_width(h, fraction), border_width(w, fraction)
    inner = cams[:, bh:h - bh, bw:w - bw].reshape(n, -1).sum(axis=1) if h > 2 * bh and w > 2 * bw else 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        area = np.where(peak > 0, (flat > level * peak[:, None]).mean(axis=1), np.nan)
        border = np.where(total > 0, (total - inner) / total, np.nan)
    return pd.DataFrame({"cam_area": area, "cam_border_share": border})


# ---------------------------------------------------------------------------------------------- statistics
def auc_and_p(errors: np.ndarray, correct: np.ndarray) -> tuple[float, float]:
    """AUC = P(error's value > correct's value) + ½·P(tie) (the Mann-Whitney U of the errors over n1·n2) and
    the two-sided Mann-Whitney U p-value."""
    res = stats.mannwhitneyu(errors, correct, alternative="two-sided")
    return float(res.statistic) / (len(errors) * len(correct)), float(res.pvalue)


def cliffs_delta(auc: float) -> float:
    """P(error > correct) − P(error < correct), which is 2·AUC − 1."""
    return 2.0 * auc - 1.0


def bh_adjust(p: Sequence[float]) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (NaNs stay NaN and do not count as tests)."""
    p = np.asarray(p, np.float64)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = stats.false_discovery_control(p[ok], method="bh")
    return out


def quantile_bins(values: np.ndarray, q: int = N_QUANTILES) -> np.ndarray:
    """Quantile bin 0..q-1 of every value by rank (stable order), so ties never leave a bin empty."""
    n = len(values)
    order = np.argsort(values, kind="stable")
    bins = np.empty(n, np.int64)
    bins[order] = (np.arange(n) * q) // max(n, 1)
    return bins


@dataclass(frozen=True)
class Comparison:
    """Errors of true class `true` predicted as any of `preds`, against the correctly classified `true`."""
    kind: str                 # "pair" (A→B), "class" (A→any other class), "group" (A→the group's other classes)
    true: int
    preds: tuple[int, ...]

    def label(self, names: Sequence[str]) -> str:
        if self.kind == "class":
            return f"{names[self.true]} → any other class"
        if self.kind == "group":
            return f"{names[self.true]} → {'/'.join(names[c] for c in self.preds)} (group)"
        return f"{names[self.true]} → {names[self.preds[0]]}"


def comparisons(pairs: pd.DataFrame, group_ids: Optional[Iterable[int]], num_classes: int) -> list[Comparison]:
    """The comparisons to test: every top pair A→B, every true class of those pairs against all its errors,
    and, for the deep-dive group, each member against the errors into the group's other classes."""
    out: list[Comparison] = []
    for t, q in zip(pairs["true_id"].astype(int), pairs["pred_id"].astype(int)):
        out.append(Comparison("pair", int(t), (int(q),)))
    for t in dict.fromkeys(int(t) for t in pairs["true_id"]):
        out.append(Comparison("class", t, tuple(c for c in range(num_classes) if c != t)))
    group = [int(g) for g in (group_ids or [])]
    for t in group:
        others = tuple(g for g in group if g != t)
        if others:
            out.append(Comparison("group", t, others))
    return list(dict.fromkeys(out))


def slice_tests(props: pd.DataFrame, labels: np.ndarray, preds: np.ndarray, comps: Sequence[Comparison],
                names: Sequence[str], columns: Sequence[str], min_errors: int = MIN_ERRORS,
                q: int = N_QUANTILES) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Per comparison and property: errors vs correct (AUC, Cliff's delta, Mann-Whitney p, then BH across every
    test run) and the error rate per quantile of the property among ALL images of the true class (its rate
    of going to the comparison's classes). Returns (tests, quantiles, skipped comparisons as sentences)."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    rows, qrows, skipped = [], [], []
    for comp in comps:
        mine = labels == comp.true
        err = mine & np.isin(preds, comp.preds)
        ok = mine & (preds == comp.true)
        n_err, n_ok = int(err.sum()), int(ok.sum())
        if n_err < min_errors or n_ok < min_errors:
            skipped.append(f"{comp.label(names)}: skipped ({n_err} errors, {n_ok} correct; needs at least "
                           f"{min_errors} of each)")
            continue
        for col in columns:
            v = props[col].to_numpy(np.float64)
            e, c = v[err], v[ok]
            e, c = e[~np.isnan(e)], c[~np.isnan(c)]
            # one value for every image (all-black images, a map too small for a border): nothing to test
            if len(e) < min_errors or len(c) < min_errors or np.ptp(np.concatenate([e, c])) == 0:
                continue
            auc, p = auc_and_p(e, c)
            rows.append(dict(comparison=comp.label(names), kind=comp.kind, true_id=comp.true,
                             pred_ids=" ".join(map(str, comp.preds)), property=col, n_errors=len(e),
                             n_correct=len(c), median_errors=float(np.median(e)), median_correct=float(np.median(c)),
                             auc=auc, cliffs_delta=cliffs_delta(auc), p_value=p))
            have = mine & ~np.isnan(v)
            bins = quantile_bins(v[have], q)
            went = err[have]
            for b in range(q):
                sel = bins == b
                qrows.append(dict(comparison=comp.label(names), property=col, quantile=b + 1,
                                  low=float(v[have][sel].min()), high=float(v[have][sel].max()),
                                  n_images=int(sel.sum()), n_errors=int(went[sel].sum()),
                                  error_rate=float(went[sel].mean())))
    tests = pd.DataFrame(rows, columns=["comparison", "kind", "true_id", "pred_ids", "property", "n_errors",
                                        "n_correct", "median_errors", "median_correct", "auc", "cliffs_delta",
                                        "p_value"])
    tests["p_bh"] = bh_adjust(tests["p_value"].to_numpy()) if len(tests) else np.zeros(0)
    quant = pd.DataFrame(qrows, columns=["comparison", "property", "quantile", "low", "high", "n_images",
                                         "n_errors", "error_rate"])
    return _with_rate_ratio(tests, quant, q), quant, skipped


def _with_rate_ratio(tests: pd.DataFrame, quant: pd.DataFrame, q: int) -> pd.DataFrame:
    """Error rate in the lowest and highest quantile and their ratio, oriented so that the quantile the
    errors lean towards (by Cliff's delta) is the numerator."""
    tests = tests.copy()
    if not len(tests):
        for col in ("rate_low", "rate_high", "rate_ratio"):
            tests[col] = np.zeros(0)
        return tests
    rate = quant.set_index(["comparison", "property", "quantile"])["error_rate"]
    low = np.array([rate[(c, p, 1)] for c, p in zip(tests["comparison"], tests["property"])])
    high = np.array([rate[(c, p, q)] for c, p in zip(tests["comparison"], tests["property"])])
    tests["rate_low"], tests["rate_high"] = low, high
    num, den = np.where(tests["cliffs_delta"] < 0, low, high), np.where(tests["cliffs_delta"] < 0, high, low)
    with np.errstate(divide="ignore", invalid="ignore"):
        tests["rate_ratio"] = np.where(den > 0, num / np.where(den > 0, den, 1), np.inf)
    return tests


def top_findings(tests: pd.DataFrame, properties: Optional[Sequence[str]] = None, tie: float = TIE) -> pd.DataFrame:
    """The property with the largest |Cliff's delta| per comparison, among `properties` (all when None). Within
    one comparison every test has the same n, so this is also the smallest p up to ties. `close` lists the
    other properties within `tie` of it: properties that move together (on black-background images brightness,
    contrast and sharpness all scale with the garment's intensity) cannot be told apart by these tests."""
    if properties is not None:
        tests = tests[tests["property"].isin(list(properties))]
    if not len(tests):
        return tests.assign(close=pd.Series(dtype=object))
    order = tests.assign(_abs=tests["cliffs_delta"].abs()).sort_values(["comparison", "_abs"], ascending=[True, False],
                                                                        kind="stable")
    top = order.drop_duplicates("comparison").drop(columns="_abs")
    best = top.set_index("comparison")["cliffs_delta"].abs()
    near = order[(order["_abs"] >= order["comparison"].map(best) - tie)
                 & ~order.index.isin(top.index)]
    close = near.groupby("comparison")["property"].agg(", ".join)
    top = top.assign(close=[close.get(c, "") for c in top["comparison"]])
    first = {c: i for i, c in enumerate(dict.fromkeys(tests["comparison"]))}   # in the order tested
    return top.sort_values("comparison", key=lambda s: s.map(first), kind="stable").reset_index(drop=True)


QUANTILE_WORDS = {"brightness": ("darkest", "brightest"), "contrast": ("flattest", "most contrasted"),
                  "colourfulness": ("dullest", "most colourful"), "sharpness": ("blurriest", "sharpest"),
                  "edge_density": ("least edgy", "edgiest"),
                  "original_size": ("smallest original", "largest original"),
                  "aspect_ratio": ("tallest", "widest"),
                  "cam_area": ("most focused CAM", "most spread-out CAM"),
                  "cam_border_share": ("most central CAM", "most border-bound CAM")}


def finding_sentence(row, alpha: float = 0.05) -> str:
    """'Pullover → Shirt: brightness (errors lower, Cliff's δ −0.61, AUC 0.20, BH p 3e-12; 83 errors vs 337
    correct); the darkest quartile goes wrong this way 31.0% of the time, the brightest 10.0% (3.1×).'"""
    lo, hi = QUANTILE_WORDS.get(row.property, ("lowest", "highest"))
    lower = row.cliffs_delta < 0
    towards, away = (lo, hi) if lower else (hi, lo)
    r_to, r_away = (row.rate_low, row.rate_high) if lower else (row.rate_high, row.rate_low)
    ratio = f" ({row.rate_ratio:.1f}×)" if np.isfinite(row.rate_ratio) else ""
    sig = "" if row.p_bh < alpha else f" — not significant at BH {alpha}"
    close = getattr(row, "close", "")
    close = f" (close behind: {close.replace('_', ' ')})" if close else ""
    return (f"{row.comparison}: {row.property.replace('_', ' ')} (errors {'lower' if lower else 'higher'}, Cliff's δ "
            f"{row.cliffs_delta:+.2f}, AUC {row.auc:.2f}, BH p {row.p_bh:.2g}; {row.n_errors} errors vs "
            f"{row.n_correct} correct){close}; the {towards} quartile goes wrong this way {r_to:.1%} of the "
            f"time, the {away} {r_away:.1%}{ratio}{sig}.")
