"""Grad-CAMs of every image for its true and predicted class, kept by the inference pass (GAP -> Linear heads),
equal pytorch-grad-cam's GradCAM called directly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from helpers.model.inference import run_inference
from helpers.model.pass_cams import PRED, TRUE, PassCams


def test_pass_cams_equal_the_library():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.randn(14, 3, 64, 64)
    labels = np.arange(14) % 5
    kept = PassCams(model.layer4, model.fc.weight, len(x))
    pr = run_inference(model, x, labels, batch_size=4, progress=False, observers=[kept])
    assert kept.complete
    idx = np.array([0, 3, 7, 13])
    cam = GradCAM(model=model, target_layers=[model.layer4])
    for which, classes in ((TRUE, labels), (PRED, pr.preds)):
        ref = cam(input_tensor=x[idx], targets=[ClassifierOutputTarget(int(c)) for c in classes[idx]])
        got = kept.maps(idx, which, (64, 64))
        assert got.shape == (4, 64, 64) and got.std() > 0
        np.testing.assert_allclose(got, ref, atol=1e-5)
    # the store's lookup: only the kept (image, true or predicted class) requests, the same maps
    other = (labels[idx] + 1) % 5
    other = np.where(other == pr.preds[idx], (other + 1) % 5, other)
    pos, maps = kept.lookup(np.r_[idx, idx], np.r_[pr.preds[idx], other], (64, 64))
    assert pos.tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(maps, kept.maps(idx, PRED, (64, 64)), atol=1e-6)


def test_a_pass_that_saw_no_map_is_not_complete():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
    kept = PassCams(model[0], model[1].weight, 6)   # the hooked layer gives a 2-D output: nothing to keep
    run_inference(model, torch.randn(6, 3, 2, 2), np.zeros(6, int), batch_size=4, progress=False, observers=[kept])
    assert not kept.complete
    with pytest.raises(ValueError):
        kept.maps([0], TRUE, (2, 2))
