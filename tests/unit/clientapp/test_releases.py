"""Every release charged: the site's noise is its own, and a retried round resends its bytes.

A DP update is noise the coordinator cannot reproduce (the site's OS entropy), so training the
same round twice would be two releases. The ledger charges a (run, round, global model) once;
the site therefore stores what it sends and a retried round, whatever else the coordinator
changes (seed, learning rate), gets the stored bytes back, with nothing new charged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedhealth.clientapp import handlers
from fedhealth.config import compose, site_settings
from fedhealth.errors import ErrorCode
from fedhealth.models import build_model
from fedhealth.privacy.ledger import PrivacyLedger
from fedhealth.protocol import keys as K
from tests.conftest import PLAIN_TRAIN_POLICY

TINY = ["model.channels=[2,4]", "model.strides=[2]", "rounds=3", "train.local_epochs=1"]


def _train(
    cohort: Path,
    ledger: Path,
    *overrides: str,
    server_round: int = 1,
    run_key: str = "release-test",
    refused: bool = False,
    **node,
):
    cfg = compose([*TINY, *overrides])
    settings = {**site_settings(cfg), K.SERVER_ROUND: server_round, K.RUN_KEY: run_key}
    torch_model = build_model(compose(TINY).model)  # the same global model every time
    content = RecordDict(
        {K.ARRAYS: ArrayRecord(torch_model.state_dict()), K.CONFIG: ConfigRecord(settings)}
    )
    config = {
        K.NODE_DATA_DIR: str(cohort / "site-0"),
        K.NODE_SITE_NAME: "hospital-a",
        K.NODE_LEDGER_DIR: str(ledger),
        K.NODE_EPSILON_CAP: 8.0,
        K.NODE_DELTA: 1e-5,
        K.NODE_POLICY: PLAIN_TRAIN_POLICY,
        **node,
    }
    context = Context(run_id=1, node_id=0, node_config=config, state=RecordDict(), run_config={})
    reply = handlers.handle(Message(content, 0, "train"), context, "train")
    if refused:
        assert reply.has_error(), "trained"
        return None, reply
    assert not reply.has_error(), reply.error
    arrays = reply.content[K.ARRAYS]
    vector = np.concatenate([a.numpy().ravel() for a in arrays.values()])
    return vector, reply


def _entries(ledger: Path) -> int:
    with PrivacyLedger(ledger / "ledger.sqlite") as db:
        return len(db.entries)


def test_a_retried_round_resends_the_stored_update_whatever_else_changed(
    cohort, tmp_path, flower_identity
):
    import torch

    torch.manual_seed(0)  # the model init: the same global model in every call
    first, _ = _train(cohort, tmp_path / "ledger")
    assert _entries(tmp_path / "ledger") == 1
    for changed in ([], ["seed=123"], ["train.lr=0.05"]):
        torch.manual_seed(0)
        again, _ = _train(cohort, tmp_path / "ledger", *changed)
        assert again.tobytes() == first.tobytes(), changed  # the same release, byte for byte
    assert _entries(tmp_path / "ledger") == 1  # charged once
    assert len(list((tmp_path / "ledger" / "releases").glob("*.safetensors"))) == 1


def test_the_same_instruction_in_two_rounds_gives_different_noise(
    cohort, tmp_path, flower_identity
):
    """The coordinator knows the seed, the data order and the model: not the noise."""
    import torch

    torch.manual_seed(0)
    one, _ = _train(cohort, tmp_path / "a")
    torch.manual_seed(0)
    two, _ = _train(cohort, tmp_path / "b")  # another site's ledger: a fresh release
    assert one.tobytes() != two.tobytes()
    assert np.abs(one - two).max() > 0


def test_a_site_seed_makes_the_noise_deterministic_and_the_reply_says_so(
    cohort, tmp_path, flower_identity
):
    import torch

    torch.manual_seed(0)
    one, reply = _train(cohort, tmp_path / "a", **{K.NODE_NOISE_SEED: 7})
    torch.manual_seed(0)
    two, _ = _train(cohort, tmp_path / "b", **{K.NODE_NOISE_SEED: 7})
    assert one.tobytes() == two.tobytes()
    assert reply.content[K.SITE][K.DP_NOISE_SEEDED] is True
    torch.manual_seed(0)
    _, secret = _train(cohort, tmp_path / "c")
    assert K.DP_NOISE_SEEDED not in secret.content[K.SITE]


def test_only_the_last_rounds_of_a_run_are_kept(cohort, tmp_path, flower_identity):
    import torch

    for server_round in (1, 2, 3):
        torch.manual_seed(0)
        _train(cohort, tmp_path / "ledger", server_round=server_round)
    releases = tmp_path / "ledger" / "releases"
    kept = sorted(p.name.split("-r")[1][:6] for p in releases.glob("*.safetensors"))
    assert kept == ["000002", "000003"]
    locks = sorted(p.name.split("-r")[1][:6] for p in releases.glob("*.lock"))
    assert locks == ["000002", "000003"]  # a round's lock goes with its release
    assert all(p.stat().st_mode & 0o077 == 0 for p in (tmp_path / "ledger" / "releases").iterdir())


def test_a_purged_round_asked_again_is_refused_not_trained_again(cohort, tmp_path, flower_identity):
    """Round 1, round 3 (round 1's update deleted), round 1 again with the same global model.

    The ledger already charged that (run, round, model), so training it again would be a
    second, freshly noised release under one charge: the site refuses.
    """
    import torch

    for server_round in (1, 3):
        torch.manual_seed(0)
        _train(cohort, tmp_path / "ledger", server_round=server_round)
    torch.manual_seed(0)
    _, reply = _train(cohort, tmp_path / "ledger", server_round=1, refused=True)
    assert reply.error.code == int(ErrorCode.SITE_REFUSED_POLICY), reply.error
    assert reply.error.reason.endswith("[policy: released]"), reply.error.reason
    assert _entries(tmp_path / "ledger") == 2  # nothing charged, nothing trained
    torch.manual_seed(0)
    _, again = _train(cohort, tmp_path / "ledger", server_round=3)  # the kept round: resent
    assert not again.has_error()


def test_a_seeded_site_shares_noise_only_between_identical_computations():
    """A site's own noise seed: the same noise when only the run key differs, not otherwise."""
    from fedhealth.clientapp.instruction import Site

    site = Site("hospital-a", Path("."), noise_seed=7)
    settings = {**site_settings(compose(TINY)), K.SERVER_ROUND: 1, K.RUN_KEY: "run-a"}
    seed = site.round_noise_seed(settings, "data-1")
    assert 0 <= seed < 2**63
    assert site.round_noise_seed({**settings, K.RUN_KEY: "run-b"}, "data-1") == seed
    others = [
        site.round_noise_seed({**settings, "train.lr": 0.05}, "data-1"),
        site.round_noise_seed({**settings, K.SERVER_ROUND: 2}, "data-1"),
        site.round_noise_seed(settings, "data-2"),  # a patient fewer
        Site("hospital-b", Path("."), noise_seed=7).round_noise_seed(settings, "data-1"),
    ]
    assert seed not in others and len(set(others)) == len(others)
    assert Site("hospital-a", Path(".")).round_noise_seed(settings, "data-1") is None
