"""Groups-trick per-sample gradients of 3D (transposed) convolutions equal a brute-force loop."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from fedhealth.training import grad_samplers


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv3d(3, 4, 3, stride=2, padding=1),
        nn.Conv3d(3, 4, 1),
        nn.Conv3d(2, 3, 3, padding=2, dilation=2, bias=False),
        nn.ConvTranspose3d(4, 2, 3, stride=2, padding=1, output_padding=1),
        nn.ConvTranspose3d(3, 3, 3, stride=1, padding=1),
    ],
    ids=lambda layer: repr(layer),
)
def test_per_sample_gradients_equal_one_backward_per_sample(layer: nn.Module) -> None:
    torch.manual_seed(0)
    x = torch.randn(5, layer.in_channels, 6, 6, 6)
    plain = copy.deepcopy(layer)
    brute = {
        name: torch.stack(
            [torch.autograd.grad((plain(x[i : i + 1]) ** 2).sum(), p)[0] for i in range(5)]
        )
        for name, p in plain.named_parameters()
    }
    module = GradSampleModule(layer, batch_first=True, loss_reduction="sum", force_functorch=False)
    (module(x) ** 2).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad_sample.shape == brute[name].shape, name
        torch.testing.assert_close(p.grad_sample, brute[name], atol=2e-4, rtol=1e-4)


def test_opacus_hooks_mode_uses_these_samplers() -> None:
    samplers = GradSampleModule.GRAD_SAMPLERS
    assert samplers[nn.Conv3d] is grad_samplers.conv3d_grad_sample
    assert samplers[nn.ConvTranspose3d] is grad_samplers.conv_transpose3d_grad_sample
