"""The U-Net: shapes, instance norm, leaky ReLU, Kaiming initialization."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.train.models import build_unet, count_parameters


@pytest.mark.parametrize(("dim", "spatial"), [("2d", (37, 30)), ("3d", (9, 17, 12))])
def test_output_keeps_the_input_size_for_any_size(dim, spatial) -> None:
    model = build_unet(dim, 4, 2, features=4, levels=3)
    out = model(torch.randn(2, 4, *spatial))
    assert out.shape == (2, 2, *spatial)


def test_layers_are_instance_norm_and_leaky_relu() -> None:
    model = build_unet("3d", 4, 1, features=4, levels=3)
    kinds = {type(m) for m in model.modules()}
    assert nn.InstanceNorm3d in kinds
    assert not kinds & {nn.BatchNorm3d, nn.ReLU}
    slopes = {m.negative_slope for m in model.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.01}


def test_kaiming_initialization() -> None:
    torch.manual_seed(0)
    model = build_unet("2d", 4, 1, features=32, levels=3)
    conv = max((m for m in model.modules() if isinstance(m, nn.Conv2d)),
               key=lambda m: m.weight.numel())
    fan_in = conv.weight[0].numel()
    # He et al. 2015 with leaky-ReLU gain: std = sqrt(2 / ((1 + a^2) fan_in)), a = 0.01;
    # over >= 9000 weights the sample std is within ~2 % of it (tolerance 5 %)
    expected = math.sqrt(2.0 / ((1 + 0.01**2) * fan_in))
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.05)
    biases = [m.bias for m in model.modules() if isinstance(m, nn.Conv2d) and m.bias is not None]
    assert all(torch.count_nonzero(b) == 0 for b in biases)


def test_gradients_reach_the_first_layer() -> None:
    model = build_unet("2d", 1, 1, features=4, levels=3)
    model(torch.randn(2, 1, 16, 16)).sum().backward()
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.weight.grad is not None
    assert first.weight.grad.abs().sum() > 0
    assert count_parameters(model) > 0


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match=r"dim must be '2d' or '3d', got '4d'"):
        build_unet("4d", 1, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"levels must be an int >= 3, got 1"):
        build_unet("2d", 1, 1, levels=1)
    model = build_unet("2d", 4, 1, features=4)
    with pytest.raises(ValueError, match=r"2d U-Net expects input \(N, 4, \*, \*\), got shape \(1, 3, 8, 8\)"):
        model(torch.zeros(1, 3, 8, 8))
