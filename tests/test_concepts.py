"""Contrastive concepts (compute/concepts.py, steps/model_concepts.py): NMF against scikit-learn's own NMF and
a hand-made activation with known factors, the margin split by hand and on the real Fashion-MNIST model (Σ c_k +
residual + offset equals the model's logit margin within 1e-4), the gradient × activation path marked approximate
on a flatten+Linear head, and a planted shortcut (a bright corner patch on every training Trouser, on 30% of the
test Dresses) whose Dress → Trouser errors must be carried by a concept whose top patches are that corner."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from helpers.compute import concepts as C

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------- NMF
def test_factorise_is_sklearns_nmf():
    from sklearn.decomposition import NMF
    rng = np.random.default_rng(0)
    acts = rng.gamma(1.0, 1.0, (12, 6, 5, 4)).astype(np.float32)
    f = C.factorise(acts, k=3, seed=0)
    rows = acts.transpose(0, 2, 3, 1).reshape(-1, 6)          # (image, y, x) rows, channels as columns
    ref = NMF(n_components=3, init="nndsvda", random_state=0, max_iter=C.NMF_MAX_ITER, tol=C.NMF_TOL)
    w = ref.fit_transform(rows)
    np.testing.assert_allclose(f.basis, ref.components_, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(f.amounts.reshape(-1, 3), w, rtol=1e-6, atol=1e-8)
    assert f.amounts.shape == (12, 5, 4, 3) and f.k == 3 and f.how == "K=3 as given"
    # the reconstruction is W·H back in (N, C, h, w)
    np.testing.assert_allclose(f.reconstruction(), (w @ ref.components_).reshape(12, 5, 4, 6).transpose(0, 3, 1, 2),
                               rtol=1e-6, atol=1e-8)


def test_known_factors_are_recovered_and_k_is_the_smallest_that_explains_the_target():
    # Three concepts on disjoint channels, mixed per pixel with random non-negative amounts: rank exactly 3.
    rng = np.random.default_rng(1)
    basis = np.zeros((3, 9))
    basis[0, :3], basis[1, 3:6], basis[2, 6:] = [1, 2, 3], [3, 1, 1], [2, 2, 1]
    amounts = rng.exponential(1.0, (40, 4, 4, 3)) * (rng.random((40, 4, 4, 3)) < 0.6)
    acts = np.einsum("nyxk,kc->ncyx", amounts, basis).astype(np.float32)
    f = C.factorise(acts, ks=(2, 3, 4, 5), target=0.999, seed=0)   # NMF_TOL: explains 99.9%, not 100%
    assert f.k == 3 and f.explained[2] < 0.999 <= f.explained[3] and 4 not in f.explained   # stops at the first
    assert "smallest K in 2..5" in f.how
    cos = (f.basis / np.linalg.norm(f.basis, axis=1, keepdims=True)) @ (basis / np.linalg.norm(basis, axis=1)[:, None]).T
    assert np.all(cos.max(axis=1) > 0.999) and sorted(cos.argmax(axis=1)) == [0, 1, 2]   # each concept, once
    assert np.abs(f.reconstruction() - acts).max() < 0.02 * acts.max()   # converged to tol 1e-4, not exactly


def test_no_k_reaching_the_target_takes_the_best():
    acts = np.random.default_rng(2).gamma(1.0, 1.0, (10, 8, 3, 3))
    f = C.factorise(acts, ks=(2, 3), target=1.01)
    assert f.k == 3 and f.explained[3] >= f.explained[2] and "no K in 2..3" in f.how


# ---------------------------------------------------------------------------------------------- splits by hand
def _hand_case():
    # One image, 2 channels, 1x2 pixels. Concepts: H = [[1, 0], [0, 1]] (one per channel), amounts W = activations
    # except pixel 2 channel 2, where NMF "missed" 1.0 (residual). Classes 0 (A) and 1 (B).
    acts = np.array([[[[2.0, 4.0]], [[1.0, 3.0]]]])                 # (1, C=2, h=1, w=2)
    amounts = np.array([[[[2.0, 1.0], [4.0, 2.0]]]])                # (1, 1, 2, K=2): pixel 2 channel 2 is 2, not 3
    f = C.Factors(basis=np.eye(2), amounts=amounts, k=2)
    weight, bias = np.array([[1.0, 0.0], [0.5, 2.0]]), np.array([0.25, -0.5])
    return acts, f, weight, bias


def test_gap_linear_split_by_hand():
    acts, f, weight, bias = _hand_case()
    # mean activation (3, 2); z_A = 3 + 0.25 = 3.25, z_B = 1.5 + 4 - 0.5 = 5.0; margin 1.75
    logits = np.array([[3.25, 5.0]])
    s = C.gap_linear_split(acts, f, weight, bias, np.array([0]), np.array([1]), logits)
    # w_B - w_A = (-0.5, 2); mean amounts (3, 1.5): c = (3 * -0.5, 1.5 * 2) = (-1.5, 3); residual: mean R = (0, 0.5)
    np.testing.assert_allclose(s.contributions, [[-1.5, 3.0]])
    np.testing.assert_allclose(s.residual, [1.0])
    np.testing.assert_allclose(s.offset, [-0.75])
    np.testing.assert_allclose(s.margin, [1.75])
    assert s.exact and s.contributions.sum() + s.residual[0] + s.offset[0] == pytest.approx(1.75)


def test_gradient_split_equals_the_exact_one_on_a_gap_head():
    # On a GAP -> Linear head the margin's gradient is (w_B - w_A) / pixels everywhere: the same numbers.
    acts, f, weight, bias = _hand_case()
    grads = np.broadcast_to(((weight[1] - weight[0]) / 2)[None, :, None, None], acts.shape)
    logits = np.array([[3.25, 5.0]])
    g = C.gradient_split(acts, grads, f, np.array([0]), np.array([1]), logits)
    e = C.gap_linear_split(acts, f, weight, bias, np.array([0]), np.array([1]), logits)
    assert not g.exact
    for name in ("contributions", "residual", "offset", "margin"):
        np.testing.assert_allclose(getattr(g, name), getattr(e, name), atol=1e-12)


def test_margin_gradients_stop_at_the_layer_and_equal_a_backward_to_the_input():
    # A conv layer followed by an in-place ReLU, then a flatten + Linear head (no closed form).
    torch.manual_seed(0)
    stem, layer = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 5, 3, padding=1)
    model = torch.nn.Sequential(stem, torch.nn.ReLU(), layer, torch.nn.ReLU(inplace=True), torch.nn.Flatten(),
                                torch.nn.Linear(5 * 6 * 6, 3)).eval()
    x = torch.randn(4, 3, 6, 6)
    true, pred = np.array([0, 1, 2, 0]), np.array([1, 2, 0, 2])
    # by hand: the layer's output, kept, the rest of the model applied to it, backward through everything
    with torch.enable_grad():
        xg = x.clone().requires_grad_(True)
        out = layer(torch.relu(stem(xg)))
        logits = model[5](torch.relu(out).flatten(1))
        n = torch.arange(4)
        (ref_grad,) = torch.autograd.grad((logits[n, pred] - logits[n, true]).sum(), out)
    reached = []
    stem.register_full_backward_hook(lambda *_: reached.append("stem"))
    act, grad, lg = C.margin_gradients(model, layer, x, true, pred)
    assert reached == []                                  # the backward stopped at the layer
    np.testing.assert_allclose(act, out.detach().numpy(), atol=1e-6)   # before the in-place ReLU
    np.testing.assert_allclose(grad, ref_grad.numpy(), atol=1e-6)
    np.testing.assert_allclose(lg, logits.detach().numpy(), atol=1e-6)
    assert (act < 0).any() and (grad == 0).any() and (grad != 0).any()   # the ReLU's mask is in the gradient


def test_top_patches_boxes_by_hand():
    amounts = np.zeros((3, 7, 7, 2))
    amounts[0, 0, 0, 0] = 5.0       # top-left cell: the box is cells -1..1 clipped, pixels 0..8
    amounts[1, 3, 5, 0] = 9.0       # cell (3, 5): cells 2..4 x 4..6, pixels 8..20 x 16..28
    amounts[2, 6, 6, 1] = 1.0       # the other concept only
    boxes = C.top_patches(amounts, np.array([10, 11, 12]), 0, 5, (28, 28))
    assert [(b.image, b.y0, b.x0, b.y1, b.x1) for b in boxes] == [(11, 8, 16, 20, 28), (10, 0, 0, 8, 8)]
    assert C.box_overlap(boxes[1], 0, 0, 4, 4) == 16 and C.box_overlap(boxes[0], 0, 0, 4, 4) == 0
    assert C.strength_ratio(amounts, np.array([False, True, False]), np.array([True, False, False]), 0) == \
        pytest.approx((9 / 49) / (5 / 49))


# ---------------------------------------------------------------------------------------------- real runs
def _analysis(tmp_path, checkpoint, root, arch=None, deep=True, **extra):
    from conftest import FMNIST_ARCH
    from helpers.config import Params
    from helpers.pipeline import Analysis
    an = Analysis(Params(MODEL_PATH=str(checkpoint), ARCH=arch or FMNIST_ARCH, DATASET="fashion_mnist",
                         DATA_ROOT=str(root), DOWNLOAD=False, OUTPUT_DIR=str(tmp_path / "out"), DEVICE="cpu", SEED=0,
                         **extra), progress=False)
    an.load_model()
    an.load_data()
    an.predict()
    return (an, an.confusion(), an.deep_dive()) if deep else (an, an.confusion())


def _most_confused_pair(conf):
    """A stand-in for the deep dive (the step reads only `deep.group.group`): the most confused pair's classes."""
    from types import SimpleNamespace
    cm = np.array(conf.cm, dtype=float)
    np.fill_diagonal(cm, -1)
    a, b = np.unravel_index(np.argmax(cm + cm.T), cm.shape)
    return SimpleNamespace(group=SimpleNamespace(group=[int(a), int(b)]))


def _check_margins(an, sec):
    m, k = sec.margins, sec.k
    pr = an.run.preds
    idx, t, q = m["index"].to_numpy(), m["true_id"].to_numpy(), m["pred_id"].to_numpy()
    # against the logits of the inference pass (a separate forward of the whole test set)
    np.testing.assert_allclose(m["margin"], pr.logits[idx, q] - pr.logits[idx, t], atol=1e-4)
    total = m[[f"c{j + 1}" for j in range(k)]].sum(axis=1) + m["residual"] + m["offset"]
    np.testing.assert_allclose(total, m["margin"], atol=1e-4)
    assert (m.loc[m["role"] == "error", "margin"] > 0).all()            # an error: B's logit is the larger
    assert (m.loc[m["role"] == "correct", "margin"] < 0).all()


def test_real_model_margin_split_is_exact_and_files_are_written(tmp_path, fmnist_checkpoint):
    from helpers.data.readers import SYSTEM_FASHION_MNIST
    from helpers.steps.model_concepts import CSV, PNG, concepts_step, index_section, summary_lines

    an, conf, deep = _analysis(tmp_path, fmnist_checkpoint, SYSTEM_FASHION_MNIST, LIMIT=3000)
    sec = concepts_step(an.run, conf, deep)
    assert sec.exact and sec.head_note == "" and sec.layer
    assert 4 <= sec.k <= 8 and sec.k_how.startswith(f"K={sec.k}")
    assert set(sec.group) == set(deep.group.group) and len(sec.images) <= 2000
    assert np.isin(an.run.preds.labels[sec.images], sec.group).all()
    _check_margins(an, sec)
    # the offset is the Linear's bias difference, read from the checkpoint itself
    bias = torch.load(fmnist_checkpoint, map_location="cpu")["fc.bias"].numpy().astype(np.float64)
    m = sec.margins
    np.testing.assert_allclose(m["offset"], bias[m["pred_id"]] - bias[m["true_id"]], atol=1e-6)
    # per pair: the shares of the mean error margin sum to one, and the top concept is the largest
    p = sec.pairs
    assert len(p) and p["exact"].all()
    shares = p[[f"share_c{j + 1}" for j in range(sec.k)]].to_numpy()
    np.testing.assert_allclose(shares.sum(1) + p["share_residual"] + p["share_offset"], 1.0, atol=1e-6)
    assert (p["top_concept"].to_numpy() == shares.argmax(1) + 1).all()
    np.testing.assert_allclose(p["top_share"], shares.max(1))
    for r in p.itertuples():   # the pair's numbers recomputed from the per-image table
        err = m[(m["true_id"] == r.true_id) & (m["pred_id"] == r.pred_id) & (m["role"] == "error")]
        assert len(err) == r.n_errors == conf.cm[r.true_id, r.pred_id]
        assert err[f"c{r.top_concept}"].mean() / err["margin"].mean() == pytest.approx(r.top_share)
    # every concept's patches are real boxes inside the image, on images that were analysed
    assert sorted(sec.patches) == list(range(1, sec.k + 1))
    for boxes in sec.patches.values():
        assert 0 < len(boxes) <= 6 and len({b.image for b in boxes}) == len(boxes)
        assert all(0 <= b.y0 < b.y1 <= 28 and 0 <= b.x0 < b.x1 <= 28 and b.image in set(sec.images) for b in boxes)
    # files, opened
    an.run.outputs.flush()
    table = pd.read_csv(an.run.outputs.current(CSV))
    assert len(table) == len(m) + len(p) and {"pair", "index", "role", "margin", "residual", "offset"} <= set(table)
    np.testing.assert_allclose(table.loc[table["role"] != "share of mean error margin", "margin"], m["margin"],
                               atol=1e-6)
    assert an.run.outputs.current(PNG).read_bytes()[:8] == PNG_SIGNATURE
    lines = summary_lines(sec)
    assert f"{sec.k} NMF concepts" in lines[0] and len(lines) == 1 + len(p)
    assert f"concept {p['top_concept'].iloc[0]} (shown in {PNG}) carries {p['top_share'].iloc[0]:.0%}" in lines[1]
    page = index_section(an.run, sec)
    assert "data:image/jpeg;base64," in page and p["pair"].iloc[0] in page and "approx" not in page


FLAT_MODEL = '''
import torch
from torch import nn


class FlatHead(nn.Module):
    """Convs, then flatten + Linear: not a GAP head, so the split is gradient x activation."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, 8, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(8 * 7 * 7, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))
'''


def test_flatten_linear_head_is_marked_approximate(tmp_path):
    import importlib.util
    from helpers.data.readers import SYSTEM_FASHION_MNIST
    from helpers.steps.model_concepts import APPROX, concepts_step, index_section, summary_lines

    (tmp_path / "flat.py").write_text(FLAT_MODEL)
    spec = importlib.util.spec_from_file_location("flat", tmp_path / "flat.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    torch.save(mod.FlatHead().state_dict(), tmp_path / "flat.pt")   # untrained: plenty of errors
    an, conf = _analysis(tmp_path, tmp_path / "flat.pt", SYSTEM_FASHION_MNIST,
                         arch=f"{tmp_path / 'flat.py'}:FlatHead", deep=False, LIMIT=800)
    sec = concepts_step(an.run, conf, _most_confused_pair(conf))
    assert not sec.exact and sec.head_note and len(sec.pairs) and not sec.pairs["exact"].any()
    assert not sec.margins["exact"].any()
    _check_margins(an, sec)
    lines = summary_lines(sec)
    assert APPROX in lines[0] and all(APPROX in line for line in lines[1:])
    assert "approx" in index_section(an.run, sec)
    # gradient x activation checked against autograd through the head by hand: margin's gradient w.r.t. the
    # flattened features is w_B - w_A, so per image Σ g·A = (w_B - w_A)·features
    m = sec.margins.iloc[0]
    i, a, b = int(m["index"]), int(m["true_id"]), int(m["pred_id"])
    model = an.run.model.module
    with torch.no_grad():
        feats = torch.flatten(model.features(an.run.inputs[i:i + 1]), 1)[0].double()
        w = model.fc.weight.double()
        first_order = float((w[b] - w[a]) @ feats)
        bias = model.fc.bias.double()
    assert m["offset"] == pytest.approx(float(bias[b] - bias[a]), abs=1e-4)
    total = sum(m[f"c{j + 1}"] for j in range(sec.k)) + m["residual"]
    assert total == pytest.approx(first_order, abs=1e-4)


@pytest.mark.slow
def test_planted_shortcut_is_a_corner_concept(tmp_path, fmnist_shortcut):
    from conftest import SHORTCUT_BOX, SHORTCUT_PRED, SHORTCUT_TRUE
    from helpers.steps.model_concepts import concepts_step, summary_lines

    checkpoint, root, patched = fmnist_shortcut
    from types import SimpleNamespace
    an, conf = _analysis(tmp_path, checkpoint, root, deep=False)
    pr = an.run.preds
    assert np.mean(pr.preds[patched] == SHORTCUT_PRED) > 0.5        # the model took the shortcut
    # the group as the deep dive with GROUP_CLASSES=["Dress", "Trouser"] gives it (the step reads only that)
    sec = concepts_step(an.run, conf, SimpleNamespace(group=SimpleNamespace(group=[SHORTCUT_TRUE, SHORTCUT_PRED])))
    row = sec.pairs[(sec.pairs["true_id"] == SHORTCUT_TRUE) & (sec.pairs["pred_id"] == SHORTCUT_PRED)].iloc[0]
    y0, y1, x0, x1 = SHORTCUT_BOX
    in_corner = {k: sum(C.box_overlap(b, y0, x0, y1, x1) > 0 for b in boxes) for k, boxes in sec.patches.items()}
    corner = max(in_corner, key=in_corner.get)
    assert in_corner[corner] > len(sec.patches[corner]) / 2          # most of its top patches are the corner
    assert row["top_concept"] == corner                               # and it carries the largest share
    assert row["top_share"] > 0.5 and row["top_gap_share"] > 0.5
    # it is the patch: the errors are patched Dresses (no unpatched Dress went to Trouser here), and that
    # concept adds far more to their margins than to the unpatched correctly classified Dresses'
    m = sec.margins[(sec.margins["true_id"] == SHORTCUT_TRUE) & (sec.margins["pred_id"] == SHORTCUT_PRED)]
    on = np.isin(m["index"], patched)
    err, ok = m[(m["role"] == "error")], m[(m["role"] == "correct") & ~on]
    assert np.isin(err["index"], patched).mean() > 0.9 and len(ok) >= 100
    assert err[f"c{corner}"].mean() > 1.0 and err[f"c{corner}"].mean() > 3 * abs(ok[f"c{corner}"].mean())
    assert any(f"concept {corner} (shown in" in line and "Dress images to Trouser" in line
               for line in summary_lines(sec))


def test_vision_transformer_tokens_are_reshaped_and_marked_approximate(cifar_root, tmp_path):
    # A token layer (timm ViT, LayerNorm output: negative values too) goes through the engine's reshape
    # transform; the head is not GAP -> Linear, so the split is approximate, and it still adds up.
    timm = pytest.importorskip("timm")
    from conftest import run_params
    from helpers.pipeline import Analysis
    from helpers.steps.model_concepts import concepts_step

    kwargs = {"img_size": 32, "patch_size": 4, "depth": 2}
    torch.manual_seed(0)
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=100, **kwargs).eval().state_dict(),
               tmp_path / "vit.pt")
    an = Analysis(run_params(cifar_root, tmp_path / "vit.pt", tmp_path / "out", arch="timm:vit_tiny_patch16_224",
                             MODEL_KWARGS=kwargs, LIMIT=300), progress=False)
    an.load_model()
    an.load_data()
    an.predict()
    conf = an.confusion()
    sec = concepts_step(an.run, conf, _most_confused_pair(conf))
    assert not sec.exact and "4-D" in sec.head_note
    assert sec.layer == an.run.cams.engine().layer_name
    for boxes in sec.patches.values():   # an 8x8 token grid over 32 px: 4 px cells, boxes of 3 cells
        assert all(b.y1 - b.y0 <= 12 and b.x1 - b.x0 <= 12 for b in boxes)
    assert len(sec.margins)
    _check_margins(an, sec)



def test_without_a_deep_dive_the_step_says_so():
    from helpers.steps.model_concepts import concepts_step, index_section, summary_lines
    sec = concepts_step(None, None, None)
    assert sec.images is None and sec.k == 0 and not sec.files
    assert summary_lines(sec) == ["Concepts: not measured (the deep dive, which finds the group, did not run)."]
    assert "not measured" in index_section(None, sec)


def test_patch_in_corner_by_hand():
    from helpers.compute.concepts import PatchBox
    box = lambda cy, cx, side=7: PatchBox(1, 0, 0, 0, 1, 1, 1.0, cy=cy, cx=cx, map_h=side, map_w=side)  # noqa: E731
    assert box(1, 0).in_corner and box(0, 6).in_corner and box(6, 5).in_corner   # at an edge, next to a corner
    assert not box(1, 1).in_corner and not box(0, 3).in_corner and not box(3, 3).in_corner   # shoulder, collar, centre
    assert not box(0, 0, side=4).in_corner       # a 4x4 map has no inside to tell a corner from


def test_large_image_selection_keeps_correct_images_beside_the_errors():
    """At large images the concept sample is capped; errors take at most half of it while the rest can fill the
    other half (a model that gets most of the group wrong would otherwise leave no correct image to compare)."""
    from types import SimpleNamespace
    from helpers.steps.model_concepts import _select
    labels = np.repeat([0, 1, 2, 5], 100)
    preds = labels.copy()
    preds[:90] = 1                       # 90 errors of class 0 into class 1, 10 correct
    preds[100:170] = 2                   # 70 errors of class 1 into class 2
    run = SimpleNamespace(preds=SimpleNamespace(labels=labels, preds=preds))
    idx, notes = _select(run, [0, 1, 2], seed=0, cap=120, max_error_share=0.5)
    wrong = preds[idx] != labels[idx]
    assert len(idx) == 120 and len(np.unique(idx)) == 120 and wrong.sum() == 60 and notes
    assert set(labels[idx]) <= {0, 1, 2} and np.array_equal(idx, np.sort(idx))
    again, _ = _select(run, [0, 1, 2], seed=0, cap=120, max_error_share=0.5)
    assert np.array_equal(idx, again)                              # seeded
    every, _ = _select(run, [0, 1, 2], seed=0, cap=120)            # the default: every error first
    assert (preds[every] != labels[every]).sum() == 120
    few_rest, _ = _select(run, [0, 1, 2], seed=0, cap=290, max_error_share=0.5)
    assert len(few_rest) == 290 and (preds[few_rest] != labels[few_rest]).sum() == 150   # the rest (140) cannot
    #                                                                                       fill half: errors do
