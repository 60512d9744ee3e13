"""Inputs below what a model or the op can take get a ValueError saying the limit (issue 24.9)."""
from __future__ import annotations

import pytest
import timm
import torch

import structvit  # noqa: F401  (registers the models)


@pytest.mark.parametrize("size", [(31, 64), (64, 31), (16, 16)])
def test_structvit_below_its_minimum_input_size_says_the_minimum(size):
    model = timm.create_model("structvit_s_4_1", num_classes=3).eval()
    with pytest.raises(ValueError, match=rf"minimum input size is 32x32 pixels .* got {size[0]}x{size[1]}"):
        model(torch.randn(1, 3, *size))


def test_structvit_at_its_minimum_input_size_runs():
    model = timm.create_model("structvit_tiny", num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_dense_backbone_pads_small_inputs_instead():
    model = timm.create_model("structvit_tiny", num_classes=0, dense=True).eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 20, 20)).shape[-2:] == (1, 1)
