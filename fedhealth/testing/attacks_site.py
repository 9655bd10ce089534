"""The site the privacy rows attack: its real ClientApp, node config and ledger, on loopback.

Shared by :mod:`fedhealth.testing.attacks_privacy` (the policy's refusals) and
:mod:`fedhealth.testing.attacks_ledger` (every release charged).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from fedhealth.privacy.policy import SitePolicy

SITE = "hospital-p"
CAP, DELTA = 8.0, 1e-5
# A tiny run of the attack lab's shape: a small U-Net on 32 mm patients, two rounds.
OVERRIDES = (
    "rounds=2",
    "model.channels=[4,8]",
    "model.strides=[2]",
    "train.local_epochs=1",
    "train.batch_size=2",
    "data.patch_size=32",
)


class Site:
    """One site's ClientApp, node config and ledger, as its SuperNode runs them.

    Parameters
    ----------
    root : Path
        The site's own directory (ledger and state), created.
    data : Path
        The site's data directory (only ever read).
    policy : SitePolicy
        The site's privacy policy (site.yaml ``policy:``).
    """

    def __init__(self, root: Path, data: Path, policy: SitePolicy) -> None:
        from fedhealth.clientapp.app import make_client_app

        self.root, self.data, self.policy = root, data, policy
        self.ledger = root / "ledger"
        self.ledger.mkdir(parents=True, exist_ok=True)
        self.app = make_client_app()

    def context(self) -> Any:
        """Return Flower's context with the node config the site daemon writes from site.yaml."""
        from flwr.app import Context, RecordDict

        from fedhealth.protocol import keys as K

        node: dict[str, bool | float | int | str] = {
            K.NODE_DATA_DIR: str(self.data),
            K.NODE_SITE_NAME: SITE,
            K.NODE_LEDGER_DIR: str(self.ledger),
            K.NODE_EPSILON_CAP: CAP,
            K.NODE_DELTA: DELTA,
            K.NODE_POLICY: self.policy.to_json(),
        }
        return Context(run_id=1, node_id=0, node_config=node, state=RecordDict(), run_config={})

    def instruction(
        self,
        overrides: tuple[str, ...] = (),
        *,
        run: str = "run-a",
        server_round: int = 1,
        message_type: str = "train",
    ) -> Any:
        """Build one train instruction as the coordinator would (Hydra: one thread at a time).

        The global model is the same for the same run config (MONAI's init from the run's seed).
        """
        import torch
        from flwr.app import ArrayRecord, ConfigRecord, ConfigRecordValues, Message, RecordDict

        from fedhealth.config import compose, site_settings
        from fedhealth.models import build_model
        from fedhealth.protocol import keys as K

        cfg = compose([*OVERRIDES, *overrides])
        torch.manual_seed(0)  # the coordinator's global model: the same bytes every time
        settings: dict[str, ConfigRecordValues] = {
            **site_settings(cfg),
            K.SERVER_ROUND: server_round,
            K.RUN_KEY: run,
        }
        content = RecordDict(
            {
                K.ARRAYS: ArrayRecord(build_model(cfg.model).state_dict()),
                K.CONFIG: ConfigRecord(settings),
            }
        )
        return Message(content, 0, message_type)

    def deliver(self, msg: Any) -> Any:
        """Hand ``msg`` to the site's ClientApp, as its SuperNode does; return the reply."""
        return self.app(msg, self.context())

    def send(self, overrides: tuple[str, ...] = (), *, run: str = "run-a") -> Any:
        """Build and deliver a round-1 train instruction; return the site's reply."""
        return self.deliver(self.instruction(overrides, run=run))

    def entries(self) -> list[tuple[str, int, float]]:
        """Return the ledger's entries as ``(run, round, epsilon after)``."""
        from fedhealth.privacy.ledger import PrivacyLedger

        if not (self.ledger / "ledger.sqlite").exists():
            return []
        with PrivacyLedger(self.ledger / "ledger.sqlite", SITE) as db:
            return [(e.run, e.round, e.epsilon_after) for e in db.entries]

    def phases(self) -> list[tuple[float, float, int]]:
        """Return the ledger's DP phases ``(noise multiplier, sample rate, steps)``."""
        from fedhealth.privacy.ledger import PrivacyLedger

        with PrivacyLedger(self.ledger / "ledger.sqlite", SITE) as db:
            return list(db.history())

    def snapshot(self) -> str:
        """Return sha256 over every file under the ledger directory (ledger, mark, releases)."""
        digest = hashlib.sha256()
        for path in sorted(p for p in self.ledger.rglob("*") if p.is_file()):
            digest.update(path.relative_to(self.ledger).as_posix().encode())
            digest.update(path.read_bytes())
        return digest.hexdigest()


def update_bytes(reply: Any) -> bytes:
    """Return the update a train reply carries, as bytes (empty for an error reply)."""
    from fedhealth.protocol import keys as K

    if reply.has_error() or K.ARRAYS not in reply.content.array_records:
        return b""
    arrays = reply.content.array_records[K.ARRAYS]
    return b"".join(arrays[key].data for key in sorted(arrays))


def outcome(reply: Any) -> str:
    """Say in a few words what a reply is: an error (code, end of its reason) or an update."""
    if reply.has_error():
        return f"error {reply.error.code}: ...{reply.error.reason[-60:]}"
    return f"an update ({len(update_bytes(reply))} bytes)"
