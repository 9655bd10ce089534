"""site.yaml's privacy policy (privacy_unit, policy:): checked, and sent only as node config."""

from __future__ import annotations

import json
import shutil

import pytest
from flwr.common.config import parse_config_args

from fedhealth.errors import ConfigError
from fedhealth.privacy.policy import SitePolicy
from fedhealth.protocol import keys as K
from fedhealth.supernode import daemon
from fedhealth.supernode.preflight import check
from fedhealth.supernode.settings import load

BASE = ["name=hospital-a", "coordinator=h:1", "ledger_dir=l", "insecure=true"]


def test_policy_defaults_travel_as_node_config_flower_can_parse(tmp_path):
    s = load(None, [*BASE, f"data_dir={tmp_path}"])
    assert s.privacy_unit == "patient" and s.policy == SitePolicy()
    node = parse_config_args([daemon.node_config(s)])
    assert node[K.NODE_PRIVACY_UNIT] == "patient"
    assert SitePolicy.from_json(str(node[K.NODE_POLICY]), "test") == SitePolicy()


def test_a_site_can_declare_scan_and_opt_out_of_dp_explicitly(tmp_path):
    s = load(
        None,
        [
            *BASE,
            f"data_dir={tmp_path}",
            "privacy_unit=scan",
            "policy.require_dp=false",
            "policy.models=[unet]",
            "policy.max_epsilon_per_run=2",
        ],
    )
    node = parse_config_args([daemon.node_config(s)])
    policy = SitePolicy.from_json(str(node[K.NODE_POLICY]), "test")
    assert node[K.NODE_PRIVACY_UNIT] == "scan" and policy.require_dp is False
    assert policy.models == ["unet"] and policy.max_epsilon_per_run == 2.0


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("policy.min_secagg_sites=1", "min_secagg_sites"),
        ("policy.min_lr=2", "min_lr"),
        ("policy.release=[patient-ids]", "release"),
        ("policy.max_noise_multiplier=0", "max_noise_multiplier"),
        ("policy.colour=blue", "colour"),
    ],
)
def test_a_policy_out_of_range_is_refused_naming_the_field(tmp_path, override, named):
    with pytest.raises(ConfigError, match=named):
        load(None, [*BASE, f"data_dir={tmp_path}", override])


def test_an_unknown_privacy_unit_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="privacy_unit='visit'"):
        load(None, [*BASE, f"data_dir={tmp_path}", "privacy_unit=visit"])


def _site(cohort, tmp_path, edit):
    data = tmp_path / "data"
    shutil.copytree(cohort / "site-0", data)
    raw = json.loads((data / "dataset.json").read_text())
    edit(raw)
    (data / "dataset.json").write_text(json.dumps(raw))
    return data


def _data_item(s):
    return next(i for i in check(s, timeout=0.1) if i.name == "data")


def test_site_check_flags_a_patient_in_train_and_test(cohort, tmp_path):
    def leak(raw):
        raw["test"][0]["patient"] = raw["training"][2]["patient"]

    data = _site(cohort, tmp_path, leak)
    leaked = json.loads((data / "dataset.json").read_text())["test"][0]["patient"]
    item = _data_item(load(None, [*BASE, f"data_dir={data}"]))
    assert "WARNING" in item.detail and leaked in item.detail and "both" in item.detail


def test_site_check_fails_a_datalist_without_ids_unless_the_unit_is_scan(cohort, tmp_path):
    def anonymise(raw):
        for entry in raw["training"] + raw["test"]:
            del entry["patient"]

    data = _site(cohort, tmp_path, anonymise)
    item = _data_item(load(None, [*BASE, f"data_dir={data}"]))
    assert not item.ok and "privacy_unit: scan" in item.detail
    item = _data_item(load(None, [*BASE, f"data_dir={data}", "privacy_unit=scan"]))
    assert item.ok and "privacy unit: scan" in item.detail


def test_site_check_states_the_policy_and_warns_on_an_opt_out(tmp_path):
    def policy_item(*overrides):
        s = load(None, [*BASE, f"data_dir={tmp_path}", *overrides])
        return next(i for i in check(s, timeout=0.1) if i.name == "policy")

    strict = policy_item()
    assert "DP required" in strict.detail and "at least 3 sites per sum" in strict.detail
    assert "WARNING" not in strict.detail and "releases also ['evaluation']" in strict.detail
    assert "releases only the minimum" in policy_item("policy.release=[]").detail
    loose = policy_item("policy.require_dp=false", "policy.require_secure_aggregation=false")
    assert loose.detail.count("WARNING") == 2, loose.detail
    assert "releases also ['loss']" in policy_item("policy.release=[loss]").detail
