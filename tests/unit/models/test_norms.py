"""Every DP-ready network with every DP-compatible norm: builds from the shipped configs,
segments, takes an Opacus DP-SGD step; GroupNorm's group counts fit each layer's channels."""

import pytest
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from torch import nn

from fedhealth.config import ModelConfig, compose
from fedhealth.errors import ConfigError
from fedhealth.models import DP_READY, build_model

NORMS = ("instance", "group")


def _group_norms(model):
    return [m for m in model.modules() if isinstance(m, nn.GroupNorm)]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", sorted(DP_READY))
def test_every_network_and_norm_builds_from_the_shipped_config_and_segments(name, norm):
    cfg = compose([f"model={name}", f"model.norm={norm}"]).model
    torch.manual_seed(0)
    model = build_model(cfg)
    assert bool(_group_norms(model)) == (norm == "group")
    with torch.no_grad():
        out = model(torch.randn(2, cfg.in_channels, 32, 32, 32))
    assert out.shape == (2, cfg.out_channels, 32, 32, 32)
    assert torch.isfinite(out).all()


def test_readme_group_norm_override_builds_with_the_default_model():
    # the README's `model.norm=group` on the default U-Net, whose 2-class output level used to
    # hit MONAI's "num_channels (2) must be divisible by num_groups (4)"
    cfg = compose(["model.norm=group"]).model
    model = build_model(cfg)
    with torch.no_grad():
        out = model(torch.zeros(2, cfg.in_channels, 32, 32, 32))
    assert out.shape == (2, cfg.out_channels, 32, 32, 32)
    assert {m.num_channels for m in _group_norms(model)} == {*cfg.channels, cfg.out_channels}


def _tiny(name, norm):
    if name == "unet":
        return ModelConfig(name=name, norm=norm, channels=[4, 8, 16], strides=[2, 2])
    return ModelConfig(name=name, norm=norm, channels=[4], strides=[])


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", sorted(DP_READY))
def test_one_dp_sgd_step_with_the_networks_grad_sample_mode(name, norm):
    torch.manual_seed(0)
    cfg = _tiny(name, norm)
    model = build_model(cfg)
    assert bool(_group_norms(model)) == (norm == "group")
    x = torch.randn(2, cfg.in_channels, 16, 16, 16)
    y = torch.randint(0, cfg.out_channels, (2, 16, 16, 16))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
    private, optimizer, _ = PrivacyEngine(accountant="rdp").make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
        grad_sample_mode=DP_READY[name],
    )
    before = [p.detach().clone() for p in private.parameters()]
    optimizer.zero_grad()
    F.cross_entropy(private(x), y).backward()
    params = [p for p in private.parameters() if p.requires_grad]
    assert params
    for p in params:
        assert p.grad_sample is not None and p.grad_sample.shape == (2, *p.shape)
    optimizer.step()
    after = list(private.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert all(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


@pytest.mark.parametrize(
    ("num_groups", "out_channels", "output_groups"),
    [(4, 2, 2), (8, 2, 2), (4, 3, 3), (2, 3, 1), (4, 1, 1), (4, 6, 3)],
)
def test_group_counts_divide_each_layers_channels(num_groups, out_channels, output_groups):
    # feature layers keep model.num_groups; only the U-Net's output level (out_channels wide)
    # takes the largest divisor of out_channels not above it
    cfg = ModelConfig(norm="group", num_groups=num_groups, out_channels=out_channels)
    norms = _group_norms(build_model(cfg))
    assert norms
    for m in norms:
        assert m.num_channels % m.num_groups == 0
        expected = output_groups if m.num_channels == out_channels else num_groups
        assert m.num_groups == expected, (m.num_channels, m.num_groups)
    assert any(m.num_channels == out_channels for m in norms)


@pytest.mark.parametrize("name", sorted(DP_READY))
def test_feature_layers_keep_num_groups(name):
    cfg = compose([f"model={name}", "model.norm=group", "model.num_groups=8"]).model
    norms = [m for m in _group_norms(build_model(cfg)) if m.num_channels != cfg.out_channels]
    assert norms
    assert {m.num_groups for m in norms} == {8}


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        (ModelConfig(norm="group", num_groups=3), r"model\.channels=\[8, 16, 32\]"),
        (ModelConfig(norm="group", num_groups=64), r"model\.channels=\[8, 16, 32\]"),
        (ModelConfig(norm="group", num_groups=0), r"model\.channels=\[8, 16, 32\]"),
        (
            ModelConfig(name="segresnet", norm="group", num_groups=4, channels=[6], strides=[]),
            r"model\.channels\[0\]=6",
        ),
    ],
    ids=["unet-3-groups", "unet-64-groups", "unet-0-groups", "segresnet-6-filters"],
)
def test_num_groups_not_dividing_the_feature_widths_is_a_config_error(cfg, field):
    with pytest.raises(ConfigError, match=rf"model\.num_groups={cfg.num_groups}\b.*{field}"):
        build_model(cfg)
