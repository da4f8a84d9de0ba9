import itertools

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from helpers.compute import metrics
from helpers.errors import ConfigError, DataError


def test_confusion_matrix_matches_sklearn_with_absent_classes():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 500)          # classes 7..9 never occur as labels
    preds = rng.integers(0, 8, 500)           # ... and 8, 9 never predicted
    cm = metrics.confusion_matrix(labels, preds, 10)
    assert cm.dtype == np.int64 and cm.shape == (10, 10)
    np.testing.assert_array_equal(cm, sk_confusion_matrix(labels, preds, labels=range(10)))


def test_confusion_matrix_rejects_out_of_range_ids():
    with pytest.raises(DataError):
        metrics.confusion_matrix([0, 1, 5], [0, 1, 1], 3)


# 3 classes: apple, pear (both fruit) and maple tree.
NAMES = ["apple", "pear", "maple_tree"]
F2C = np.array([0, 0, 1])
COARSE = ["fruit", "large_trees"]
LABELS = np.array([0, 0, 0, 1, 1, 2])
PREDS = np.array([0, 1, 1, 1, 0, 2])
PROBS = np.array([[0.8, 0.1, 0.1],
                  [0.3, 0.6, 0.1],
                  [0.2, 0.7, 0.1],
                  [0.1, 0.9, 0.0],
                  [0.5, 0.4, 0.1],
                  [0.2, 0.2, 0.6]])


def test_per_class_table_hand_case():
    table = metrics.per_class_table(LABELS, PREDS, PROBS, NAMES, F2C, COARSE)
    assert list(table.columns) == ["class_id", "class_name", "superclass", "support", "correct", "accuracy",
                                   "mean_confidence", "top_wrong_prediction", "top_wrong_count"]
    expected = pd.DataFrame({
        "class_id": [0, 1, 2],
        "class_name": ["apple", "pear", "maple tree"],
        "superclass": ["fruit", "fruit", "large trees"],
        "support": [3, 2, 1],
        "correct": [1, 1, 1],
        "accuracy": [1 / 3, 0.5, 1.0],
        "mean_confidence": [(0.8 + 0.6 + 0.7) / 3, (0.9 + 0.5) / 2, 0.6],
        "top_wrong_prediction": ["pear", "apple", ""],
        "top_wrong_count": [2, 1, 0],
    })
    pd.testing.assert_frame_equal(table, expected, check_dtype=False)


def test_per_class_table_without_superclasses_and_empty_class():
    table = metrics.per_class_table(LABELS, PREDS, np.c_[PROBS, np.zeros(6)], NAMES + ["oak"])
    assert (table["superclass"] == "").all()
    assert table.loc[3, "support"] == 0 and np.isnan(table.loc[3, "accuracy"])


CM = np.array([[5, 3, 1, 0],
               [3, 4, 0, 2],
               [0, 0, 6, 0],
               [1, 0, 3, 2]])


def test_most_confused_hand_case():
    names = ["a_x", "b", "c", "d"]
    table = metrics.most_confused(CM, names, k=10, fine_to_coarse=np.array([0, 0, 1, 1]))
    assert list(table.columns) == metrics.MOST_CONFUSED_COLUMNS
    # count desc, then share desc, then (true, pred) asc for the 3-3-3 tie
    assert list(zip(table.true_id, table.pred_id)) == [(3, 2), (0, 1), (1, 0), (1, 3), (3, 0), (0, 2)]
    assert list(table["rank"]) == [1, 2, 3, 4, 5, 6]
    assert list(table["count"]) == [3, 3, 3, 2, 1, 1]
    np.testing.assert_allclose(table["share_of_true"], [3 / 6, 3 / 9, 3 / 9, 2 / 9, 1 / 6, 1 / 9])
    assert list(table["same_superclass"]) == [True, True, True, False, False, False]
    assert list(metrics.pairs_for_csv(table)["same_superclass"]) == ["yes", "yes", "yes", "no", "no", "no"]
    assert table.loc[1, "true_name"] == "a x" and table.loc[1, "pred_name"] == "b"

    top = metrics.most_confused(CM, names, k=2, min_count=2)
    assert list(zip(top.true_id, top.pred_id)) == [(3, 2), (0, 1)]
    assert top["same_superclass"].dtype == "boolean" and top["same_superclass"].isna().all()
    assert (metrics.pairs_for_csv(top)["same_superclass"] == "").all()
    assert len(metrics.most_confused(CM, names, k=None, min_count=2)) == 4


def test_top_within_superclass_pairs_from_table_and_cm():
    names = ["a", "b", "c", "d"]
    f2c = np.array([0, 0, 1, 1])
    table = metrics.most_confused(CM, names, k=None, fine_to_coarse=f2c)
    from_table = metrics.top_within_superclass_pairs(table, k=2)
    from_cm = metrics.top_within_superclass_pairs(CM, names, f2c, k=2)
    for within in (from_table, from_cm):
        assert list(zip(within.true_id, within.pred_id)) == [(3, 2), (0, 1)]
        assert list(within["rank"]) == [1, 2]
    with pytest.raises(ConfigError):
        metrics.top_within_superclass_pairs(CM)


def test_superclass_error_share_hand_case():
    f2c = np.array([0, 0, 0, 1, 1])
    labels = np.array([0, 0, 3, 2])
    preds = np.array([1, 3, 4, 2])
    out = metrics.superclass_error_share(labels, preds, f2c)
    assert out["n_errors"] == 3 and out["n_within"] == 2
    assert out["share"] == pytest.approx(2 / 3)
    # true classes of the errors: 0 (2 siblings), 0, 3 (1 sibling); C-1 = 4
    assert out["chance"] == pytest.approx((2 / 4 + 2 / 4 + 1 / 4) / 3)


def test_superclass_chance_is_4_over_99_on_cifar100_structure():
    rng = np.random.default_rng(1)
    f2c = rng.permutation(np.arange(100) // 5)
    labels = rng.integers(0, 100, 3000)
    preds = rng.integers(0, 100, 3000)
    out = metrics.superclass_error_share(labels, preds, f2c)
    assert out["chance"] == pytest.approx(4 / 99)
    wrong = labels != preds
    assert out["n_errors"] == wrong.sum()
    assert out["n_within"] == (wrong & (f2c[labels] == f2c[preds])).sum()


def test_coarse_confusion_matrix():
    f2c = np.array([0, 0, 1, 1])
    labels = np.array([0, 1, 2, 3, 3])
    preds = np.array([1, 2, 3, 0, 3])
    expected = sk_confusion_matrix(f2c[labels], f2c[preds], labels=range(2))
    np.testing.assert_array_equal(metrics.coarse_confusion_matrix(labels, preds, f2c, 2), expected)


def _reference_ece(probs, labels, n_bins):
    """The usual loop implementation (bins (lower, upper])."""
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs((pred[in_bin] == labels[in_bin]).mean() - conf[in_bin].mean())
    return ece


def test_ece_hand_case():
    probs = np.array([[0.4, 0.3, 0.3], [0.45, 0.35, 0.2], [0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
    labels = np.array([0, 1, 0, 2, 2])
    ece, bins = metrics.expected_calibration_error(probs, labels, n_bins=2)
    # bin (0, .5]: conf .4, .45; acc 1/2 -> 2/5 * |.5 - .425|; bin (.5, 1]: conf .9,.7,.8; acc 2/3
    assert ece == pytest.approx(2 / 5 * 0.075 + 3 / 5 * abs(2 / 3 - 0.8))
    assert list(bins.columns) == ["bin_lower", "bin_upper", "count", "accuracy", "confidence"]
    assert list(bins["count"]) == [2, 3]
    np.testing.assert_allclose(bins["accuracy"], [0.5, 2 / 3])
    np.testing.assert_allclose(bins["confidence"], [0.425, 0.8])


def test_ece_matches_reference_and_bins_are_right_closed():
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(10) * 0.3, 400)
    labels = rng.integers(0, 10, 400)
    ece, bins = metrics.expected_calibration_error(probs, labels, n_bins=15)
    assert ece == pytest.approx(_reference_ece(probs, labels, 15))
    assert bins["count"].sum() == 400
    _, bins = metrics.expected_calibration_error(np.array([[0.5, 0.5, 0.0]]), np.array([0]), n_bins=2)
    assert list(bins["count"]) == [1, 0] and np.isnan(bins.loc[1, "accuracy"])


def test_high_confidence_errors_and_by_class():
    labels = np.array([0, 0, 1, 1, 2])
    preds = np.array([1, 2, 1, 0, 0])
    probs = np.array([[0.05, 0.95, 0], [0.2, 0.1, 0.7], [0, 1, 0], [0.92, 0.08, 0], [0.99, 0, 0.01]])
    out = metrics.high_confidence_errors(labels, preds, probs, threshold=0.9)
    assert out["count"] == 3
    np.testing.assert_array_equal(out["indices"], [4, 0, 3])   # confidence .99, .95, .92
    assert out["share_of_errors"] == pytest.approx(3 / 4) and out["share_of_all"] == pytest.approx(3 / 5)
    by_class = metrics.overconfident_errors_by_class(labels, preds, probs, ["a", "b", "c_d"], threshold=0.9)
    assert list(by_class["class_id"]) == [0, 1, 2]   # 1 each -> ties by class id
    assert list(by_class["count"]) == [1, 1, 1] and list(by_class["errors"]) == [2, 1, 1]
    assert by_class.loc[2, "class_name"] == "c d"


def test_rank_worst_best_and_pair_examples():
    labels = np.array([0, 0, 0, 0, 0, 1])
    preds = np.array([1, 0, 2, 0, 1, 0])
    probs = np.array([[0.3, 0.6, 0.1], [0.9, 0.05, 0.05], [0.1, 0.1, 0.8],
                      [0.5, 0.3, 0.2], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    # wrong ones by confidence in the predicted class (.8, .7, .6), then least-sure correct (.5, .9)
    np.testing.assert_array_equal(metrics.rank_worst(labels, preds, probs, 0, 10), [2, 4, 0, 3, 1])
    np.testing.assert_array_equal(metrics.rank_worst(labels, preds, probs, 0, 2), [2, 4])
    np.testing.assert_array_equal(metrics.rank_best(labels, preds, probs, 0, 5), [1, 3])
    np.testing.assert_array_equal(metrics.pair_examples(labels, preds, probs, 0, 1, 5), [4, 0])
    assert metrics.pair_examples(labels, preds, probs, 1, 2, 5).size == 0


def test_label_suspects_order():
    labels = np.array([0, 1, 2, 0])
    probs = np.array([[0.01, 0.98, 0.01], [0.5, 0.01, 0.49], [0.3, 0.3, 0.4], [0.2, 0.7, 0.1]])
    # self-confidence .01, .01 (tie: higher max prob first), then .2, .4
    np.testing.assert_array_equal(metrics.label_suspects(labels, probs, n=4), [0, 1, 3, 2])
    np.testing.assert_array_equal(metrics.label_suspects(labels, probs, n=2), [0, 1])


def _random_cm(rng, n, noise=1.0):
    cm = rng.poisson(noise, (n, n))
    np.fill_diagonal(cm, 50)
    return cm


def test_find_confused_group_finds_planted_block():
    rng = np.random.default_rng(3)
    cm = _random_cm(rng, 20)
    block = [3, 11, 17]
    for i, j in itertools.permutations(block, 2):
        cm[i, j] = 30 + i + j
    group, objective = metrics.find_confused_group(cm, k=3)
    assert sorted(group) == block
    assert objective == metrics.group_objective(cm, block)
    sym = cm + cm.T
    in_group = {c: sum(sym[c, o] for o in block if o != c) for c in block}
    assert group == sorted(block, key=lambda c: (-in_group[c], c))


def test_find_confused_group_exhaustive_equals_brute_force():
    rng = np.random.default_rng(4)
    for _ in range(5):
        cm = rng.integers(0, 40, (8, 8))
        # 28 seed pairs = every pair, so every class is a candidate
        group, objective = metrics.find_confused_group(cm, k=3, n_seed_pairs=28)
        best = max(metrics.group_objective(cm, g) for g in itertools.combinations(range(8), 3))
        assert objective == best == metrics.group_objective(cm, group)


def test_find_confused_group_greedy_path(monkeypatch):
    rng = np.random.default_rng(5)
    cm = _random_cm(rng, 60, noise=3.0)
    block = [7, 30, 52]
    for i, j in itertools.permutations(block, 2):
        cm[i, j] = 40
    def no_exhaustive(*args, **kwargs):
        raise AssertionError("exhaustive search used")
    monkeypatch.setattr(metrics.itertools, "combinations", no_exhaustive)
    # 300 seed pairs cover (nearly) all 60 classes: C(60, 3) = 34220 > 20000 -> greedy
    group, objective = metrics.find_confused_group(cm, k=3, n_seed_pairs=300)
    assert sorted(group) == block and objective == 6 * 40


def test_find_confused_group_tops_up_and_validates():
    cm = np.diag([5, 5, 5, 5])
    cm[0, 1] = 2
    group, objective = metrics.find_confused_group(cm, k=3)
    assert len(set(group)) == 3 and {0, 1} <= set(group) and objective == 2
    with pytest.raises(ConfigError):
        metrics.find_confused_group(cm, k=1)
    with pytest.raises(ConfigError):
        metrics.find_confused_group(cm, k=5)
    assert isinstance(metrics.GROUP_SEARCH_EXPLANATION, str) and metrics.GROUP_SEARCH_EXPLANATION


def test_group_confusion_row_pct_uses_full_row():
    counts, row_pct = metrics.group_confusion(CM, [3, 2])
    np.testing.assert_array_equal(counts, [[2, 3], [0, 6]])
    # class 3 has 6 images in all (one went to class 0, outside the group)
    np.testing.assert_allclose(row_pct, [[100 * 2 / 6, 100 * 3 / 6], [0, 100]])
    assert metrics.group_objective(CM, [3, 2]) == 3


def test_most_confused_classes_by_hand():
    from helpers.compute.ordering import most_confused_classes
    cm = np.array([[5, 3, 0, 0, 0],     # errors (off-diagonal row + column): 0: 3+1=4, 1: 0+3=3,
                   [0, 9, 0, 0, 0],     # 2: 2+0=2, 3: 0+2=2, 4: 1+0=1
                   [1, 0, 4, 1, 0],
                   [0, 0, 0, 7, 0],
                   [0, 0, 0, 1, 2]])
    order = np.array([4, 3, 2, 1, 0])
    # the top 3 are 0 and 1, then 2 (tied with 3 at 2 errors: the lower id); listed in `order`'s order
    assert most_confused_classes(cm, order, 3).tolist() == [2, 1, 0]
    assert most_confused_classes(cm, order, 4).tolist() == [3, 2, 1, 0]
    assert most_confused_classes(cm, order, 1).tolist() == [0]
    assert most_confused_classes(cm, order, 10).tolist() == order.tolist()  # at most n: every class
    with pytest.raises(ValueError):
        most_confused_classes(cm, [0, 1, 2], 3)
