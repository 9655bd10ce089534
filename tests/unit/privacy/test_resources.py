"""The site's compute limits: each field refused at its limit + 1, accepted at the limit."""

from __future__ import annotations

import pytest

from fedhealth.config import compose
from fedhealth.errors import PolicyRefused
from fedhealth.models.factory import build_model, num_parameters
from fedhealth.privacy.policy import SitePolicy
from fedhealth.privacy.resources import check_resources

SMALL = (
    "model.channels=[4,8]",
    "model.strides=[2]",
    "data.patch_size=32",
    "train.batch_size=2",
)
POLICY = SitePolicy(
    max_patch_size=64,
    min_target_spacing=1.0,
    max_batch_size=8,
    max_sw_batch_size=4,
    max_num_threads=2,
)


@pytest.mark.parametrize(
    ("override", "field", "said"),
    [
        ("data.patch_size=68", "max_patch_size", "data.patch_size=68; this site allows 64"),
        ("data.target_spacing=0.9", "min_target_spacing", "0.9 mm is finer than this site's 1 mm"),
        ("train.batch_size=9", "max_batch_size", "train.batch_size=9; this site allows 8"),
        ("data.sw_batch_size=5", "max_sw_batch_size", "data.sw_batch_size=5; this site allows 4"),
        ("train.num_threads=3", "max_num_threads", "train.num_threads=3; this site allows 2"),
    ],
)
def test_each_compute_limit_refuses_one_past_it(override: str, field: str, said: str) -> None:
    cfg = compose([*SMALL, override])
    with pytest.raises(PolicyRefused) as info:
        check_resources(POLICY, "hospital-a", cfg)
    assert info.value.field == field
    assert said in str(info.value) and "hospital-a" in str(info.value)


def test_the_limits_themselves_are_allowed() -> None:
    at_limit = ("data.patch_size=64", "data.target_spacing=1.0", "train.batch_size=8")
    check_resources(POLICY, "hospital-a", compose([*SMALL, *at_limit, "data.sw_batch_size=4"]))


def test_model_size_is_counted_exactly_without_allocating() -> None:
    cfg = compose(list(SMALL))
    exact = num_parameters(build_model(cfg.model))
    check_resources(SitePolicy(max_model_parameters=exact), "hospital-a", cfg)
    with pytest.raises(PolicyRefused) as info:
        check_resources(SitePolicy(max_model_parameters=exact - 1), "hospital-a", cfg)
    assert info.value.field == "max_model_parameters"
    assert f"{exact:,} parameters" in str(info.value)
    # a 30M-parameter U-Net is refused by a 1M limit without ever holding its 120 MB
    big = compose(["model.channels=[40,80,160,320,640]", "model.strides=[2,2,2,2]"])
    with pytest.raises(PolicyRefused, match="max_model_parameters"):
        check_resources(SitePolicy(max_model_parameters=1_000_000), "hospital-a", big)


def test_num_threads_zero_means_the_machines_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 3)
    check_resources(SitePolicy(), "h", compose([*SMALL, "train.num_threads=3"]))
    with pytest.raises(PolicyRefused, match="allows 3"):
        check_resources(SitePolicy(), "h", compose([*SMALL, "train.num_threads=4"]))


@pytest.mark.parametrize(
    "bad",
    [
        {"max_patch_size": 8},
        {"min_target_spacing": 0},
        {"max_batch_size": 0},
        {"max_sw_batch_size": 0},
        {"max_num_threads": -1},
        {"max_model_parameters": 0},
    ],
)
def test_policy_validation_names_a_bad_limit(bad: dict[str, float]) -> None:
    with pytest.raises(Exception, match=next(iter(bad))):
        SitePolicy.from_mapping(bad, "site.yaml policy")
