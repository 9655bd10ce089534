"""The site's secure-aggregation policy, at the site: sums too small and plain train are refused.

A site takes part only in secure sums of at least ``policy.min_secagg_sites`` sites (3 by
default): it checks the announced size when the round's sites advertise their keys, and the
survivors again before it reveals any unmasking share. A plain ``train`` instruction, which asks
for the site's unmasked update, is refused at the default policy. Each refusal is a catalogued
error reply (1007) naming the refused policy field, and leaves the site's ledger as it was.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedhealth.clientapp import handlers, local_round
from fedhealth.clientapp import secagg_stages as stages
from fedhealth.clientapp.secagg_stages import STATE_KEY, handle_stage
from fedhealth.config import compose, site_settings
from fedhealth.errors import ErrorCode
from fedhealth.models import build_model
from fedhealth.privacy.ledger import PrivacyLedger
from fedhealth.privacy.policy import SitePolicy
from fedhealth.protocol import keys as K
from fedhealth.security.secagg import SecAggParams, SecAggSite

POLICY_CODE = int(ErrorCode.SITE_REFUSED_POLICY)
SECAGG_TAG = "[policy: min_secagg_sites]"
PIDS = (1, 2, 3)


def _context(pid: int, **node: str) -> Context:
    config = {K.NODE_SITE_NAME: f"hospital-{pid}", **node}
    return Context(run_id=1, node_id=pid, node_config=config, state=RecordDict(), run_config={})


def _message(pid: int, stage: str, record: dict) -> Message:
    content = RecordDict(
        {K.SECAGG: ConfigRecord(record), K.CONFIG: ConfigRecord({K.SERVER_ROUND: 1})}
    )
    return Message(content, pid, f"train.{stage}")


def _setup(pid: int, size: int, pids=PIDS) -> dict:
    params = SecAggParams.sized(len(pids), 2, 4.0, 100)
    return {
        K.SECAGG_SITE_ID: pid,
        K.SECAGG_NEIGHBOURS: [p for p in pids if p != pid],
        K.SECAGG_THRESHOLD: params.threshold,
        K.SECAGG_CLIP: params.clipping_range,
        K.SECAGG_LEVELS: params.quantization_levels,
        K.SECAGG_MAX_EXAMPLES: params.max_examples,
        K.SECAGG_SIZE: size,
    }


def _assert_refused(reply: Message, pid: int) -> None:
    assert reply.has_error(), "the site took part in a sum below its minimum"
    assert reply.error.code == POLICY_CODE, reply.error
    assert reply.error.reason.startswith(f"site hospital-{pid}: "), reply.error.reason
    assert reply.error.reason.endswith(SECAGG_TAG), reply.error.reason


def test_advertise_for_a_sum_of_two_is_refused_at_the_default_policy(flower_identity):
    context = _context(1)  # no site-policy in the node config: the defaults, min 3
    reply = handle_stage(_message(1, K.STAGE_ADVERTISE, _setup(1, 2)), context, K.STAGE_ADVERTISE)
    _assert_refused(reply, 1)
    assert "at least 3" not in reply.error.reason, "the site's limit stays in its log"
    assert STATE_KEY not in context.state, "no key made for a sum the site refuses"


def test_advertise_for_a_sum_of_three_is_answered_with_keys(flower_identity):
    context = _context(1)
    reply = handle_stage(_message(1, K.STAGE_ADVERTISE, _setup(1, 3)), context, K.STAGE_ADVERTISE)
    assert not reply.has_error(), reply.error
    record = reply.content[K.SECAGG]
    assert isinstance(record[K.SECAGG_PUBLIC_C], bytes) and record[K.SECAGG_PUBLIC_C]
    assert isinstance(record[K.SECAGG_PUBLIC_S], bytes) and record[K.SECAGG_PUBLIC_S]
    assert STATE_KEY in context.state


def test_a_site_that_allows_two_answers_a_sum_of_two(flower_identity):
    context = _context(1, **{K.NODE_POLICY: SitePolicy(min_secagg_sites=2).to_json()})
    reply = handle_stage(
        _message(1, K.STAGE_ADVERTISE, _setup(1, 2, (1, 2))), context, K.STAGE_ADVERTISE
    )
    assert not reply.has_error(), reply.error


def _through_mask(contexts: dict[int, Context]) -> None:
    """Advertise and share through the real site handler, then mask as the site would."""
    publics = {}
    for pid, context in contexts.items():
        msg = _message(pid, K.STAGE_ADVERTISE, _setup(pid, len(contexts)))
        reply = handle_stage(msg, context, K.STAGE_ADVERTISE)
        assert not reply.has_error(), reply.error
        rec = reply.content[K.SECAGG]
        publics[pid] = (rec[K.SECAGG_PUBLIC_C], rec[K.SECAGG_PUBLIC_S])
    inbox: dict[int, dict[int, bytes]] = {pid: {} for pid in contexts}
    for pid, context in contexts.items():
        ids = sorted(publics)
        record = {
            K.SECAGG_IDS: ids,
            K.SECAGG_PUBLIC_C: [publics[i][0] for i in ids],
            K.SECAGG_PUBLIC_S: [publics[i][1] for i in ids],
        }
        reply = handle_stage(_message(pid, K.STAGE_SHARE, record), context, K.STAGE_SHARE)
        assert not reply.has_error(), reply.error
        rec = reply.content[K.SECAGG]
        for to, blob in zip(rec[K.SECAGG_TO], rec[K.SECAGG_BLOBS], strict=True):
            inbox[to][pid] = blob
    for pid, context in contexts.items():  # the mask stage trains: done here without a model
        agent = SecAggSite.from_state(dict(context.state[STATE_KEY].items()))
        update = np.full(6, 0.1 * pid, dtype=np.float32)
        agent.masked_input(update, 10, inbox[pid], rng=np.random.default_rng(pid))
        context.state[STATE_KEY] = ConfigRecord(agent.to_state())


def _unmask(pid: int, survivors: list[int], dropped: list[int]) -> Message:
    record = {K.SECAGG_SURVIVORS: survivors, K.SECAGG_DROPPED: dropped or [0]}
    return _message(pid, K.STAGE_UNMASK, record)


@pytest.mark.parametrize("survivors", [[1, 2], [1, 2, 2]], ids=["two", "two-listed-thrice"])
def test_unmask_with_two_survivors_is_refused_before_any_share_is_revealed(
    flower_identity, monkeypatch, survivors
):
    contexts = {pid: _context(pid) for pid in PIDS}
    _through_mask(contexts)
    state = dict(contexts[1].state[STATE_KEY].items())
    revealed = []
    real_unmask = SecAggSite.unmask

    def spy(self, *args, **kwargs):
        revealed.append(self.site_id)
        return real_unmask(self, *args, **kwargs)

    monkeypatch.setattr(stages.SecAggSite, "unmask", spy)
    reply = handle_stage(_unmask(1, survivors, [3]), contexts[1], K.STAGE_UNMASK)
    _assert_refused(reply, 1)
    assert revealed == [], "the site opened its shares before checking the survivors"
    assert dict(contexts[1].state[STATE_KEY].items()) == state, "the site's state is untouched"

    # the same state at a site that allows sums of two does reveal: the policy refused, not
    # the protocol (two survivors meet the Shamir threshold of 2)
    lenient = _context(1, **{K.NODE_POLICY: SitePolicy(min_secagg_sites=2).to_json()})
    lenient.state[STATE_KEY] = ConfigRecord(state)
    reply = handle_stage(_unmask(1, survivors, [3]), lenient, K.STAGE_UNMASK)
    assert not reply.has_error(), reply.error
    owners = list(reply.content[K.SECAGG][K.SECAGG_OWNERS])
    assert sorted(owners) == [1, 2, 3] and revealed == [1]


def test_unmask_with_three_survivors_reveals_the_seed_shares(flower_identity):
    contexts = {pid: _context(pid) for pid in PIDS}
    _through_mask(contexts)
    reply = handle_stage(_unmask(2, [1, 2, 3], []), contexts[2], K.STAGE_UNMASK)
    assert not reply.has_error(), reply.error
    assert sorted(reply.content[K.SECAGG][K.SECAGG_OWNERS]) == [1, 2, 3]


# -- a plain train instruction ---------------------------------------------------------------
TINY = ["model.channels=[2,4]", "model.strides=[2]", "rounds=2", "train.local_epochs=1"]


def _plain_train(data_dir: Path, ledger: Path) -> tuple[Message, Context]:
    cfg = compose(TINY)  # DP on
    settings = {**site_settings(cfg), K.SERVER_ROUND: 1, K.RUN_KEY: "secagg-policy-test"}
    content = RecordDict(
        {
            K.ARRAYS: ArrayRecord(build_model(cfg.model).state_dict()),
            K.CONFIG: ConfigRecord(settings),
        }
    )
    config = {  # no site-policy: the defaults, secure aggregation required
        K.NODE_DATA_DIR: str(data_dir),
        K.NODE_SITE_NAME: "hospital-a",
        K.NODE_LEDGER_DIR: str(ledger),
        K.NODE_EPSILON_CAP: 8.0,
        K.NODE_DELTA: 1e-5,
    }
    context = Context(run_id=1, node_id=0, node_config=config, state=RecordDict(), run_config={})
    return Message(content, 0, "train"), context


@pytest.fixture
def no_training(monkeypatch):
    """Make any training attempt fail the test: a refusal must come before it."""

    def train(*args, **kwargs):
        raise AssertionError("the site trained although it should have refused")

    monkeypatch.setattr(local_round, "train", train)


def test_plain_train_is_refused_at_the_default_policy_and_no_ledger_is_made(
    cohort, tmp_path, flower_identity, no_training
):
    ledger = tmp_path / "ledger"
    msg, context = _plain_train(cohort / "site-0", ledger)
    reply = handlers.handle(msg, context, "train")
    assert reply.has_error() and reply.error.code == POLICY_CODE, reply.error
    assert reply.error.reason.startswith("site hospital-a: "), reply.error.reason
    assert reply.error.reason.endswith("[policy: require_secure_aggregation]"), reply.error.reason
    assert not (ledger / "ledger.sqlite").exists(), "the refusal created the ledger"


def test_plain_train_refusal_leaves_an_existing_ledger_as_it_was(
    cohort, tmp_path, flower_identity, no_training
):
    ledger = tmp_path / "ledger"
    with PrivacyLedger(ledger / "ledger.sqlite", "hospital-a") as opened:
        opened.record("earlier", 1, (1.0, 0.25, 8), 1.0, "rdp", 1e-5, 8.0, "fp")
    before = {p.name: p.read_bytes() for p in ledger.iterdir() if not p.name.endswith("-shm")}
    msg, context = _plain_train(cohort / "site-0", ledger)
    reply = handlers.handle(msg, context, "train")
    assert reply.has_error() and reply.error.code == POLICY_CODE, reply.error
    assert reply.error.reason.endswith("[policy: require_secure_aggregation]")
    after = {p.name: p.read_bytes() for p in ledger.iterdir() if not p.name.endswith("-shm")}
    assert after == before
    with PrivacyLedger(ledger / "ledger.sqlite", "hospital-a") as reopened:
        assert [e.run for e in reopened.entries] == ["earlier"]
    # the mask stage's secure instruction passes the same policy check (it is not a blanket no)
    handlers.prepare(msg, context, "train", None, None, secure=True)


def test_unmask_with_a_made_up_survivor_reveals_nothing(flower_identity, monkeypatch):
    contexts = {pid: _context(pid) for pid in PIDS}
    _through_mask(contexts)
    revealed = []
    real_unmask = SecAggSite.unmask

    def spy(self, *args, **kwargs):
        revealed.append(self.site_id)
        return real_unmask(self, *args, **kwargs)

    monkeypatch.setattr(stages.SecAggSite, "unmask", spy)
    # only sites 1 and 2 sent masked input; 99 never advertised, shared or masked anything
    reply = handle_stage(_unmask(1, [1, 2, 99], [3]), contexts[1], K.STAGE_UNMASK)
    assert reply.has_error(), "the site revealed its shares for a sum of two real sites"
    assert revealed == []


@pytest.mark.parametrize(("threshold", "refused"), [(2, True), (3, False)])
def test_a_threshold_of_half_the_share_holders_is_refused(flower_identity, threshold, refused):
    # 4 holders, threshold 2: sites told different survivor lists could reveal 2 seed shares
    # and 2 key shares of one site, enough to rebuild both and unmask its update
    context = _context(1)
    record = {**_setup(1, 4, (1, 2, 3, 4)), K.SECAGG_THRESHOLD: threshold}
    reply = handle_stage(_message(1, K.STAGE_ADVERTISE, record), context, K.STAGE_ADVERTISE)
    assert reply.has_error() is refused, reply.error if reply.has_error() else "answered"
    if refused:
        assert reply.error.code == POLICY_CODE, reply.error
        assert reply.error.reason.endswith(f"[policy: {K.SECAGG_THRESHOLD}]"), reply.error.reason
        assert STATE_KEY not in context.state, "no key made for a sum the site refuses"


def test_the_coordinator_never_asks_for_a_threshold_of_half():
    from fedhealth.errors import ConfigError

    with pytest.raises(ConfigError, match=r"federation.secagg_threshold=0.5 \(in \(0.5, 1\]\)"):
        compose(["federation.secagg_threshold=0.5"])  # the value and the rule, named
    assert compose(["federation.secagg_threshold=0.51"]).federation.secagg_threshold == 0.51
