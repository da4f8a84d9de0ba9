"""The attribution toolbox (helpers/model/attributions.py, steps/attributions.py, the explorer's Attribution
selector, EigenGradCAM): every Captum-backed map against Captum's own call, Integrated Gradients' completeness on
the real Fashion-MNIST model, rollout against a hand-computed product on a toy ViT whose attention is fixed,
timm's fused attention restored, torchvision's attention weights against MultiheadAttention called by hand, and
EigenGradCAM against pytorch-grad-cam."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import captum.attr as ca

from helpers.model import attributions as A

from conftest import FMNIST_ARCH


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def fmnist(fmnist_checkpoint, tmp_path_factory):
    """A real run: the trained Fashion-MNIST CNN on the first 1000 real test images, predicted and confused."""
    from helpers.config import Params
    from helpers.data.readers import SYSTEM_FASHION_MNIST
    from helpers.pipeline import Analysis
    if not (SYSTEM_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    params = Params(MODEL_PATH=str(fmnist_checkpoint), ARCH=FMNIST_ARCH, DATASET="fashion_mnist",
                    DATA_ROOT=str(SYSTEM_FASHION_MNIST), DOWNLOAD=False, LIMIT=1000,
                    OUTPUT_DIR=str(tmp_path_factory.mktemp("attr") / "out"), DEVICE="cpu", SEED=0)
    an = Analysis(params, progress=False)
    an.load_model()
    an.load_data()
    an.predict()
    yield an
    an.outputs.close(raise_errors=False)   # stops the background figure writer


@pytest.fixture(scope="module")
def batch(fmnist):
    """Four real test images, their predicted classes, the model and the dataset's normalisation."""
    idx = [0, 1, 2, 3]
    x = fmnist.inputs[idx].clone()
    return fmnist.loaded.module.eval(), x, fmnist.preds.preds[idx].astype(np.int64), fmnist.data


# ---------------------------------------------------------------------------------------------- Captum equality
def captum_direct(model, x, t, method, base, seed):
    """Captum's own call, written out independently of attributions._captum_raw. The random methods: one image
    per call, each seeded alike (so a map does not depend on its batch)."""
    if method in ("smoothgrad", "gradientshap", "lime", "kernelshap"):
        return torch.cat([captum_one(model, x[i:i + 1], t[i:i + 1], method, base[i:i + 1], seed)
                          for i in range(len(x))])
    return captum_one(model, x, t, method, base, seed)


def captum_one(model, x, t, method, base, seed):
    torch.manual_seed(seed)
    np.random.seed(seed)      # GradientShap draws its path points with NumPy's global generator
    tt = torch.as_tensor(t)
    xg = x.clone().requires_grad_(True)
    if method == "saliency":
        return ca.Saliency(model).attribute(xg, target=tt).abs().sum(1)
    if method == "inputxgradient":
        return ca.InputXGradient(model).attribute(xg, target=tt).sum(1)
    if method == "smoothgrad":
        return ca.NoiseTunnel(ca.Saliency(model)).attribute(xg, nt_type="smoothgrad", nt_samples=A.SMOOTHGRAD_SAMPLES,
                                                            stdevs=A.SMOOTHGRAD_STDEV, target=tt).abs().sum(1)
    if method == "integratedgradients":
        return ca.IntegratedGradients(model).attribute(xg, baselines=base, target=tt, n_steps=64).sum(1)
    if method == "gradientshap":
        dist = torch.cat([base, base + 0.1 * torch.randn_like(base)])
        return ca.GradientShap(model).attribute(xg, baselines=dist, n_samples=A.GRADSHAP_SAMPLES, target=tt).sum(1)
    h, w = x.shape[-2:]
    side = int(np.ceil(max(h, w) / A.GRID_CELLS))
    mask = torch.as_tensor((np.arange(h)[:, None] // side) * int(np.ceil(w / side)) + np.arange(w)[None, :] // side)
    cls = ca.Lime if method == "lime" else ca.KernelShap
    return cls(model).attribute(xg, baselines=base, target=tt, feature_mask=mask[None, None],
                                n_samples=A.PERTURBATION_SAMPLES, perturbations_per_eval=A.PERTURBATIONS_PER_EVAL).sum(1)


@pytest.mark.parametrize("method", ["saliency", "inputxgradient", "smoothgrad", "integratedgradients",
                                    "gradientshap", "lime", "kernelshap"])
def test_each_map_equals_captums_own_call(batch, method):
    model, x, t, data = batch
    n = 4 if A.ATTRIBUTION_METHODS[method].cost == "fast" else 2
    x, t = x[:n], t[:n]
    ours = A.attribute(model, x, t, method, baseline="black", mean=data.mean, std=data.std, seed=3)
    black = ((0 - torch.tensor(data.mean)) / torch.tensor(data.std)).reshape(1, -1, 1, 1).expand_as(x).clone()
    ref = captum_direct(model, x, t, method, black, seed=3).detach().numpy()
    assert ours.shape == (n, 28, 28) and ours.dtype == np.float32
    assert np.abs(ref).max() > 0                       # a map of zeros would match anything
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_a_map_does_not_depend_on_its_batch(batch):
    model, x, t, data = batch
    for method in ("smoothgrad", "gradientshap", "integratedgradients"):
        whole = A.attribute(model, x, t, method, baseline="uniform", mean=data.mean, std=data.std, batch_size=4)
        ones = A.attribute(model, x, t, method, baseline="uniform", mean=data.mean, std=data.std, batch_size=1)
        np.testing.assert_allclose(whole, ones, atol=1e-5, err_msg=method)


def test_gradient_batches_follow_the_saved_activations(batch, monkeypatch):
    model, x, t, data = batch
    kept = []

    def pack(tensor):
        kept.append(tensor.numel() * tensor.element_size())
        return tensor
    for n in (1, 3):                    # what autograd keeps per image, counted here by hand
        kept.clear()
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
            model(x[:1].repeat(n, 1, 1, 1).clone().requires_grad_(True))
        if n == 1:
            one = sum(kept)
    per_image = (sum(kept) - one) / 2
    assert A.gradient_batch_size(model, x) == int(A.GRADIENT_BATCH_BYTES // per_image)
    # a budget of 9 images: Captum takes whole steps of the 4 images, so IG's 4 x 64 path points go in 32
    # batches of 8; the maps stay Captum's own
    monkeypatch.setattr(A, "GRADIENT_BATCH_BYTES", int(9.5 * per_image))
    assert A.gradient_batch_size(model, x) == 9
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda inp: calls.append(len(inp)) or forward(inp))
    ours = A.attribute(model, x, t, "integratedgradients", baseline="black", mean=data.mean, std=data.std)
    assert set(calls[2:]) == {8} and sum(calls[2:]) == 4 * A.IG_STEPS   # after the two probe passes
    black = ((0 - torch.tensor(data.mean)) / torch.tensor(data.std)).reshape(1, -1, 1, 1).expand_as(x).clone()
    ref = captum_direct(model, x, t, "integratedgradients", black, seed=0).detach().numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_integrated_gradients_completeness_on_the_real_model(fmnist):
    # Completeness (Sundararajan et al. 2017): the attributions sum to f(x) - f(baseline). At 64 steps it holds
    # within 1% over 64 real test images (their sums) and within 2% for the median image; single images miss by
    # more where the straight path crosses many ReLU kinks (measured: black baseline, median 0.7% on one CPU and
    # 1.2% on another, whose fixture model trains to other weights; 90th percentile 2.7%, worst 14%), and 4x the
    # steps brings those closer.
    model = fmnist.loaded.module.eval()
    x = fmnist.inputs[:64].clone()
    t = fmnist.preds.preds[:64].astype(np.int64)
    data = fmnist.data
    for kind in ("black", "blurred"):
        base = A.make_baseline(x, kind, data.mean, data.std)
        with torch.no_grad():
            rows = np.arange(len(t))
            gap = (model(x)[rows, t] - model(base)[rows, t]).numpy()
        assert np.median(np.abs(gap)) > 0.5, gap         # a real difference to explain
        sums = A.attribute(model, x, t, "integratedgradients", baseline=kind, mean=data.mean,
                           std=data.std).reshape(len(t), -1).sum(1)
        rel = np.abs(sums - gap) / np.abs(gap)
        print(f"IG {kind}, 64 steps: per-image completeness error median {np.median(rel):.2%}, "
              f"90th percentile {np.quantile(rel, 0.9):.2%}, max {rel.max():.2%}")
        assert abs(sums.sum() - gap.sum()) <= 0.01 * abs(gap.sum())
        assert np.median(rel) < 0.02
        worst = np.argsort(-rel)[:8]
        finer = A.IG_STEPS
        try:
            A.IG_STEPS = 4 * finer
            more = A.attribute(model, x[worst], t[worst], "integratedgradients", baseline=kind, mean=data.mean,
                               std=data.std).reshape(len(worst), -1).sum(1)
        finally:
            A.IG_STEPS = finer
        assert np.mean(np.abs(more - gap[worst])) < np.mean(np.abs(sums[worst] - gap[worst]))


def test_baselines_by_hand():
    x = torch.rand(2, 3, 16, 16)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    black = A.make_baseline(x, "black", mean, std)
    np.testing.assert_allclose(black[:, 1].numpy(), -0.4 / 0.25, rtol=1e-6)
    noise = A.make_baseline(x, "uniform", mean, std, seed=1)
    pixels = noise * torch.tensor(std).reshape(1, 3, 1, 1) + torch.tensor(mean).reshape(1, 3, 1, 1)
    assert 0 <= float(pixels.min()) and float(pixels.max()) <= 1 and float(pixels.std()) > 0.2
    assert torch.equal(noise, A.make_baseline(x, "uniform", mean, std, seed=1))   # seeded
    const = torch.full((1, 1, 16, 16), 2.0)
    np.testing.assert_allclose(A.make_baseline(const, "blurred").numpy(), 2.0, rtol=1e-6)   # a blur keeps a constant
    with pytest.raises(Exception, match="Unknown baseline"):
        A.make_baseline(x, "grey")


def test_grid_superpixels_for_small_images():
    mask = A.superpixels(torch.zeros(2, 1, 28, 28))
    assert mask.shape == (2, 1, 28, 28)
    # side ceil(28 / 8) = 4: 7 x 7 cells of 16 pixels each, row-major ids
    assert sorted(np.bincount(mask[0, 0].flatten().numpy())) == [16] * 49
    assert int(mask[0, 0, 0, 4]) == 1 and int(mask[0, 0, 4, 0]) == 7


def test_slic_superpixels_follow_the_image_above_32_px():
    pytest.importorskip("skimage")
    # a 64-px image: left half black, right half white, in 3 channels. SLIC segments never straddle the edge,
    # unlike the fixed grid's cells, and there are about SLIC_SEGMENTS of them.
    x = torch.zeros(1, 3, 64, 64)
    x[..., 32:] = 1.0
    mask = A.superpixels(x)[0, 0].numpy()
    assert mask.shape == (64, 64)
    for seg in np.unique(mask):
        cols = np.nonzero(mask == seg)[1]
        assert cols.max() < 32 or cols.min() >= 32, seg
    assert 0.3 * A.SLIC_SEGMENTS <= len(np.unique(mask)) <= 2 * A.SLIC_SEGMENTS


def test_slow_methods_are_not_in_any_default_list(batch):
    model = batch[0]
    assert {m for m, s in A.ATTRIBUTION_METHODS.items() if s.cost == "slow"} == {"lime", "kernelshap"}
    assert not {"lime", "kernelshap"} & set(A.DEFAULT_METHODS)
    assert not {"lime", "kernelshap"} & set(A.methods_for(model))
    assert set(A.methods_for(model, include_slow=True)) >= {"lime", "kernelshap"}
    assert "rollout" not in A.methods_for(model)        # not a ViT


# ---------------------------------------------------------------------------------------------- ViT attention
class FixedAttention(nn.Module):
    """A timm-like attention whose weights are given (heads, T, T): the output mixes the tokens with them."""

    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.weights = weights
        self.attn_drop = nn.Identity()
        self.fused_attn = True

    def forward(self, x):
        attn = self.attn_drop(self.weights.unsqueeze(0).expand(x.shape[0], -1, -1, -1))
        return attn.mean(1) @ x


class ToyBlock(nn.Module):
    def __init__(self, weights):
        super().__init__()
        self.attn = FixedAttention(weights)

    def forward(self, x):
        return x + self.attn(x)


class ToyViT(nn.Module):
    """CLS + 4 patch tokens (a 2 x 2 grid of 4 x 4 patches on an 8 x 8 image), two blocks, a linear head."""

    def __init__(self, w1, w2):
        super().__init__()
        self.num_prefix_tokens = 1
        self.blocks = nn.Sequential(ToyBlock(w1), ToyBlock(w2))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        patches = x[:, 0].unfold(1, 4, 4).unfold(2, 4, 4).reshape(x.shape[0], 4, 16)
        tokens = torch.cat([torch.zeros(x.shape[0], 1, 16), patches], dim=1)
        return self.head(self.blocks(tokens)[:, 0])


def random_attention(gen, heads=2, t=5):
    return torch.softmax(torch.randn(heads, t, t, generator=gen), dim=-1)


def test_rollout_on_a_two_block_toy_vit_equals_the_hand_computed_product():
    # Abnar & Zuidema (2020): per block, average the heads, add the identity for the residual, renormalise the
    # rows, multiply the blocks in order (last on the left), read the CLS row over the patch tokens.
    gen = torch.Generator().manual_seed(0)
    w1, w2 = random_attention(gen), random_attention(gen)
    model = ToyViT(w1, w2).eval()
    x = torch.rand(1, 1, 8, 8)
    a1, a2 = (w.mean(0).numpy().astype(np.float64) for w in (w1, w2))
    hat = [(a + np.eye(5)) / 2 for a in (a1, a2)]
    hat = [h / h.sum(1, keepdims=True) for h in hat]
    expected = (hat[1] @ hat[0])[0, 1:].reshape(2, 2)
    attns, prefix = A.attention_matrices(model, x)
    assert prefix == 1
    np.testing.assert_allclose(A.rollout(attns)[0].numpy(), hat[1] @ hat[0], rtol=1e-5, atol=1e-6)
    maps = A.attribute(model, x, [0], "rollout")
    # bilinear upsampling of the 2 x 2 grid to 8 x 8 keeps the four values at the cell centres' neighbours
    small = torch.nn.functional.interpolate(torch.tensor(expected)[None, None].float(), size=(8, 8),
                                            mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(maps[0], small, rtol=1e-5, atol=1e-6)
    raw = A.attribute(model, x, [0], "attention")      # the last block alone, heads averaged
    last = torch.nn.functional.interpolate(torch.tensor(a2[0, 1:].reshape(2, 2))[None, None].float(), size=(8, 8),
                                           mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(raw[0], last, rtol=1e-5, atol=1e-6)
    assert all(b.attn.fused_attn for b in model.blocks)   # restored


def test_timm_fused_attention_is_switched_off_only_while_the_maps_are_computed():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              num_classes=10).eval()
    flags = [b.attn.fused_attn for b in model.blocks]
    seen = []
    model.blocks[-1].attn.attn_drop.register_forward_hook(lambda m, i, o: seen.append(model.blocks[-1].attn.fused_attn))
    x = torch.randn(2, 3, 32, 32)
    attns, prefix = A.attention_matrices(model, x)
    assert seen == [False]                              # the weights were read from the unfused path...
    assert [b.attn.fused_attn for b in model.blocks] == flags and flags[0] is True   # ... and the flag restored
    assert len(attns) == len(model.blocks) and attns[0].shape == (2, 3, 17, 17) and prefix == 1
    # the captured weights are softmax(q k^T * scale) of the block's own qkv on its normalised input
    blk, store = model.blocks[0], {}
    blk.norm1.register_forward_hook(lambda m, i, o: store.__setitem__("x", o))
    with torch.no_grad():
        model(x)
        qkv = blk.attn.qkv(store["x"]).reshape(2, 17, 3, 3, 64).permute(2, 0, 3, 1, 4)
        ref = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) * blk.attn.scale, dim=-1)
    torch.testing.assert_close(attns[0], ref, rtol=1e-4, atol=1e-5)
    maps = A.attribute(model, x, [0, 1], "rollout")
    assert maps.shape == (2, 32, 32) and np.isfinite(maps).all()
    assert [b.attn.fused_attn for b in model.blocks] == flags


def test_torchvision_vit_attention_weights_match_multihead_attention_by_hand():
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    attns, prefix = A.attention_matrices(model, x)
    layer, store = model.encoder.layers[1], {}
    layer.ln_1.register_forward_hook(lambda m, i, o: store.__setitem__("x", o))
    with torch.no_grad():
        logits = model(x)
        y = store["x"]
        _, ref = layer.self_attention(y, y, y, need_weights=True, average_attn_weights=False)
    assert prefix == 1 and len(attns) == 2 and attns[1].shape == (2, 2, 17, 17)
    torch.testing.assert_close(attns[1], ref)
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits)   # the hooks are gone and the output unchanged
    assert A.attribute(model, x, [0, 1], "attention").shape == (2, 32, 32)


# ---------------------------------------------------------------------------------------------- EigenGradCAM
def test_eigengradcam_is_a_cam_method_and_matches_pytorch_grad_cam(batch, tmp_path):
    from pytorch_grad_cam import EigenGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from helpers.config import Params
    from helpers.model.cams import CAM_METHODS, CLASS_AGNOSTIC_METHODS, CamEngine
    from helpers.pipeline import Analysis
    Analysis(Params(OUTPUT_DIR=str(tmp_path), CAM_METHOD="eigengradcam"))   # accepted by CAM_METHOD validation
    assert CAM_METHODS["eigengradcam"] is EigenGradCAM and "eigengradcam" not in CLASS_AGNOSTIC_METHODS
    model, x, t, _ = batch
    engine = CamEngine(model, "eigengradcam", input_shape=(1, 28, 28))
    ours = engine.compute(x, t, progress=False)
    lib = EigenGradCAM(model, [engine.layer])
    try:
        ref = lib(input_tensor=x.clone(), targets=[ClassifierOutputTarget(int(c)) for c in t])
    finally:
        lib.activations_and_grads.release()
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    other = engine.compute(x, (t + 1) % 10, progress=False)
    assert np.abs(other - ours).max() > 0.05              # class-discriminative, unlike EigenCAM


# ---------------------------------------------------------------------------------------------- the step
@pytest.mark.slow
def test_method_comparison_step_on_the_real_model(fmnist):
    from helpers.model.faithfulness import faithfulness
    from helpers.steps.attributions import CSV, PNG, index_section, method_comparison, summary_lines
    an = fmnist
    conf = an.confusion()
    from helpers.steps.deep_dive import run_deep_dive
    deep = run_deep_dive(an.run, conf, parts=[])          # the group only
    sec = method_comparison(an.run, conf, deep)
    pr, g = an.preds, deep.group.group
    # the images: the group's errors, most confident first (independently recomputed)
    err = [i for i in range(len(pr.labels)) if pr.labels[i] in g and pr.preds[i] in g and pr.labels[i] != pr.preds[i]]
    err.sort(key=lambda i: (-pr.probs[i, pr.preds[i]], i))
    assert sec.indices == err[:4] and len(sec.indices) == 4
    assert sec.methods == list(A.DEFAULT_METHODS) and "lime" not in sec.methods and "kernelshap" not in sec.methods
    # the maps drawn are the toolbox's maps for the true and the predicted class
    x = an.inputs[sec.indices]
    np.testing.assert_allclose(sec.maps_pred["saliency"], A.attribute(an.loaded.module, x, sec.pred_classes,
                                                                      "saliency"), atol=1e-6)
    np.testing.assert_allclose(sec.maps_true["integratedgradients"], A.attribute(
        an.loaded.module, x, sec.true_classes, "integratedgradients", mean=an.data.mean, std=an.data.std), atol=1e-5)
    # ROAD of the seeded random maps, recomputed with pytorch-grad-cam's metric directly
    rnd = np.random.default_rng(an.params.SEED).random((4, 28, 28), dtype=np.float32)
    ref = faithfulness(an.loaded.module, x, sec.pred_classes, rnd)
    assert sec.road_random == pytest.approx(float(np.mean(ref)), abs=1e-5)
    sal = faithfulness(an.loaded.module, x, sec.pred_classes, sec.maps_pred["saliency"])
    row = sec.scores.set_index("method").loc["saliency"]
    assert row["road"] == pytest.approx(float(np.mean(sal)), abs=1e-5)
    assert (sec.scores["seconds_per_map"] > 0).all()
    an.outputs.flush()
    on_disk = pd.read_csv(an.outputs.current(CSV))
    pd.testing.assert_frame_equal(on_disk, sec.scores, check_dtype=False, atol=1e-9)
    from PIL import Image
    with Image.open(an.outputs.current(PNG)) as img:
        assert img.size[0] > 600
    lines = summary_lines(sec)
    assert any("saliency: ROAD" in s for s in lines) and f"{sec.road_random:+.4f}" in lines[0]
    page = index_section(an.run, sec)
    assert "data:image/" in page and "<td>integratedgradients</td>" in page
    print("\n".join(lines))


# ---------------------------------------------------------------------------------------------- the widget
def test_widget_attribution_selector_draws_and_caches(fmnist):
    from PIL import Image
    import base64
    import re
    from helpers.compute import metrics
    from helpers.widget import NO_ATTRIBUTION, ClassExplorer
    ex = ClassExplorer(fmnist, layers=[])
    options = [v for _, v in ex.attribution_dropdown.options]
    assert options[0] == NO_ATTRIBUTION and "saliency" in options and "kernelshap" in options
    assert "attribution" not in ex.output.value           # off by default: nothing computed
    assert ex.n_attributions == 0
    ex.n_slider.value = 2
    ex.attribution_dropdown.value = "saliency"            # the callback, as a person selecting it
    page = ex.output.value
    shots = re.findall(r'class="attribution" src="data:image/png;base64,([^"]+)"', page)
    assert len(shots) == 1
    with Image.open(io.BytesIO(base64.b64decode(shots[0]))) as img:
        assert img.size[0] > 200
    pr = fmnist.preds
    worst, best = metrics.gallery_examples(pr.labels, pr.preds, pr.probs, ex.state.cls, 2,
                                           max(1, round(2 * fmnist.params.N_BEST / fmnist.params.N_WORST)))
    shown = list(worst) + list(best)
    computed = ex.n_attributions
    assert computed == len({(i, int(pr.labels[i])) for i in shown} | {(i, int(pr.preds[i])) for i in shown})
    i = shown[0]
    np.testing.assert_allclose(ex._attributions[(i, int(pr.preds[i]), "saliency")],
                               A.attribute(fmnist.loaded.module, fmnist.inputs[[i]], [pr.preds[i]], "saliency")[0],
                               atol=1e-6)
    assert ex.attribution_progress.layout.visibility == "hidden"
    ex.attribution_dropdown.value = NO_ATTRIBUTION
    ex.attribution_dropdown.value = "saliency"            # cached per (image, class, method): nothing new
    assert ex.n_attributions == computed
    ex.select(attribution="inputxgradient")
    assert ex.n_attributions == 2 * computed and 'class="attribution"' in ex.output.value
