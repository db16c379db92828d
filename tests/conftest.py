"""Shared fixtures: tiny models and images built in the test, nothing downloaded."""

import pytest
import torch

from first_stage.config import ModelConfig
from first_stage.model import new_autoencoder
from first_stage.perceptual import LPIPS, VGG16_FILENAME


def standin_vgg16_state() -> dict[str, torch.Tensor]:
    """Random VGG16 weights under torchvision's keys, scaled like a trained net (He init)."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, value in LPIPS().state_dict().items():
        if not key.startswith("features."):
            continue
        if key.endswith("weight"):
            fan_in = value[0].numel()
            state[key] = torch.randn(value.shape, generator=g) * (2.0 / fan_in) ** 0.5
        else:
            state[key] = torch.randn(value.shape, generator=g) * 0.01
    # The real file also holds the classifier, which LPIPS must ignore (tiny shapes here).
    state["classifier.0.weight"] = torch.zeros(4, 4)
    state["classifier.0.bias"] = torch.zeros(4)
    return state


@pytest.fixture(scope="session")
def vgg_file(tmp_path_factory):
    """A stand-in for torchvision's vgg16-397923af.pth (random weights, the real keys)."""
    path = tmp_path_factory.mktemp("weights") / VGG16_FILENAME
    torch.save(standin_vgg16_state(), path)
    return path


@pytest.fixture
def tiny_vae():
    torch.manual_seed(0)
    return new_autoencoder(ModelConfig(preset="tiny"))


@pytest.fixture
def images():
    """(2,3,32,32) smooth random images in [-1, 1]."""
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(2, 3, 8, 8, generator=g), size=32, mode="bilinear")
    return x * 2 - 1
