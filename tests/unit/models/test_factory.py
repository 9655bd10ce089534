import pytest
import torch
from torch import nn

from fedhealth.config import ModelConfig
from fedhealth.errors import ConfigError
from fedhealth.models import DP_READY, build_model, check_dp_compatible


@pytest.mark.parametrize("name", sorted(DP_READY))
def test_networks_segment_and_have_no_batchnorm(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, norm="group" if name == "segresnet" else "instance"))
    out = model(torch.zeros(1, 1, 32, 32, 32))
    assert out.shape == (1, 2, 32, 32, 32)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_same_seed_same_initial_weights():
    torch.manual_seed(7)
    a = build_model(ModelConfig()).state_dict()
    torch.manual_seed(7)
    b = build_model(ModelConfig()).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_batchnorm_is_refused():
    with pytest.raises(ConfigError, match="BatchNorm"):
        build_model(ModelConfig(norm="batch"))
    with pytest.raises(ConfigError, match="BatchNorm"):
        check_dp_compatible(nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2)))
    with pytest.raises(ConfigError, match="in-place"):
        check_dp_compatible(nn.Sequential(nn.Conv3d(1, 2, 3), nn.ReLU(inplace=True)))
