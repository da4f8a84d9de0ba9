"""Why are A images taken for B? Each candidate cause of a confused pair gets the share of the pair's errors it
accounts for, from what the other steps measured; the diagnosis ranks them, and says "no clear cause" when none
reaches MIN_SHARE with significant evidence.

Pure functions over arrays and the steps' tables: numbers in, `Cause` values out. How each share is counted:

- wrong_labels: the pair's errors whose test label people rejected (validated), or, without validation, that
  confident learning flags AND the model gives their label under SELF_CONFIDENCE_MAX (suspected). Confident
  learning alone, on the test set's own probabilities, flags most confident errors: on real Fashion-MNIST it
  flags 84% of T-shirt/top → Shirt's errors with no label changed and 87% with 10% of the Shirts relabelled.
  p(given) < 0.05 tells them apart: 20 of the 26 relabelled Shirts in that pair, 1 of its 51 own errors.
  The images are listed, so they can be relabelled.
- kind_of_image / context: a property slice that separates the pair's errors from A's correct images (BH p <
  P_MAX, |Cliff's δ| >= DELTA_MIN). Its share is the excess of errors over the rate of the half the errors
  lean away from: sum over quartiles of max(0, errors_q - images_q * rate_away) / errors. (The single far
  quartile often has no error at all in a pair of 15 errors, which made every error "attributable".)
- context: the errors' CAM for B puts more of its energy in the border ring than B's CAM does on correctly
  classified B images (Mann-Whitney, BH-free: one test per pair, p < P_MAX, δ >= DELTA_MIN); its share is the
  errors above the 90th percentile of those B images: B is found where B's own images never show it. (Against
  A's correct images, as the property slices compare, the wrong class's map is diffuse on nearly every error:
  that fired for every top pair of a model with no planted context.)
- training_data: the pair's errors with a confirmed near-duplicate in the training set (the model was tested
  on what it saw in training, under the label it learned there). Training images of A whose neighbours are
  mostly B are quoted beside it. "The error's nearest training images are B's" is not used: the features
  that put an error nearer B's training images are the ones that made the model predict B, so it held for 83-
  100% of every top pair's errors on real Fashion-MNIST, planted or not.
- shared_concept: the errors whose largest push towards B (exact margin split for GAP→Linear heads) comes from
  one concept that carries at least GAP_SHARE_MIN of the margin gap between the errors and A's correct images
  (it is what sets them apart) and is as strong in correctly classified B images (STRENGTH_MIN of the errors'
  level). Without the gap condition it fired for every pair of the Fashion-MNIST group: one concept is the
  largest push in most errors of any pair, while carrying 17-37% of what separates them from correct images.
- ambiguous: errors where both classes stay probable (p(A) >= AMBIGUOUS_P_TRUE and p(B) - p(A) <
  AMBIGUOUS_GAP), named only when a linear probe on the pair's features also separates A from B at less than
  SEPARABILITY_MAX: uncertain errors of classes the features do separate are not ambiguous images.
- few_training_images: A has fewer than FEW_IMAGES_RATIO of the median class's training images; its share is
  the part of A's error rate above the median class's error rate.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import pandas as pd

CAUSE_NAMES = {
    "wrong_labels": "wrong test labels",
    "training_data": "look-alike or duplicated training data",
    "kind_of_image": "a kind of image",
    "context": "context or background",
    "shared_concept": "a concept shared by both classes",
    "ambiguous": "genuinely ambiguous images",
    "few_training_images": "too few training images",
}
MIN_SHARE = 0.10            # a cause must account for this share of the pair's errors to be named
MIN_ERRORS = 3              # ... and for this many of them
P_MAX = 0.01                # property slices: BH-corrected p below this
DELTA_MIN = 0.2             # ... and |Cliff's delta| at least this
SELF_CONFIDENCE_MAX = 0.05  # unvalidated wrong labels: the model gives the label less than this
AMBIGUOUS_P_TRUE = 0.25
AMBIGUOUS_GAP = 0.25
SEPARABILITY_MAX = 0.8
STRENGTH_MIN = 0.8
GAP_SHARE_MIN = 0.5
FEW_IMAGES_RATIO = 0.5
NO_CLEAR_CAUSE = "no clear cause"


@dataclass(frozen=True)
class Cause:
    kind: str                       # a key of CAUSE_NAMES
    share: float                    # of the pair's errors it accounts for, 0..1
    n_errors: int                   # how many errors that is
    evidence: str                   # the numbers behind it, in words
    figure: str = ""                # the output that shows it (relative path), "" when none
    images: tuple[int, ...] = ()    # test images it names (wrong labels: the ones to relabel)
    detail: str = ""                # the property, the concept, ...
    approximate: bool = False       # rests on an approximate split or on CAMs flagged untrustworthy

    @property
    def name(self) -> str:
        return CAUSE_NAMES[self.kind]


@dataclass
class PairDiagnosis:
    pair: str                       # "A → B" (or the group's label)
    true_id: int
    pred_ids: tuple[int, ...]
    n_errors: int
    causes: list[Cause] = field(default_factory=list)   # ranked, largest share first; empty: no clear cause
    considered: list[str] = field(default_factory=list)  # what was looked at but fell short, in words

    @property
    def verdict(self) -> str:
        return self.causes[0].name if self.causes else NO_CLEAR_CAUSE


def rank(causes: Sequence[Optional[Cause]], min_share: float = MIN_SHARE,
         min_errors: int = MIN_ERRORS) -> tuple[list[Cause], list[Cause]]:
    """(named causes, largest share first; the ones that fell short)."""
    present = [c for c in causes if c is not None]
    named = [c for c in present if c.share >= min_share and c.n_errors >= min_errors]
    short = [c for c in present if c not in named]
    key = lambda c: (-c.share, -c.n_errors, list(CAUSE_NAMES).index(c.kind))   # noqa: E731
    return sorted(named, key=key), sorted(short, key=key)


def wrong_label_cause(errors: np.ndarray, wrong: np.ndarray, validated: bool, p_given: Optional[np.ndarray] = None,
                      figure: str = "") -> Optional[Cause]:
    """errors: test indices of the pair's errors; wrong: per-image bool for the whole test set; p_given: per
    image, the model's probability of its test label (needed without validation)."""
    errors = np.asarray(errors, np.int64)
    if not len(errors):
        return None
    flagged = np.asarray(wrong, bool)[errors]
    if not validated:
        flagged &= np.asarray(p_given, np.float64)[errors] < SELF_CONFIDENCE_MAX
    hit = errors[flagged]
    how = ("validated by people" if validated else
           f"suspected, not validated: confident learning flags them and the model gives their label "
           f"< {SELF_CONFIDENCE_MAX:.0%}")
    return Cause("wrong_labels", len(hit) / len(errors), int(len(hit)),
                 f"{len(hit)} of {len(errors)} errors have a wrong test label ({how})", figure,
                 tuple(int(i) for i in hit), "validated" if validated else "suspected")


def attributable_share(quantiles: pd.DataFrame, lean_high: bool) -> tuple[float, int]:
    """(share, errors) of a comparison's errors above the rate of the half of the quantiles they lean away
    from. `quantiles`: one comparison's rows for one property (quantile, n_images, n_errors)."""
    q = quantiles.sort_values("quantile")
    n, e = q["n_images"].to_numpy(np.float64), q["n_errors"].to_numpy(np.float64)
    if not len(q) or e.sum() == 0:
        return 0.0, 0
    half = max(1, len(q) // 2)
    away = slice(0, half) if lean_high else slice(len(q) - half, len(q))
    rate = e[away].sum() / n[away].sum() if n[away].sum() else 0.0
    excess = np.maximum(0.0, e - n * rate).sum()
    return float(excess / e.sum()), int(round(excess))


def property_cause(test: Optional[pd.Series], quantiles: pd.DataFrame, words: tuple[str, str],
                   kind: str = "kind_of_image", figure: str = "", p_max: float = P_MAX,
                   delta_min: float = DELTA_MIN, approximate: bool = False,
                   also: str = "") -> Optional[Cause]:
    """A property slice as a cause, when it is significant and large enough. `test`: the comparison's row of
    PropertySlices.tests; `words`: (low end, high end), e.g. ("darkest", "brightest")."""
    if test is None or not np.isfinite(test["p_bh"]) or test["p_bh"] >= p_max or abs(test["cliffs_delta"]) < delta_min:
        return None
    lean_high = test["cliffs_delta"] > 0
    share, n = attributable_share(quantiles, lean_high)
    toward, away = (words[1], words[0]) if lean_high else words
    prop = str(test["property"]).replace("_", " ")
    low, high = float(test["rate_low"]), float(test["rate_high"])
    rates = (high, low) if lean_high else (low, high)
    evidence = (f"{prop}: the {toward} quartile goes this way {rates[0]:.1%} of the time, the {away} "
                f"{rates[1]:.1%} (Cliff's δ {test['cliffs_delta']:+.2f}, BH p {test['p_bh']:.2g}); {n} errors more "
                f"than what the {away} half's rate would give")
    if also:
        evidence += f"; {also}"
    return Cause(kind, share, n, evidence, figure, detail=str(test["property"]), approximate=approximate)


def _ridge_fold(x_fit: np.ndarray, y_fit: np.ndarray, x_test: np.ndarray, classes: np.ndarray, max_dims: int,
                alpha: float) -> np.ndarray:
    """What make_pipeline(StandardScaler(), PCA(max_dims, svd_solver="full"), RidgeClassifier(alpha)) predicts
    for x_test after fitting on (x_fit, y_fit), in closed form. The PCA basis comes from the eigenvectors of the
    smaller of the Gram and covariance matrices; ridge is rotation-invariant inside that subspace, so the
    basis's signs and order do not matter."""
    mean, scale = x_fit.mean(axis=0), x_fit.std(axis=0)
    scale[scale == 0] = 1.0
    a, b = (x_fit - mean) / scale, (x_test - mean) / scale
    if a.shape[1] > max_dims and len(a) > max_dims:
        if len(a) < a.shape[1]:   # components from the (n, n) Gram matrix: a^T u / s
            evals, u = np.linalg.eigh(a @ a.T)
            top = np.argsort(evals)[::-1][:max_dims]
            top = top[evals[top] > evals.max() * 1e-12]   # null directions carry no ridge weight
            basis = a.T @ u[:, top] / np.sqrt(evals[top])
        else:
            evals, v = np.linalg.eigh(a.T @ a)
            basis = v[:, np.argsort(evals)[::-1][:max_dims]]
        a, b = a @ basis, b @ basis
    targets = np.where(y_fit[:, None] == classes[None, :], 1.0, -1.0)   # LabelBinarizer(-1, 1), one column each
    a_mean, t_mean = a.mean(axis=0), targets.mean(axis=0)
    ac, tc = a - a_mean, targets - t_mean
    if ac.shape[0] < ac.shape[1]:   # the dual form: an (n, n) system
        w = ac.T @ np.linalg.solve(ac @ ac.T + alpha * np.eye(len(ac)), tc)
    else:
        w = np.linalg.solve(ac.T @ ac + alpha * np.eye(ac.shape[1]), ac.T @ tc)
    scores = (b - a_mean) @ w + t_mean
    if len(classes) == 2:   # RidgeClassifier's binary rule: one column, class 1 where its score is > 0
        return classes[(scores[:, 1] > 0).astype(int)]
    return classes[scores.argmax(axis=1)]


def probe_accuracy(features: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0,
                   max_dims: int = 128, alpha: float = 1.0) -> float:
    """Cross-validated accuracy (stratified, shuffled folds) of a closed-form linear probe: a standardised ridge
    classifier, above `max_dims` features on their first `max_dims` principal components. Equal to sklearn's
    StandardScaler -> PCA(svd_solver="full") -> RidgeClassifier pipeline under cross_val_score (tested). The
    deep dive's LogisticRegression (lbfgs, up to 1,000 iterations per fold) took 0.9 s per pair on 32-d
    Fashion-MNIST features; that pipeline with a randomized PCA took 0.33 s per fold on 512-d ResNet-18 features
    (30 s for a 2,000-image run's 15 pairs); this takes a few ms per fold. NaN when a class has fewer than 2
    images."""
    from sklearn.model_selection import StratifiedKFold
    x, y = np.asarray(features, np.float64), np.asarray(labels)
    classes, counts = np.unique(y, return_counts=True)
    if len(counts) < 2 or counts.min() < 2:
        return float("nan")
    cv = StratifiedKFold(n_splits=int(min(folds, counts.min())), shuffle=True, random_state=seed)
    scores = [float(np.mean(_ridge_fold(x[fit], y[fit], x[test], classes, max_dims, alpha) == y[test]))
              for fit, test in cv.split(x, y)]
    return float(np.mean(scores))


def ambiguity_cause(p_true: np.ndarray, p_pred: np.ndarray, separability: Optional[float],
                    figure: str = "") -> Optional[Cause]:
    """The errors where both classes stay probable, when the pair's features separate poorly
    (`separability`: cross-validated linear accuracy on the two classes' features)."""
    p_true, p_pred = np.asarray(p_true, np.float64), np.asarray(p_pred, np.float64)
    if not len(p_true) or separability is None or not np.isfinite(separability):
        return None
    both = (p_true >= AMBIGUOUS_P_TRUE) & (p_pred - p_true < AMBIGUOUS_GAP)
    evidence = (f"{int(both.sum())} of {len(p_true)} errors keep p(true) >= {AMBIGUOUS_P_TRUE:.2f} within "
                f"{AMBIGUOUS_GAP:.2f} of p(predicted) (median p(true) {np.median(p_true):.2f}); a linear probe "
                f"separates the two classes' features at {separability:.1%}")
    share = float(both.mean()) if separability < SEPARABILITY_MAX else 0.0
    return Cause("ambiguous", share, int(both.sum()) if share else 0, evidence, figure)


def context_cause(error_border: np.ndarray, reference_border: np.ndarray, figure: str = "",
                  approximate: bool = False, n_total: Optional[int] = None) -> Optional[Cause]:
    """error_border: border share of B's CAM on the pair's errors (or a sample of `n_total` of them);
    reference_border: the same on correctly classified B images."""
    from helpers.compute.properties import auc_and_p, cliffs_delta
    e = np.asarray(error_border, np.float64)
    r = np.asarray(reference_border, np.float64)
    e, r = e[np.isfinite(e)], r[np.isfinite(r)]
    if len(e) < MIN_ERRORS or len(r) < MIN_ERRORS:
        return None
    auc, p = auc_and_p(e, r)
    delta = cliffs_delta(auc)
    if not np.isfinite(p) or p >= P_MAX or delta < DELTA_MIN:
        return None
    cut = float(np.percentile(r, 90))
    above = int((e > cut).sum())
    total = len(e) if n_total is None else int(n_total)
    sample = f" (a sample of {len(e)} of the {total})" if total > len(e) else ""
    evidence = (f"B's CAM puts a median {np.median(e):.0%} of its energy in the border ring on these errors, "
                f"{np.median(r):.0%} on correctly classified B images (Cliff's δ {delta:+.2f}, p {p:.2g}); {above} of "
                f"{len(e)} errors{sample} are above 90% of those B images")
    share = above / len(e)
    return Cause("context", share, int(round(share * total)), evidence, figure, approximate=approximate)


def training_cause(duplicated: int, n_errors: int, ambiguous_train: int, figure: str = "") -> Optional[Cause]:
    """duplicated: the pair's errors with a confirmed near-duplicate in the training set; ambiguous_train:
    training images of A whose nearest training images are mostly B (quoted, not counted)."""
    if not n_errors:
        return None
    evidence = f"{duplicated} of {n_errors} errors have a confirmed near-duplicate in the training set"
    if ambiguous_train:
        evidence += f"; {ambiguous_train} training images of A have mostly B neighbours"
    return Cause("training_data", duplicated / n_errors, int(duplicated), evidence, figure)


def concept_cause(top_concept: int, per_error_top: np.ndarray, strength_in_pred: float, margin_share: float,
                  exact: bool, figure: str = "") -> Optional[Cause]:
    """per_error_top: per error, the concept with the largest positive push towards B; strength_in_pred: the
    concept's mean activation in correctly classified B images over its mean in the errors; margin_share: its
    share of the margin gap between the errors and A's correctly classified images."""
    tops = np.asarray(per_error_top)
    if (not len(tops) or not np.isfinite(strength_in_pred) or strength_in_pred < STRENGTH_MIN
            or not np.isfinite(margin_share) or margin_share < GAP_SHARE_MIN):
        return None
    hit = int((tops == top_concept).sum())
    evidence = (f"concept {top_concept} carries {margin_share:.0%} of the margin gap between these errors and A's "
                f"correct images"
                f"{'' if exact else ' (approximate: gradient x activation)'}; it is the largest push in {hit} of "
                f"{len(tops)} errors and is {strength_in_pred:.1f}x as strong in correctly classified B images")
    return Cause("shared_concept", hit / len(tops), hit, evidence, figure, detail=f"concept {top_concept}",
                 approximate=not exact)


def few_images_cause(train_counts: np.ndarray, true_id: int, error_rates: np.ndarray,
                     n_errors: int) -> Optional[Cause]:
    """train_counts: training images per class; error_rates: per class, the share of its test images wrong."""
    counts = np.asarray(train_counts, np.float64)
    rates = np.asarray(error_rates, np.float64)
    median = float(np.median(counts))
    if median <= 0 or counts[true_id] >= FEW_IMAGES_RATIO * median or rates[true_id] <= 0:
        return None
    typical = float(np.nanmedian(rates))
    share = max(0.0, (rates[true_id] - typical) / rates[true_id])
    return Cause("few_training_images", share, int(round(share * n_errors)),
                 f"{int(counts[true_id])} training images against a median of {median:.0f} per class; error rate "
                 f"{rates[true_id]:.1%} against a median class's {typical:.1%}")
