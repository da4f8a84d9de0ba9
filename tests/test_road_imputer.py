"""ROAD's imputation (helpers.model.cams.RoadImputer, road_metric): the library's own result up to ROAD_MAX_SIDE px,
and above it a reduced-grid solve that never changes kept pixels, never reads removed ones, reproduces what linear
imputation reproduces exactly (a linear ramp), and keeps ROAD's verdict on a model whose evidence is known."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam.metrics.road import NoisyLinearImputer, ROADMostRelevantFirst
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
from torch import nn

from helpers.model.faithfulness import faithfulness
from helpers.model.road import ROAD_MAX_SIDE, RoadImputer, road_metric

pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")


def _blob_mask(side: int, cy: float, cx: float, radius: float) -> torch.Tensor:
    yy, xx = np.mgrid[:side, :side]
    return torch.as_tensor(((yy - cy) ** 2 + (xx - cx) ** 2 > radius ** 2).astype(np.float32))   # 0 = impute


@pytest.mark.parametrize("side,channels", [(28, 1), (32, 3), (ROAD_MAX_SIDE, 3)])
def test_up_to_max_side_it_is_the_library_imputer(side, channels):
    g = torch.Generator().manual_seed(side)
    img = torch.randn(channels, side, side, generator=g)
    masks = [_blob_mask(side, side * 0.4, side * 0.6, side * 0.25),
             torch.as_tensor((np.random.default_rng(0).random((side, side)) > 0.2).astype(np.float32)),
             _blob_mask(side, 0, 0, side * 0.3)]            # touching the border: neighbours outside the image
    for mask in masks:
        torch.manual_seed(5)
        ref = NoisyLinearImputer()(img, mask)
        torch.manual_seed(5)
        got = RoadImputer()(img, mask)
        np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-5)


def test_reduced_grid_keeps_kept_pixels_and_never_reads_removed_ones():
    side = 224
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, side, side, generator=g)
    mask = _blob_mask(side, 90, 130, 50) * torch.as_tensor(
        (np.random.default_rng(1).random((side, side)) > 0.1).astype(np.float32))   # a blob and scattered pixels
    removed = mask == 0
    torch.manual_seed(2)
    out = RoadImputer()(img, mask)
    assert torch.equal(out[:, ~removed], img[:, ~removed])
    assert torch.isfinite(out).all()
    other = img.clone()
    other[:, removed] = torch.rand(3, int(removed.sum()), generator=g) * 10   # what was removed must not matter
    torch.manual_seed(2)
    np.testing.assert_array_equal(RoadImputer()(other, mask).numpy(), out.numpy())


def test_reduced_grid_reproduces_a_linear_ramp():
    # Linear imputation with symmetric neighbour weights reproduces a linear function inside the image: the
    # library exactly, the reduced grid to within a fraction of the ramp's range (cells of partly kept pixels
    # average them off their centre).
    side = 224
    yy, xx = np.mgrid[:side, :side].astype(np.float32)
    img = torch.as_tensor(np.stack([xx / side, yy / side, (xx + yy) / (2 * side)]))
    mask = _blob_mask(side, 110, 100, 45)
    removed = mask == 0
    ref = NoisyLinearImputer(noise=0)(img, mask)
    got = RoadImputer(noise=0)(img, mask)
    assert float((ref - img)[:, removed].abs().max()) < 1e-4
    err = (got - img)[:, removed].abs()
    assert float(err.mean()) < 0.002 and float(err.max()) < 0.01
    # the noise: the library's magnitude, on the removed pixels only
    noisy = RoadImputer()(img, mask) - got
    assert 0.007 < float(noisy[:, removed].std()) < 0.013 and float(noisy[:, ~removed].abs().max()) == 0


class QuarterDetector(nn.Module):
    """224-px images: class 0 logit = 40 * mean of the top-left 112 x 112 quarter of channel 0; class 1 logit = 0."""

    def forward(self, x):
        s = 40 * x[:, 0, :112, :112].mean(dim=(1, 2))
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def test_faithfulness_at_224_px_keeps_the_library_verdict():
    side = 224
    x = torch.zeros(2, 1, side, side)
    x[:, :, 16:72, 16:72] = 1.0                       # the evidence: a bright patch in the top-left quarter
    yy, xx = np.mgrid[:side, :side]
    on = np.exp(-((yy - 44) ** 2 + (xx - 44) ** 2) / 2000.0).astype(np.float32)
    off = np.exp(-((yy - 190) ** 2 + (xx - 190) ** 2) / 2000.0).astype(np.float32)
    maps = np.stack([on, off])
    got = faithfulness(QuarterDetector(), x, [0, 0], maps, seed=0)
    torch.manual_seed(0)
    ref = ROADMostRelevantFirst(percentile=80)(x, maps, [ClassifierOutputSoftmaxTarget(0)] * 2, QuarterDetector())
    assert ref[0] < -0.3 and abs(ref[1]) < 0.05       # the library: removing the evidence drops p(class 0)
    assert got[0] < -0.3 and abs(got[1]) < 0.05
    np.testing.assert_allclose(got, ref, atol=0.02)
    # road_metric is the library's metric class around the imputer: the same call signature and return_diff
    torch.manual_seed(0)
    direct = road_metric(80)(x, maps, [ClassifierOutputSoftmaxTarget(0)] * 2, QuarterDetector())
    np.testing.assert_allclose(direct, got, atol=1e-6)
