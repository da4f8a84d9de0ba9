"""Evidence-driven recommendations: each rule fires only when a measured value crosses a named
threshold, and its text cites the numbers and classes that tripped it.

With a diagnosis (compute/diagnosis.py), the pair-level advice comes from it: one recommendation per named
cause of a top pair (relabel these images, augment against this property, ...), each citing the cause's
numbers; a pair with no clear cause gets none. The generic pair rules (fine_grained, dominant_pair, verify),
which fire for nearly every model with a confused pair, are then left out; the model-level rules stay.

Build an Evidence (by hand, or from a finished analysis with helpers.steps.report.build_evidence), call
recommend(), print format_recommendations(). The label-suspect rule itself (which images count) is
helpers.compute.metrics.label_suspect_mask; the thresholds here only phrase and gate the recommendation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

from helpers.compute.metrics import HIGH_CONFIDENCE, LABEL_SUSPECT_MAX_P_GIVEN

THRESHOLDS: dict[str, float] = {
    # fine_grained: within-superclass error share >= both of these ...
    "within_share_min": 0.20,
    "within_share_over_chance": 3.0,          # ... (share >= 3x the uniform-error chance)
    # ... or at least this fraction of the top pairs lie within one superclass (and >= 3 such pairs)
    "top_pairs_within_fraction": 0.5,
    "top_pairs_within_min_count": 3,
    # overconfident / underconfident
    "ece_max": 0.05,
    "high_conf": HIGH_CONFIDENCE,              # confidence that makes an error "high-confidence"
    "high_conf_error_share_max": 0.2,          # of all errors
    # label_noise: a suspect has self-confidence < label_self_conf_max AND max prob >= label_conf_min
    # (metrics.label_suspect_mask counts them; these two only word the text)
    "label_self_conf_max": LABEL_SUSPECT_MAX_P_GIVEN,
    "label_conf_min": HIGH_CONFIDENCE,
    "label_suspects_min": 10,
    # low_separability: cross-validated linear accuracy of the group's features
    "separability_min": 0.8,
    # head_similarity: cosine between final-layer weight rows of two group classes
    "head_cosine_max": 0.5,
    # weak_classes: accuracy below mean - max(z * std, gap)
    "weak_class_z": 1.5,
    "weak_class_gap": 0.10,
    # dominant_pair: one wrong class takes this share of a class's test images
    "dominant_pair_share": 0.2,
    # cam_untrustworthy: faithfulness score (higher = more faithful) below this. The pipeline passes the
    # drop in target probability when the 20% most CAM-relevant pixels are removed (ROAD most-relevant-first,
    # sign flipped); a drop under 0.05 means the highlighted pixels barely matter to the model.
    "cam_faithfulness_min": 0.05,
    # how many pairs the final "verify" recommendation names
    "verify_pairs": 5,
}


class Pair(NamedTuple):
    true_name: str
    pred_name: str
    count: int
    same_superclass: Optional[bool] = None    # None: unknown (a class without superclass)
    share_of_true: Optional[float] = None     # count / test images of the true class

    def label(self) -> str:
        return f"{self.true_name}→{self.pred_name}"


@dataclass
class Evidence:
    """Measured values; None means "not measured" and disables the rules that need it."""
    accuracy: Optional[float] = None
    n_classes: Optional[int] = None
    n_images: Optional[int] = None
    n_errors: Optional[int] = None
    top_pairs: Optional[list] = None                       # Pair or (true, pred, count, same[, share])
    n_top_pairs_within_superclass: Optional[int] = None    # derived from top_pairs when None
    n_top_pairs: Optional[int] = None
    within_superclass_share: Optional[float] = None
    within_superclass_chance: Optional[float] = None
    ece: Optional[float] = None
    mean_confidence: Optional[float] = None                # mean max-prob, tells over- from under-confidence
    n_high_conf_errors: Optional[int] = None
    high_conf_error_share: Optional[float] = None          # of all errors
    overconfident_classes: Optional[list] = None           # [(class name, n high-conf errors)], most first
    n_label_suspects: Optional[int] = None                 # see metrics.count_label_suspects
    label_suspect_examples: Optional[list] = None          # [(given label name, predicted name)]
    n_cleanlab_issues: Optional[int] = None
    group_names: Optional[list] = None
    group_objective: Optional[int] = None
    group_separability: Optional[float] = None
    group_separability_chance: Optional[float] = None
    head_cosine_max: Optional[float] = None
    head_cosine_pair: Optional[tuple] = None               # (name, name) of the most similar head rows
    worst_classes: Optional[list] = None                   # [(class name, accuracy)], worst first
    class_accuracy_mean: Optional[float] = None            # falls back to accuracy when None
    class_accuracy_std: Optional[float] = None
    cam_faithfulness: Optional[float] = None               # higher = CAMs follow the model more faithfully
    cam_faithfulness_name: str = "CAM faithfulness score"

    def __post_init__(self):
        if self.top_pairs is not None:
            self.top_pairs = [p if isinstance(p, Pair) else Pair(*p) for p in self.top_pairs]
            if self.n_top_pairs is None:
                self.n_top_pairs = len(self.top_pairs)
            if self.n_top_pairs_within_superclass is None and any(p.same_superclass is not None for p in self.top_pairs):
                self.n_top_pairs_within_superclass = sum(p.same_superclass is True for p in self.top_pairs)


@dataclass
class Recommendation:
    rule: str
    text: str
    evidence: str


# ----------------------------------------------------------------------------- formatting helpers

def _known(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def _pct(x: float) -> str:
    """0.6123 -> '61%', 0.05 -> '5%', 0.0404 -> '4.0%', 0.0004 -> '0.04%'."""
    p = 100.0 * x
    if abs(p) >= 10 or abs(p - round(p)) < 1e-9:
        return f"{p:.0f}%"
    if abs(p) >= 0.1 or p == 0:
        return f"{p:.1f}%"
    return f"{p:.2f}%"


def _join(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _pair_list(pairs: Sequence[Pair], n: int) -> str:
    return _join([f"{p.label()} ({p.count})" for p in pairs[:n]])


# ----------------------------------------------------------------------------- rules

def _fine_grained(ev: Evidence, t: dict) -> Optional[Recommendation]:
    share_hit = (_known(ev.within_superclass_share) and _known(ev.within_superclass_chance)
                 and ev.within_superclass_share >= t["within_share_min"]
                 and ev.within_superclass_share >= t["within_share_over_chance"] * ev.within_superclass_chance)
    pairs_hit = (_known(ev.n_top_pairs_within_superclass) and ev.n_top_pairs
                 and ev.n_top_pairs_within_superclass >= t["top_pairs_within_min_count"]
                 and ev.n_top_pairs_within_superclass / ev.n_top_pairs >= t["top_pairs_within_fraction"])
    if not (share_hit or pairs_hit):
        return None
    facts, evid = [], []
    if _known(ev.n_top_pairs_within_superclass) and ev.n_top_pairs:
        facts.append(f"{ev.n_top_pairs_within_superclass} of {ev.n_top_pairs} top confused pairs are within one superclass")
        evid.append(f"top pairs within superclass={ev.n_top_pairs_within_superclass}/{ev.n_top_pairs}")
    if _known(ev.within_superclass_share) and _known(ev.within_superclass_chance):
        facts.append(f"within-superclass error share {_pct(ev.within_superclass_share)} vs "
                     f"{_pct(ev.within_superclass_chance)} chance")
        evid.append(f"within_superclass_share={ev.within_superclass_share:.4f}; "
                    f"chance={ev.within_superclass_chance:.4f}")
    within = [p for p in (ev.top_pairs or []) if p.same_superclass is True]
    target = f" for {_pair_list(within, 4)}" if within else ""
    text = (f"{'; '.join(facts)} → fine-grained confusion: the model finds the right kind of object but "
            f"not which one. Use targeted augmentation that keeps the distinguishing detail, hard-negative "
            f"mining or a contrastive loss{target}, and more examples of those classes.")
    return Recommendation("fine_grained", text, "; ".join(evid))


def _dominant_pair(ev: Evidence, t: dict) -> Optional[Recommendation]:
    hits = [p for p in (ev.top_pairs or []) if _known(p.share_of_true) and p.share_of_true >= t["dominant_pair_share"]]
    if not hits:
        return None
    hits = sorted(hits, key=lambda p: (-p.share_of_true, -p.count))[:3]
    facts = _join([f"{p.label()} takes {_pct(p.share_of_true)} of {p.true_name}'s test images ({p.count})"
                   for p in hits])
    first = hits[0]
    text = (f"{facts} → a single confusion dominates: look at the {first.label()} gallery for a shared cue "
            f"(background, colour, pose, scale) that the model uses as a shortcut, add {first.true_name} images "
            f"without it, and check that the {first.true_name}/{first.pred_name} labels do not overlap by definition.")
    evid = "; ".join(f"{p.label()} share_of_true={p.share_of_true:.4f} count={p.count}" for p in hits)
    return Recommendation("dominant_pair", text, evid)


def _group_label(ev: Evidence) -> str:
    return _join(ev.group_names) if ev.group_names else "the confused group"


def _low_separability(ev: Evidence, t: dict) -> Optional[Recommendation]:
    if not _known(ev.group_separability) or ev.group_separability >= t["separability_min"]:
        return None
    chance = (f" (chance {_pct(ev.group_separability_chance)})" if _known(ev.group_separability_chance) else "")
    text = (f"A linear classifier on the penultimate features separates {_group_label(ev)} with only "
            f"{_pct(ev.group_separability)} cross-validated accuracy{chance}, below {_pct(t['separability_min'])} "
            f"→ the backbone's features do not tell these classes apart, so a new head or calibration will not fix it: "
            f"train with more and more varied images of these classes, at higher input resolution, or with a "
            f"higher-capacity backbone.")
    evid = f"group_separability={ev.group_separability:.4f}"
    if _known(ev.group_separability_chance):
        evid += f"; chance={ev.group_separability_chance:.4f}"
    return Recommendation("low_separability", text, evid)


def _head_similarity(ev: Evidence, t: dict) -> Optional[Recommendation]:
    if not _known(ev.head_cosine_max) or ev.head_cosine_max <= t["head_cosine_max"]:
        return None
    who = (f"{ev.head_cosine_pair[0]} and {ev.head_cosine_pair[1]}" if ev.head_cosine_pair
           else f"two classes of {_group_label(ev)}")
    if _known(ev.group_separability) and ev.group_separability >= t["separability_min"]:
        advice = (f"the features do separate the group ({_pct(ev.group_separability)} linear accuracy), "
                  f"so re-training only the final layer with hard examples of {who} or a margin loss may be enough")
    else:
        advice = f"re-train the final layer with hard examples of {who} or a margin loss to push their weights apart"
    text = (f"The final-layer weight vectors of {who} have cosine similarity {ev.head_cosine_max:.2f} "
            f"(> {t['head_cosine_max']:.2f}) → the head scores them almost alike; {advice}.")
    return Recommendation("head_similarity", text, f"head_cosine_max={ev.head_cosine_max:.4f}")


def _calibration(ev: Evidence, t: dict) -> Optional[Recommendation]:
    ece_hit = _known(ev.ece) and ev.ece > t["ece_max"]
    hc_hit = _known(ev.high_conf_error_share) and ev.high_conf_error_share > t["high_conf_error_share_max"]
    if not (ece_hit or hc_hit):
        return None
    under = (ece_hit and not hc_hit and _known(ev.mean_confidence) and _known(ev.accuracy)
             and ev.mean_confidence < ev.accuracy)
    evid = []
    if _known(ev.ece):
        evid.append(f"ece={ev.ece:.4f}")
    if under:
        evid.append(f"mean_confidence={ev.mean_confidence:.4f}; accuracy={ev.accuracy:.4f}")
        text = (f"ECE {ev.ece:.3f} (> {t['ece_max']:.2f}) with mean confidence {_pct(ev.mean_confidence)} below "
                f"accuracy {_pct(ev.accuracy)} → the model is underconfident (typical after strong label smoothing "
                f"or mixup): fit temperature scaling (T < 1) on a held-out split; accuracy does not change.")
        return Recommendation("underconfident", text, "; ".join(evid))
    facts = []
    if _known(ev.ece):
        facts.append(f"ECE {ev.ece:.3f}" + (f" (> {t['ece_max']:.2f})" if ece_hit else ""))
    if _known(ev.high_conf_error_share):
        n = f"{ev.n_high_conf_errors} errors" if _known(ev.n_high_conf_errors) else "errors"
        facts.append(f"{n} ({_pct(ev.high_conf_error_share)} of all errors) made with ≥{_pct(t['high_conf'])} confidence")
        evid.append(f"high_conf_error_share={ev.high_conf_error_share:.4f}")
        if _known(ev.n_high_conf_errors):
            evid.append(f"n_high_conf_errors={ev.n_high_conf_errors}")
    if _known(ev.mean_confidence) and _known(ev.accuracy):
        facts.append(f"mean confidence {_pct(ev.mean_confidence)} vs accuracy {_pct(ev.accuracy)}")
    if ev.overconfident_classes:
        facts.append("most of them in " + _join([f"{n} ({c})" for n, c in ev.overconfident_classes[:3]]))
    text = (f"{'; '.join(facts)} → overconfident: fit temperature scaling on a held-out split (one parameter, "
            f"accuracy unchanged) and/or retrain with label smoothing (e.g. 0.1); until then do not read the "
            f"softmax scores as probabilities.")
    return Recommendation("overconfident", text, "; ".join(evid))


def _label_noise(ev: Evidence, t: dict) -> Optional[Recommendation]:
    if not _known(ev.n_label_suspects) or ev.n_label_suspects < t["label_suspects_min"]:
        return None
    rate = f" ({_pct(ev.n_label_suspects / ev.n_images)} of the test set)" if ev.n_images else ""
    examples = ""
    if ev.label_suspect_examples:
        examples = "; e.g. " + _join([f"{g} (predicted {p})" for g, p in ev.label_suspect_examples[:3]])
    cl = (f"; cleanlab flags {ev.n_cleanlab_issues} images (approximate on test-set probabilities)"
          if _known(ev.n_cleanlab_issues) else "")
    text = (f"{ev.n_label_suspects} test images{rate} get < {_pct(t['label_self_conf_max'])} probability for "
            f"their own label while the model is ≥ {_pct(t['label_conf_min'])} sure of another class{examples}{cl} "
            f"→ audit these {ev.n_label_suspects} images before trusting per-class numbers, and relabel or exclude "
            f"confirmed errors (Northcutt et al., 2021, estimate 5.85% of the CIFAR-100 test labels are wrong).")
    evid = f"n_label_suspects={ev.n_label_suspects}"
    if _known(ev.n_cleanlab_issues):
        evid += f"; n_cleanlab_issues={ev.n_cleanlab_issues}"
    return Recommendation("label_noise", text, evid)


def _weak_classes(ev: Evidence, t: dict) -> Optional[Recommendation]:
    mean = ev.class_accuracy_mean if _known(ev.class_accuracy_mean) else ev.accuracy
    if not ev.worst_classes or not _known(mean) or not _known(ev.class_accuracy_std):
        return None
    cutoff = mean - max(t["weak_class_z"] * ev.class_accuracy_std, t["weak_class_gap"])
    weak = [(n, a) for n, a in ev.worst_classes if _known(a) and a < cutoff]
    if not weak:
        return None
    weak.sort(key=lambda x: x[1])
    names = _join([f"{n} ({_pct(a)})" for n, a in weak])
    text = (f"{names} {'are' if len(weak) > 1 else 'is'} below {_pct(cutoff)}, far under the mean class accuracy "
            f"{_pct(mean)} (std {_pct(ev.class_accuracy_std)}) → first check their galleries for one systematic "
            f"confusion, then collect more and more varied images of {_join([n for n, _ in weak])} or train with a "
            f"class-balanced or focal loss.")
    evid = "; ".join(f"{n}={a:.4f}" for n, a in weak) + f"; mean={mean:.4f}; std={ev.class_accuracy_std:.4f}"
    return Recommendation("weak_classes", text, evid)


def _cam_untrustworthy(ev: Evidence, t: dict) -> Optional[Recommendation]:
    if not _known(ev.cam_faithfulness) or ev.cam_faithfulness >= t["cam_faithfulness_min"]:
        return None
    text = (f"The {ev.cam_faithfulness_name} is {ev.cam_faithfulness:.2f} (< {t['cam_faithfulness_min']:.2f}) "
            f"→ the heatmaps follow what drives the predictions only loosely: read the galleries"
            f"{' of ' + _group_label(ev) if ev.group_names else ''} as hints, and confirm any conclusion with the "
            f"occlusion maps or another CAM method or target layer.")
    return Recommendation("cam_untrustworthy", text, f"cam_faithfulness={ev.cam_faithfulness:.4f}")


def _verify(ev: Evidence, t: dict) -> Optional[Recommendation]:
    if not ev.top_pairs:
        return None
    n = int(t["verify_pairs"])
    checks = [f"the pairs {_pair_list(ev.top_pairs, n)}"]
    evid = [f"{p.label()}={p.count}" for p in ev.top_pairs[:n]]
    if _known(ev.accuracy):
        checks.append(f"accuracy {_pct(ev.accuracy)}")
        evid.append(f"accuracy={ev.accuracy:.4f}")
    if _known(ev.within_superclass_share):
        checks.append(f"within-superclass error share {_pct(ev.within_superclass_share)}")
    if _known(ev.ece):
        checks.append(f"ECE {ev.ece:.3f}")
    if _known(ev.group_objective) and ev.group_names:
        checks.append(f"{ev.group_objective} confusions inside {_join(ev.group_names)}")
    text = (f"After any change, re-run this analysis on the same test set and compare {_join(checks)}: a fix works "
            f"if these counts fall without new pairs taking their place.")
    return Recommendation("verify", text, "; ".join(evid))


RULES = [_fine_grained, _dominant_pair, _low_separability, _head_similarity, _calibration,
         _label_noise, _weak_classes, _cam_untrustworthy, _verify]
GENERIC_PAIR_RULES = (_fine_grained, _dominant_pair, _verify)
MAX_LISTED_IMAGES = 20


def _cause_advice(d, c) -> str:
    """What to do about cause `c` of pair diagnosis `d` (compute.diagnosis.PairDiagnosis / Cause)."""
    a, b = d.pair.split(" → ", 1) if " → " in d.pair else (d.pair, "the predicted class")
    if c.kind == "wrong_labels":
        shown = ", ".join(f"#{i}" for i in c.images[:MAX_LISTED_IMAGES])
        more = f" and {len(c.images) - MAX_LISTED_IMAGES} more" if len(c.images) > MAX_LISTED_IMAGES else ""
        check = "" if c.detail == "validated" else " (check them first: the estimate is not validated)"
        return (f"Relabel these {len(c.images)} test images of {a} taken for {b}{check}: {shown}{more} "
                f"(all in deep_dive/diagnosis.csv).")
    if c.kind == "kind_of_image":
        prop = c.detail.replace("_", " ")
        return (f"Augment class {a} against {prop} (train with random {prop} changes covering the range its "
                f"errors come from), or collect more {a} images of that kind.")
    if c.kind == "context":
        return (f"The model finds {b} in the surround of {a} images: check the {a} errors for a shared background "
                f"or corner cue, and train with backgrounds or borders randomised (cut-and-paste, random erasing "
                f"near the edges).")
    if c.kind == "training_data":
        return (f"Collect {a} training images unlike their {b} neighbours (deep_dive/train_neighbours_*), and remove "
                f"or relabel training images of {a} whose neighbours are mostly {b} and test images duplicated in "
                f"the training set (deep_dive/near_duplicates.csv).")
    if c.kind == "shared_concept":
        return (f"{a} and {b} share the evidence that decides these errors ({c.detail}): re-train the head with a "
                f"contrastive or margin loss for this pair, with hard negatives from its errors.")
    if c.kind == "ambiguous":
        return (f"Many {a} → {b} errors are ambiguous images: review the class definitions (merge, split or add "
                f"an 'either' label) before spending effort on the model.")
    if c.kind == "few_training_images":
        return f"Collect more training images of {a}, or reweight it in the loss."
    return ""


def from_diagnosis(pairs: Sequence) -> list[Recommendation]:
    """One recommendation per named cause of each pair (compute.diagnosis.PairDiagnosis, in order), citing its
    numbers. Pairs without a clear cause get none; a group row whose cause repeats one already given for the
    same class and kind is left out."""
    recs, given = [], set()
    for d in pairs:
        for c in d.causes:
            key = (d.true_id, c.kind, c.detail)
            if len(d.pred_ids) > 1 and key in given:   # a group row repeating a pair's advice
                continue
            given.add(key)
            text = _cause_advice(d, c)
            if text:
                recs.append(Recommendation(c.kind, f"{d.pair} ({d.n_errors} errors): {c.name}, "
                                                   f"{_pct(c.share)} of them. {text}", c.evidence))
    return recs


def recommend(ev: Evidence, thresholds: Optional[dict] = None, diagnosis: Optional[Sequence] = None
              ) -> list[Recommendation]:
    """The recommendations whose thresholds trip, in a fixed order, "verify" last. With `diagnosis` (the
    PairDiagnosis list), its causes' recommendations come first and the generic pair rules are left out.

    Rule names: fine_grained, dominant_pair, low_separability, head_similarity, overconfident
    (or underconfident), label_noise, weak_classes, cam_untrustworthy, verify; from a diagnosis, the cause
    kinds of compute.diagnosis.CAUSE_NAMES.
    """
    t = dict(THRESHOLDS, **(thresholds or {}))
    rules = RULES if diagnosis is None else [r for r in RULES if r not in GENERIC_PAIR_RULES]
    first = from_diagnosis(diagnosis) if diagnosis is not None else []
    return first + [rec for rule in rules if (rec := rule(ev, t)) is not None]


def format_recommendations(recs: Sequence[Recommendation]) -> str:
    """Numbered plain text, one block per recommendation with its evidence line."""
    if not recs:
        return "No measured value crossed a recommendation threshold.\n"
    blocks = [f"{i}. [{r.rule}] {r.text}\n   Evidence: {r.evidence}" for i, r in enumerate(recs, start=1)]
    return "\n".join(blocks) + "\n"
