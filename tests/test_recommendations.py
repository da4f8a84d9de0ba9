import numpy as np
import pytest

from helpers.compute.metrics import count_label_suspects, label_suspect_mask
from helpers.compute.recommendations import THRESHOLDS, Evidence, Recommendation, format_recommendations, recommend


def rules(ev, **kw):
    return {r.rule for r in recommend(ev, **kw)}


def by_rule(ev):
    return {r.rule: r for r in recommend(ev)}


def _fine_grained_pairs():
    within = [("apple", "pear", 30, True, 0.15), ("maple tree", "oak tree", 28, True, 0.14),
              ("boy", "girl", 25, True, 0.125)] + [(f"w{i}", f"v{i}", 20 - i, True, 0.1) for i in range(9)]
    across = [(f"a{i}", f"b{i}", 8, "no", 0.04) for i in range(3)]
    return within + across


def test_fine_grained_scenario():
    ev = Evidence(accuracy=0.72, n_classes=100, top_pairs=_fine_grained_pairs(),
                  within_superclass_share=0.61, within_superclass_chance=4 / 99, ece=0.03,
                  high_conf_error_share=0.1, n_high_conf_errors=280, n_label_suspects=3,
                  group_names=["apple", "pear", "orange"], group_objective=70, group_separability=0.92,
                  group_separability_chance=0.34, head_cosine_max=0.3,
                  worst_classes=[("otter", 0.45), ("seal", 0.48)], class_accuracy_mean=0.72,
                  class_accuracy_std=0.20)   # cutoff 0.72 - 1.5 * 0.20 = 0.42: otter is not far enough below
    assert ev.n_top_pairs == 15 and ev.n_top_pairs_within_superclass == 12
    recs = by_rule(ev)
    assert set(recs) == {"fine_grained", "verify"}
    text = recs["fine_grained"].text
    for cited in ("12 of 15", "61%", "4.0%", "apple→pear (30)", "maple tree→oak tree (28)"):
        assert cited in text
    assert "a0→b0" not in text                     # across-superclass pairs are not named here
    assert "0.6100" in recs["fine_grained"].evidence
    verify = recs["verify"].text
    assert "apple→pear (30)" in verify and "72%" in verify and "70 confusions inside apple, pear and orange" in verify
    assert [r.rule for r in recommend(ev)][-1] == "verify"


def test_overconfident_label_noise_dominant_pair_scenario():
    ev = Evidence(accuracy=0.93, n_images=10000, n_errors=700,
                  top_pairs=[("cat", "dog", 105, None, 0.35), ("truck", "automobile", 40, None, 0.04)],
                  ece=0.12, mean_confidence=0.97, n_high_conf_errors=280, high_conf_error_share=0.4,
                  overconfident_classes=[("cat", 90), ("dog", 60)],
                  n_label_suspects=40, label_suspect_examples=[("deer", "horse")], n_cleanlab_issues=55,
                  worst_classes=[("cat", 0.80)], class_accuracy_mean=0.93, class_accuracy_std=0.05)
    recs = by_rule(ev)
    # cat at 80% is below the cutoff 0.93 - max(1.5 * 0.05, 0.10) = 0.83 -> weak
    assert set(recs) == {"dominant_pair", "overconfident", "label_noise", "weak_classes", "verify"}
    assert "cat→dog takes 35% of cat's test images (105)" in recs["dominant_pair"].text
    over = recs["overconfident"].text
    for cited in ("ECE 0.120", "280 errors", "40% of all errors", "cat (90)", "97%", "93%", "label smoothing"):
        assert cited in over
    noise = recs["label_noise"].text
    for cited in ("40 test images", "0.4% of the test set", "deer (predicted horse)", "< 5% probability",
                  "cleanlab flags 55", "5.85%", "Northcutt"):
        assert cited in noise
    assert "cat (80%)" in recs["weak_classes"].text


def test_representation_scenario_without_pairs():
    ev = Evidence(group_names=["shirt", "T-shirt/top", "pullover"], group_separability=0.62,
                  group_separability_chance=0.34, head_cosine_max=0.71, head_cosine_pair=("shirt", "pullover"),
                  worst_classes=[("shirt", 0.55), ("pullover", 0.80), ("coat", 0.82)],
                  class_accuracy_mean=0.90, class_accuracy_std=0.11, cam_faithfulness=0.02,
                  cam_faithfulness_name="deletion-curve faithfulness")
    recs = by_rule(ev)
    assert set(recs) == {"low_separability", "head_similarity", "weak_classes", "cam_untrustworthy"}
    sep = recs["low_separability"].text
    assert "shirt, T-shirt/top and pullover" in sep and "62%" in sep and "chance 34%" in sep
    head = recs["head_similarity"].text
    assert "shirt and pullover" in head and "0.71" in head and "features do separate" not in head
    weak = recs["weak_classes"].text
    # cutoff 0.90 - max(1.5 * 0.11, 0.10) = 0.735: only shirt is below
    assert "shirt (55%)" in weak and "pullover" not in weak and "74%" in weak
    cam = recs["cam_untrustworthy"].text
    assert "deletion-curve faithfulness is 0.02" in cam


def test_head_similarity_with_separable_features_suggests_head_only():
    ev = Evidence(group_names=["a", "b"], group_separability=0.95, head_cosine_max=0.8, head_cosine_pair=("a", "b"))
    recs = by_rule(ev)
    assert set(recs) == {"head_similarity"}
    assert "features do separate the group (95% linear accuracy)" in recs["head_similarity"].text


def test_underconfident_scenario():
    ev = Evidence(accuracy=0.85, ece=0.08, mean_confidence=0.70, high_conf_error_share=0.05)
    recs = by_rule(ev)
    assert set(recs) == {"underconfident"}
    text = recs["underconfident"].text
    assert "ECE 0.080" in text and "70%" in text and "85%" in text and "T < 1" in text


def test_thresholds_are_strict_and_nothing_fires_below_them():
    ev = Evidence(
        accuracy=0.9, ece=THRESHOLDS["ece_max"], high_conf_error_share=THRESHOLDS["high_conf_error_share_max"],
        # share 30% is high but only 1.5x the 20% chance; 2 of 3 pairs within is below the 3-pair minimum
        top_pairs=[("a", "b", 5, True, 0.19), ("b", "a", 4, True, 0.1), ("c", "d", 3, False, 0.1)],
        within_superclass_share=0.30, within_superclass_chance=0.20,
        n_label_suspects=THRESHOLDS["label_suspects_min"] - 1,
        group_separability=THRESHOLDS["separability_min"], head_cosine_max=THRESHOLDS["head_cosine_max"],
        worst_classes=[("a", 0.81)], class_accuracy_mean=0.9, class_accuracy_std=0.02,
        cam_faithfulness=THRESHOLDS["cam_faithfulness_min"])
    assert rules(ev) == {"verify"}
    # the same evidence with a lower separability threshold changes nothing, a lower ECE limit fires
    assert rules(ev, thresholds={"ece_max": 0.01}) == {"overconfident", "verify"}


def test_nothing_measured_gives_no_recommendation():
    assert recommend(Evidence()) == []
    assert "No measured value" in format_recommendations([])


def test_format_recommendations_numbered():
    recs = [Recommendation("a_rule", "first text", "x=1"), Recommendation("b_rule", "second text", "y=2")]
    out = format_recommendations(recs)
    assert out.startswith("1. [a_rule] first text\n   Evidence: x=1\n2. [b_rule] second text")


def test_label_suspect_definition():
    labels = np.array([0, 0, 1, 2])
    probs = np.array([[0.01, 0.95, 0.04],    # suspect: own label 1%, sure of class 1
                      [0.04, 0.5, 0.46],     # own label low but nobody is sure
                      [0.3, 0.4, 0.3],
                      [0.96, 0.0, 0.04]])    # own label 4%, 96% on class 0
    np.testing.assert_array_equal(label_suspect_mask(labels, probs), [True, False, False, True])
    assert count_label_suspects(labels, probs) == 2


# ----------------------------------------------------------------------------- each threshold, on and off

@pytest.mark.parametrize("rule, fires, quiet", [
    # within-superclass share: >= 20% and >= 3x chance
    ("fine_grained", dict(within_superclass_share=0.20, within_superclass_chance=0.04),
     dict(within_superclass_share=0.1999, within_superclass_chance=0.04)),
    ("fine_grained", dict(within_superclass_share=0.30, within_superclass_chance=0.0999),
     dict(within_superclass_share=0.30, within_superclass_chance=0.1001)),
    # expected calibration error: strictly above 0.05
    ("overconfident", dict(ece=0.0501), dict(ece=0.05)),
    # label suspects: at least 10
    ("label_noise", dict(n_label_suspects=10, n_images=1000), dict(n_label_suspects=9, n_images=1000)),
    # linear separability of the group's features: strictly below 80%
    ("low_separability", dict(group_separability=0.7999, group_names=["a", "b", "c"]),
     dict(group_separability=0.80, group_names=["a", "b", "c"])),
])
def test_each_rule_fires_on_its_threshold_and_not_below(rule, fires, quiet):
    assert THRESHOLDS  # the values above are the documented defaults
    assert rules(Evidence(**fires)) == {rule}
    assert rules(Evidence(**quiet)) == set()


def test_thresholds_can_be_overridden():
    ev = Evidence(ece=0.04, n_label_suspects=5)
    assert rules(ev) == set()
    assert rules(ev, thresholds={"ece_max": 0.03, "label_suspects_min": 5}) == {"overconfident", "label_noise"}


# ----------------------------------------------------------------------------- crafted predictions, end to end

N_CLASSES, PER_CLASS = 20, 100
F2C = np.arange(N_CLASSES) // 4          # 5 superclasses of 4 classes


def crafted_analysis(tmp_path, error_rate: float, within_rate: float, confidence: float, separable: bool):
    """Crafted predictions run through the pipeline's own steps (confusion, then the deep-dive steps that need
    no model) and the report's evidence builder: every image gets `confidence` on its predicted class."""
    from helpers.steps import report
    from helpers.steps import deep_dive as steps
    from helpers.config import Params
    from helpers.data.datasets import Dataset
    from helpers.model.inference import Predictions
    from helpers.pipeline import Analysis

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(N_CLASSES), PER_CLASS)
    n = len(labels)
    wrong = np.zeros(n, bool)
    for c in range(N_CLASSES):   # exactly error_rate of every class, so no class is weak
        wrong[c * PER_CLASS + rng.choice(PER_CLASS, int(round(error_rate * PER_CLASS)), replace=False)] = True
    within = wrong & (rng.random(n) < within_rate)
    sibling = F2C[labels] * 4 + (labels % 4 + rng.integers(1, 4, n)) % 4
    stranger = (F2C[labels] + rng.integers(1, 5, n)) % 5 * 4 + rng.integers(0, 4, n)   # in another superclass
    preds = np.where(within, sibling, np.where(wrong, stranger, labels))
    probs = np.full((n, N_CLASSES), (1 - confidence) / (N_CLASSES - 1))
    probs[np.arange(n), preds] = confidence
    centres = rng.normal(0, 10 if separable else 0, (N_CLASSES, 16))
    features = (centres[labels] + rng.normal(0, 1, (n, 16))).astype(np.float32)
    an = Analysis(Params(OUTPUT_DIR=str(tmp_path / "out"), DEVICE="cpu", EMBEDDING="tsne"), progress=False)
    an.data = Dataset(images=rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8), labels=labels,
                      class_names=[f"class_{i}" for i in range(N_CLASSES)], coarse_labels=F2C[labels],
                      coarse_names=[f"super_{g}" for g in range(5)])
    an.preds = Predictions(logits=np.log(probs).astype(np.float32), probs=probs.astype(np.float32),
                           preds=preds.astype(np.int64), labels=labels, features=features)
    conf = an.confusion()
    an.results["deep_dive"] = dd = steps.run_deep_dive(an.run, conf, parts=(
        steps.feature_space_step, steps.superclass_step, steps.calibration_step, steps.label_suspects_step))
    an.outputs.flush()
    an.outputs.commit()   # what report() does last: the staged outputs move into OUTPUT_DIR
    return an, report.build_evidence(an.run, conf, dd, {})


def test_crafted_fine_grained_overconfident_noisy_predictions(tmp_path):
    an, ev = crafted_analysis(tmp_path, error_rate=0.3, within_rate=0.8, confidence=0.97, separable=False)
    pr = an.preds
    wrong = pr.labels != pr.preds
    within = wrong & (F2C[pr.labels] == F2C[pr.preds])
    # The evidence holds the numbers, computed by hand here.
    assert ev.accuracy == pytest.approx(0.7)
    assert ev.within_superclass_share == pytest.approx(within.sum() / wrong.sum())
    assert ev.within_superclass_chance == pytest.approx(3 / 19)
    assert ev.ece == pytest.approx(0.97 - 0.7, abs=1e-6)          # one confidence bin: |accuracy - 0.97|
    assert ev.n_label_suspects == wrong.sum()                      # p(label) = 0.03/19 < 5%, p(pred) = 97%
    assert ev.group_separability < 0.6                             # pure-noise features
    assert set(ev.group_names) <= {f"class {c}" for c in range(N_CLASSES)} and len(set(F2C[an.results[
        "deep_dive"].values["group"]])) == 1                       # the group sits inside one superclass
    recs = by_rule(ev)
    assert set(recs) == {"fine_grained", "overconfident", "label_noise", "low_separability", "verify"}
    assert f"{ev.within_superclass_share * 100:.0f}%" in recs["fine_grained"].text
    assert "ECE 0.270" in recs["overconfident"].text
    assert f"audit these {wrong.sum()} images" in recs["label_noise"].text
    assert f"{ev.group_separability * 100:.0f}%" in recs["low_separability"].text
    written = (an.out / "deep_dive" / "label_suspects.csv").read_text()
    assert written.count("\n") == 25                               # header + the 24 shown


def test_crafted_healthy_predictions_trigger_nothing_but_verify(tmp_path):
    # 15% errors at 85% confidence (calibrated: ECE 0), all across superclasses, separable features.
    an, ev = crafted_analysis(tmp_path, error_rate=0.15, within_rate=0.0, confidence=0.85, separable=True)
    assert ev.ece == pytest.approx(0.0, abs=1e-6) and ev.within_superclass_share == 0
    assert ev.n_label_suspects == 0 and ev.n_high_conf_errors == 0 and ev.group_separability > 0.95
    assert rules(ev) == {"verify"}
