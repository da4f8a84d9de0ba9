import numpy as np
import pytest

from helpers import metrics
from helpers.recommendations import (THRESHOLDS, Evidence, Recommendation, build_evidence,
                                     count_label_suspects, format_recommendations, label_suspect_mask,
                                     recommend)


def rules(ev, **kw):
    return {r.rule for r in recommend(ev, **kw)}


def by_rule(ev):
    return {r.rule: r for r in recommend(ev)}


def _fine_grained_pairs():
    within = [("apple", "pear", 30, "yes", 0.15), ("maple tree", "oak tree", 28, "yes", 0.14),
              ("boy", "girl", 25, "yes", 0.125)] + [(f"w{i}", f"v{i}", 20 - i, "yes", 0.1) for i in range(9)]
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
                  top_pairs=[("cat", "dog", 105, "", 0.35), ("truck", "automobile", 40, "", 0.04)],
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
        top_pairs=[("a", "b", 5, "yes", 0.19), ("b", "a", 4, "yes", 0.1), ("c", "d", 3, "no", 0.1)],
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


def test_build_evidence_matches_metrics_and_fires_fine_grained():
    rng = np.random.default_rng(0)
    n_classes, n = 20, 4000
    f2c = np.arange(n_classes) // 5
    names = [f"class_{i}" for i in range(n_classes)]
    labels = rng.integers(0, n_classes, n)
    preds = labels.copy()
    wrong = rng.random(n) < 0.3
    # 80% of errors go to a sibling in the same superclass of 5
    sibling = f2c[labels] * 5 + (labels % 5 + rng.integers(1, 5, n)) % 5
    other = (labels + rng.integers(1, n_classes, n)) % n_classes
    preds[wrong] = np.where(rng.random(n) < 0.8, sibling, other)[wrong]
    logits = rng.normal(0, 1, (n, n_classes))
    logits[np.arange(n), preds] += 4
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)

    cm = metrics.confusion_matrix(labels, preds, n_classes)
    group, objective = metrics.find_confused_group(cm, k=3)
    cos = np.array([[1, 0.7, 0.2], [0.7, 1, 0.1], [0.2, 0.1, 1]])
    ev = build_evidence(labels, preds, probs, names, f2c, top_k=15, group=group,
                        group_separability={"accuracy": 0.9, "chance": 0.34}, head_cosine=cos,
                        cleanlab_issues=np.arange(7))
    share = metrics.superclass_error_share(labels, preds, f2c)
    assert ev.within_superclass_share == pytest.approx(share["share"])
    assert ev.within_superclass_chance == pytest.approx(4 / 19)
    assert ev.ece == pytest.approx(metrics.expected_calibration_error(probs, labels)[0])
    assert ev.n_top_pairs == 15 and ev.top_pairs[0].count == metrics.most_confused(cm, names, 1).loc[0, "count"]
    assert ev.group_objective == objective and ev.group_names == [f"class {c}" for c in group]
    assert ev.head_cosine_max == pytest.approx(0.7)
    assert ev.head_cosine_pair == (f"class {group[0]}", f"class {group[1]}")
    assert ev.n_label_suspects == count_label_suspects(labels, probs) and ev.n_cleanlab_issues == 7
    assert ev.accuracy == pytest.approx((labels == preds).mean())
    fired = rules(ev)
    assert "fine_grained" in fired and "head_similarity" in fired and "verify" in fired
    assert "low_separability" not in fired
    text = format_recommendations(recommend(ev))
    assert f"{ev.n_top_pairs_within_superclass} of 15" in text
