import pytest

from fedhealth.config import compose, flatten, from_site_settings, site_settings, unflatten
from fedhealth.errors import ConfigError


def test_overrides_select_groups_and_values():
    cfg = compose(["sites=4", "rounds=5", "strategy=fedprox"])
    assert (cfg.sites, cfg.rounds, cfg.strategy.name) == (4, 5, "fedprox")
    assert cfg.strategy.proximal_mu > 0


def test_flatten_is_plain_scalars_and_round_trips():
    cfg = compose(["model.channels=[4,8,16]"])
    flat = flatten(cfg)
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert unflatten(flat) == cfg


def test_site_settings_carry_no_paths():
    cfg = compose(["data.root=/secret/hospital/path"])
    settings = site_settings(cfg)
    assert not any("/secret" in str(v) for v in settings.values())
    assert from_site_settings(settings).model == cfg.model


@pytest.mark.parametrize(
    "override, field",
    [("sites=many", "sites"), ("train.lr=-1", "train.lr"), ("model.bogus=1", "bogus")],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        compose([override])
