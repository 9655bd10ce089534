"""The site's privacy policy: its defaults, its node-config form, and what it refuses.

A hospital's limits are checked in two places: :meth:`SitePolicy.check_instruction` refuses an
instruction that asks for more than the site allows before any data is read, and
:func:`fedhealth.privacy.budget.charge_round` checks the limits that depend on the ledger (rounds
and epsilon per run, the noise ceiling) inside the ledger's transaction. Every refusal names the
field and the site's limit, and leaves the ledger as it was: no entry and no plan.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedhealth.errors import ConfigError, DPRequired, PolicyRefused
from fedhealth.privacy.budget import RoundRequest, SiteBudget, charge_round
from fedhealth.privacy.independent import independent_epsilon
from fedhealth.privacy.ledger import PrivacyLedger
from fedhealth.privacy.policy import SitePolicy, node_policy
from fedhealth.protocol import keys as K

WHERE = "site.yaml policy"
DELTA = 1e-5


# -- the policy itself ----------------------------------------------------------------------------
def test_defaults_require_dp_and_secure_sums_of_three() -> None:
    policy = SitePolicy()
    assert policy.require_dp is True
    assert policy.require_secure_aggregation is True
    assert policy.min_secagg_sites == 3
    assert policy.max_epsilon_per_run == 0.0 and policy.models == []
    assert policy.release == ["evaluation"]  # per-site Dice leaves unless the site drops it
    assert policy.validate() is policy
    assert node_policy({}) == policy, "no policy in the node config: the defaults"


def test_json_round_trip_keeps_every_field() -> None:
    policy = SitePolicy(
        require_dp=False,
        require_secure_aggregation=False,
        min_secagg_sites=5,
        max_epsilon_per_run=2.5,
        max_rounds_per_run=7,
        max_noise_multiplier=3.0,
        min_max_grad_norm=0.5,
        max_max_grad_norm=2.0,
        max_local_epochs=3,
        min_lr=1e-4,
        max_lr=0.1,
        models=["unet", "segresnet"],
        release=["loss", "history"],
    )
    text = policy.to_json()
    assert list(json.loads(text)) == sorted(json.loads(text)), "sorted keys: a stable form"
    back = SitePolicy.from_json(text, WHERE)
    assert back == policy
    assert back.to_json() == text
    assert node_policy({K.NODE_POLICY: text}) == policy
    assert node_policy({}, simulated=policy) == policy
    assert node_policy({K.NODE_POLICY: SitePolicy().to_json()}, simulated=policy) == SitePolicy()


def test_an_int_where_a_float_is_expected_becomes_a_float() -> None:
    policy = SitePolicy.from_mapping({"max_epsilon_per_run": 3, "max_lr": 1}, WHERE)
    assert policy.max_epsilon_per_run == 3.0 and type(policy.max_epsilon_per_run) is float
    assert type(policy.max_lr) is float


def test_unknown_fields_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"site\.yaml policy: unknown policy field.*'colour'"):
        SitePolicy.from_mapping({"colour": "blue", "require_dp": True}, WHERE)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("max_rounds_per_run", True, "int"),  # a bool is not an int here
        ("min_secagg_sites", 3.0, "int"),
        ("max_epsilon_per_run", "3", "float"),
        ("max_lr", False, "float"),
        ("require_dp", 1, "bool"),
        ("require_secure_aggregation", "no", "bool"),
        ("models", "unet", "list"),
        ("release", ["loss", 1], "list"),
    ],
)
def test_wrong_types_are_refused_naming_the_field(field: str, value: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        SitePolicy.from_mapping({field: value}, WHERE)
    text = str(info.value)
    assert text.startswith(WHERE), text
    assert f"{field}={value!r}" in text and f"expected {expected}" in text, text


@pytest.mark.parametrize(
    ("field", "raw"),
    [
        ("min_secagg_sites", {"min_secagg_sites": 1}),
        ("max_epsilon_per_run", {"max_epsilon_per_run": -0.5}),
        ("max_rounds_per_run", {"max_rounds_per_run": -1}),
        ("max_noise_multiplier", {"max_noise_multiplier": 0.0}),
        ("min_max_grad_norm", {"min_max_grad_norm": 0.0}),
        ("min_max_grad_norm", {"min_max_grad_norm": 5.0, "max_max_grad_norm": 1.0}),
        ("max_local_epochs", {"max_local_epochs": 0}),
        ("min_lr", {"min_lr": 0.0}),
        ("min_lr", {"min_lr": 0.5, "max_lr": 0.1}),
        ("release", {"release": ["weights"]}),
    ],
)
def test_out_of_range_values_are_refused_naming_the_field(field: str, raw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=rf"^{WHERE}: out of range: {field} \(") as info:
        SitePolicy.from_mapping(raw, WHERE)
    with pytest.raises(ConfigError, match=rf"out of range: {field} \("):
        SitePolicy.from_json(json.dumps(raw), WHERE)
    assert "Traceback" not in str(info.value)


def test_not_a_mapping_or_not_json_is_refused() -> None:
    with pytest.raises(ConfigError, match="expected a mapping"):
        SitePolicy.from_mapping(["require_dp"], WHERE)
    with pytest.raises(ConfigError, match="not a JSON policy"):
        SitePolicy.from_json("{", WHERE)
    with pytest.raises(ConfigError, match=rf"node config {K.NODE_POLICY}.*min_secagg_sites"):
        node_policy({K.NODE_POLICY: '{"min_secagg_sites": 1}'})


# -- check_instruction ----------------------------------------------------------------------------
STRICT = SitePolicy(max_rounds_per_run=5, max_noise_multiplier=4.0, models=["unet"])
"""Every bound finite, so every field can be crossed."""

INSIDE: dict[str, Any] = {
    "dp": True,
    "secure": True,
    "rounds": 3,
    "max_grad_norm": 1.0,
    "local_epochs": 2,
    "lr": 1e-3,
    "model": "unet",
    "noise_multiplier": 0.0,
}


@pytest.mark.parametrize(
    ("asked", "field", "said"),
    [
        ({"dp": False}, "require_dp", ["privacy.enabled=false", "require_dp: true"]),
        (
            {"secure": False},
            "require_secure_aggregation",
            ["plain train", "require_secure_aggregation: true"],
        ),
        ({"rounds": 6}, "max_rounds_per_run", ["rounds=6", "allows 5 per run"]),
        ({"max_grad_norm": 0.005}, "max_grad_norm", ["max_grad_norm=0.005", "[0.01, 10]"]),
        ({"max_grad_norm": 10.5}, "max_grad_norm", ["max_grad_norm=10.5", "[0.01, 10]"]),
        ({"local_epochs": 11}, "max_local_epochs", ["local_epochs=11", "allows 10"]),
        ({"lr": 2.0}, "lr", ["train.lr=2", "[1e-06, 1]"]),
        ({"lr": 1e-7}, "lr", ["train.lr=1e-07", "[1e-06, 1]"]),
        ({"model": "segresnet"}, "models", ["'segresnet'", "['unet']"]),
        ({"noise_multiplier": 4.5}, "max_noise_multiplier", ["noise_multiplier=4.5", "ceiling 4"]),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_check_instruction_refuses_each_bound(
    asked: dict[str, Any], field: str, said: list[str]
) -> None:
    with pytest.raises((PolicyRefused, DPRequired)) as info:
        STRICT.check_instruction("hospital-a", **{**INSIDE, **asked})
    exc = info.value
    text = str(exc)
    assert text.startswith("site hospital-a: refused"), text
    for part in said:
        assert part in text, (part, text)
    assert "Nothing was trained or charged" in text
    if field == "require_dp":
        assert isinstance(exc, DPRequired)
    else:
        assert isinstance(exc, PolicyRefused) and exc.field == field
        assert f"({field})" in text


def test_check_instruction_accepts_an_instruction_inside_every_bound() -> None:
    STRICT.check_instruction("hospital-a", **INSIDE)
    at_the_edges = {
        "rounds": 5,
        "max_grad_norm": 10.0,
        "local_epochs": 10,
        "lr": 1.0,
        "noise_multiplier": 4.0,
    }
    STRICT.check_instruction("hospital-a", **{**INSIDE, **at_the_edges})
    STRICT.check_instruction("hospital-a", **{**INSIDE, "max_grad_norm": 0.01, "lr": 1e-6})
    # no DP at a site that opts out: the DP-only bounds do not apply
    opted_out = SitePolicy(require_dp=False, require_secure_aggregation=False)
    opted_out.check_instruction(
        "hospital-a", **{**INSIDE, "dp": False, "secure": False, "max_grad_norm": 99.0}
    )
    # no limit on rounds, no list of models
    SitePolicy(max_rounds_per_run=0).check_instruction(
        "hospital-a", **{**INSIDE, "rounds": 10_000, "model": "anything"}
    )


def test_check_secure_sum_refuses_below_the_minimum() -> None:
    with pytest.raises(PolicyRefused, match=r"unmask.*2 site\(s\).*at least 3") as info:
        SitePolicy().check_secure_sum("hospital-a", 2, "unmask")
    assert info.value.field == "min_secagg_sites"
    SitePolicy().check_secure_sum("hospital-a", 3, "unmask")
    SitePolicy(min_secagg_sites=2).check_secure_sum("hospital-a", 2, "advertise")


# -- the ledger-dependent limits, inside charge_round ---------------------------------------------
def _request(
    run: str = "run-1", rnd: int = 1, total: int = 3, fixed: float = 0.0, acc: str = "rdp"
) -> RoundRequest:
    return RoundRequest(
        run=run,
        server_round=rnd,
        rounds_total=total,
        sample_rate=0.25,
        steps=8,
        max_grad_norm=1.0,
        accountant=acc,
        fixed_noise=fixed,
    )


def _plans(ledger: PrivacyLedger) -> int:
    return int(ledger.db.execute("SELECT count(*) FROM plans").fetchone()[0])


def _files(root: Path) -> dict[str, bytes]:
    """The ledger's bytes on disk (SQLite's shared-memory index aside: readers change it)."""
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if not p.name.endswith("-shm")}


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger" / "ledger.sqlite"


def test_max_rounds_per_run_refuses_the_next_round_of_that_run_only(ledger_path: Path) -> None:
    budget = SiteBudget(8.0, DELTA, ledger_path)
    policy = SitePolicy(max_rounds_per_run=2)
    with PrivacyLedger(ledger_path, "site-a") as ledger:
        for rnd in (1, 2):
            charge_round(ledger, budget, _request(rnd=rnd), "fp", "site-a", policy=policy)
        hashes, plans = [e.hash for e in ledger.entries], _plans(ledger)
        before = _files(ledger_path.parent)
        with pytest.raises(
            PolicyRefused, match=r"run-1 has trained 2 round\(s\).*allows 2"
        ) as info:
            charge_round(ledger, budget, _request(rnd=3), "fp", "site-a", policy=policy)
        assert info.value.field == "max_rounds_per_run"
        assert [e.hash for e in ledger.entries] == hashes and _plans(ledger) == plans
        assert _files(ledger_path.parent) == before, "a refusal writes nothing"
        other = charge_round(ledger, budget, _request(run="run-2"), "fp", "site-a", policy=policy)
        assert other.run == "run-2" and len(ledger.entries) == 3
    with PrivacyLedger(ledger_path, "site-a") as reopened:
        assert [(e.run, e.round) for e in reopened.entries] == [
            ("run-1", 1),
            ("run-1", 2),
            ("run-2", 1),
        ]


@pytest.mark.parametrize("acc", ["rdp", "prv"])
def test_max_epsilon_per_run_raises_the_noise_and_holds_the_run_within_it(
    tmp_path: Path, acc: str
) -> None:
    limit, rounds = 2.0, 3
    budget = SiteBudget(8.0, DELTA, tmp_path / "free.sqlite")
    with PrivacyLedger(budget.ledger_path, "site-a") as free:
        unlimited = charge_round(free, budget, _request(acc=acc), "fp", "site-a")
    path = tmp_path / "limited.sqlite"
    limited_budget = SiteBudget(8.0, DELTA, path)
    policy = SitePolicy(max_epsilon_per_run=limit)
    with PrivacyLedger(path, "site-a") as ledger:
        # another run spent first: the per-run limit is on this run's own phases
        ledger.record("earlier", 1, (1.0, 0.25, 8), 1.0, acc, DELTA, 8.0, "fp")
        entries = [
            charge_round(
                ledger, limited_budget, _request(rnd=r, acc=acc), "fp", "site-a", policy=policy
            )
            for r in range(1, rounds + 1)
        ]
        run_phases = [e.phase for e in ledger.entries if e.run == "run-1"]
    assert len({e.noise_multiplier for e in entries}) == 1, "one plan per run"
    assert entries[0].noise_multiplier > unlimited.noise_multiplier
    assert len(run_phases) == rounds
    run_epsilon = independent_epsilon(run_phases, DELTA, acc)
    assert run_epsilon <= limit * 1.01, run_epsilon
    assert run_epsilon >= 0.9 * limit, "the plan uses the run's limit, not a fraction of it"
    # the ledger's whole epsilon counts the other run too, and is over the per-run limit
    assert entries[-1].epsilon_after > run_epsilon


def test_a_fixed_noise_over_the_per_run_epsilon_is_refused_with_no_plan_left(
    ledger_path: Path,
) -> None:
    budget = SiteBudget(50.0, DELTA, ledger_path)  # the site's cap is not what refuses
    policy = SitePolicy(max_epsilon_per_run=1.0)
    with PrivacyLedger(ledger_path, "site-a") as ledger:
        with pytest.raises(
            PolicyRefused, match=r"run run-1's epsilon to .*allows 1 per run"
        ) as info:
            charge_round(ledger, budget, _request(fixed=0.6), "fp", "site-a", policy=policy)
        assert info.value.field == "max_epsilon_per_run"
        assert ledger.entries == [] and ledger.plan("run-1") is None and _plans(ledger) == 0
    with PrivacyLedger(ledger_path, "site-a") as reopened:
        assert reopened.entries == [] and reopened.plan("run-1") is None


def test_a_planned_noise_above_the_ceiling_is_refused_with_nothing_written(
    ledger_path: Path,
) -> None:
    budget = SiteBudget(1.0, DELTA, ledger_path)  # a tight cap needs a large noise
    policy = SitePolicy(max_noise_multiplier=0.5)
    with PrivacyLedger(ledger_path, "site-a") as ledger:
        with pytest.raises(
            PolicyRefused, match=r"needs noise multiplier .*ceiling is 0\.5"
        ) as info:
            charge_round(ledger, budget, _request(), "fp", "site-a", policy=policy)
        assert info.value.field == "max_noise_multiplier"
        assert ledger.entries == [] and ledger.plan("run-1") is None and _plans(ledger) == 0
    with PrivacyLedger(ledger_path, "site-a") as reopened:
        assert reopened.entries == [] and reopened.plan("run-1") is None
        # the same request under a ceiling it fits is charged: the refusal was the ceiling's
        entry = charge_round(
            reopened, budget, _request(), "fp", "site-a", policy=SitePolicy(max_noise_multiplier=50)
        )
        assert entry.noise_multiplier > 0.5 and len(reopened.entries) == 1
