"""Who the site is and what the coordinator asks of it, read from Flower's context and message."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecordValues, Context, Message

from fedhealth.config import PrivacyConfig
from fedhealth.errors import ConfigError
from fedhealth.privacy.budget import SiteBudget
from fedhealth.privacy.policy import SitePolicy, node_policy
from fedhealth.protocol import keys as K

Settings = dict[str, ConfigRecordValues]


@dataclass(frozen=True)
class Site:
    """Who this site is, where its ``dataset.json`` lives, and its own privacy budget.

    Parameters
    ----------
    name : str
        The site's name (node config ``site-name``; in simulation ``site-<partition>``).
    data_dir : Path
        The directory holding the site's ``dataset.json``.
    budget : SiteBudget, optional
        The site's epsilon cap, delta and ledger (default None: the site keeps no ledger and
        refuses DP training).
    privacy_unit : str, optional
        What one DP record is, ``"patient"`` (default) or ``"scan"`` (node config
        ``privacy-unit``, from site.yaml).
    policy : SitePolicy, optional
        The site's privacy policy (node config ``site-policy``; simulation:
        ``privacy.site_policy``). Default: :class:`~fedhealth.privacy.policy.SitePolicy`'s
        defaults (DP and secure aggregation required).
    noise_seed : int, optional
        The site's own seed for deterministic DP noise (node config ``dp-noise-seed`` from
        site.yaml ``dp_noise_seed``; simulation: ``privacy.simulated_noise_seed``). Default
        None: the noise comes from the site's OS entropy. Never read from the run config.
    device : str, optional
        Where the site trains and evaluates (node config ``device`` from site.yaml; simulation:
        ``train.device``): ``auto`` (default), ``cpu``, ``cuda`` or ``cuda:N``. Never read from
        the run config: the coordinator cannot choose a site's hardware.
    """

    name: str
    data_dir: Path
    budget: SiteBudget | None = None
    privacy_unit: str = K.PRIVACY_UNITS[0]
    policy: SitePolicy = field(default_factory=SitePolicy)
    noise_seed: int | None = None
    device: str = "auto"

    def round_noise_seed(self, settings: Settings, dataset_fingerprint: str) -> int | None:
        """Seed a release's DP noise from the site's own seed, if the site set one.

        The seed covers every instruction field but the run's key (the run config, round, FedProx
        mu, ...) and the dataset: a changed setting, or a patient fewer, gets other noise. It does
        not cover the global model (two runs meant to match aggregate in their own float order),
        so another model for the same round, charged again, gets the same noise: a seeded site's
        noise is reproducible by design, which is why the setting is for tests only.

        Parameters
        ----------
        settings : dict of str to ConfigRecordValues
            The instruction's config record.
        dataset_fingerprint : str
            The training data's fingerprint (:attr:`fedhealth.data.datalist.SiteData.fingerprint`).

        Returns
        -------
        int or None
            None (the default): noise from the OS entropy
            (:func:`fedhealth.training.private.site_generator`); otherwise 63 bits of sha256
            over the site's seed and name, those settings and the dataset's fingerprint.
        """
        if self.noise_seed is None:
            return None
        fields = {k: v for k, v in settings.items() if k != K.RUN_KEY}
        release = json.dumps(
            [self.noise_seed, self.name, fields, dataset_fingerprint], sort_keys=True, default=repr
        )
        return int.from_bytes(hashlib.sha256(release.encode()).digest()[:8], "little") >> 1

    def reply_fields(self, dp: bool) -> dict[str, ConfigRecordValues]:
        """Return what a train reply's ``site`` record says about the site's privacy policy.

        Parameters
        ----------
        dp : bool
            Whether this round trained with DP.

        Returns
        -------
        dict of str to ConfigRecordValues
            With DP, ``privacy-unit`` (and ``dp-noise-seeded`` when the site fixed its noise
            seed); without, ``dp-off-by-site`` (True: the site's own ``policy.require_dp: false``; a
            site that requires DP never trains without it).
        """
        if not dp:
            return {K.DP_OFF_BY_SITE: True}
        seeded = {K.DP_NOISE_SEEDED: True} if self.noise_seed is not None else {}
        return {K.PRIVACY_UNIT: self.privacy_unit, **seeded}

    @classmethod
    def from_context(
        cls,
        context: Context,
        site_dirs: tuple[str, ...] | None = None,
        privacy: PrivacyConfig | None = None,
        device: str = "auto",
    ) -> Site:
        """Read the site from the SuperNode's node config (or a simulation's partition).

        Parameters
        ----------
        context : Context
            Flower's context. Deployment: node config ``data-dir``, ``site-name``,
            ``ledger-dir``, ``epsilon-cap``, ``delta``, ``privacy-unit``, ``site-policy``.
            Simulation: ``partition-id`` (and ``privacy-unit`` when set).
        site_dirs : tuple of str, optional
            Simulation only: every virtual site's folder, by partition id (default None: the
            node config names the site's data directory).
        privacy : PrivacyConfig, optional
            Simulation only: every site's budget and ledger root (default None: no ledger).
            A simulated site's policy is ``privacy.site_policy``: in simulation the researcher
            plays every site.
        device : str, default "auto"
            Simulation: every virtual site's device (``train.device``); the node config's
            ``device`` wins when set.

        Returns
        -------
        Site
            The site.

        Raises
        ------
        ConfigError
            The node config names no data directory (nor a partition with ``site_dirs``), a
            ledger directory without an epsilon cap, or a bad ``privacy-unit``/``site-policy``.
        """
        node = context.node_config
        device = str(node.get(K.NODE_DEVICE, device))
        unit = str(node.get(K.NODE_PRIVACY_UNIT, K.PRIVACY_UNITS[0]))
        if unit not in K.PRIVACY_UNITS:
            raise ConfigError(
                f"node config: {K.NODE_PRIVACY_UNIT}={unit!r}: one of {K.PRIVACY_UNITS}"
            )
        policy = node_policy(node, None if privacy is None else privacy.site_policy)
        noise_seed = node.get(K.NODE_NOISE_SEED)
        if noise_seed is not None and not isinstance(noise_seed, int):
            raise ConfigError(f"node config: {K.NODE_NOISE_SEED}={noise_seed!r}: an integer")
        if K.NODE_DATA_DIR in node:
            data_dir = Path(str(node[K.NODE_DATA_DIR]))
            budget = None
            if K.NODE_LEDGER_DIR in node:
                if K.NODE_EPSILON_CAP not in node:
                    raise ConfigError(
                        f"node config has '{K.NODE_LEDGER_DIR}' but no '{K.NODE_EPSILON_CAP}'"
                    )
                budget = SiteBudget(
                    float(node[K.NODE_EPSILON_CAP]),
                    float(node.get(K.NODE_DELTA, 1e-5)),
                    Path(str(node[K.NODE_LEDGER_DIR])) / "ledger.sqlite",
                )
            name = str(node.get(K.NODE_SITE_NAME, data_dir.name))
            return cls(name, data_dir, budget, unit, policy, noise_seed, device)
        if site_dirs is not None and K.NODE_PARTITION_ID in node:
            index = int(node[K.NODE_PARTITION_ID])
            if not 0 <= index < len(site_dirs):
                raise ConfigError(f"partition-id {index}: only {len(site_dirs)} site folders")
            data_dir = Path(site_dirs[index])
            budget = None
            if privacy is not None:
                budget = SiteBudget(
                    privacy.epsilon,
                    privacy.delta,
                    Path(privacy.ledger_root).resolve() / data_dir.name / "ledger.sqlite",
                )
            seed = (
                None
                if privacy is None or privacy.simulated_noise_seed < 0
                else (privacy.simulated_noise_seed)
            )
            return cls(data_dir.name, data_dir, budget, unit, policy, seed, device)
        raise ConfigError(
            f"node config needs '{K.NODE_DATA_DIR}' (path to the site's dataset directory)"
        )


@dataclass(frozen=True)
class Instruction:
    """What the coordinator asks of the site in one message, read from its config record.

    Parameters
    ----------
    settings : dict of str to ConfigRecordValues
        The whole record: the run config's site keys (:func:`fedhealth.config.site_settings`)
        and the round's keys below.
    server_round : int
        ``server-round`` (default 0).
    run_key : str
        ``run-key``, the run's identity in the site's ledger (default ``""``: the Flower run
        id is used).
    proximal_mu : float
        ``proximal-mu``, FedProx's proximal weight (default 0.0: FedAvg).
    evaluate_round : int or None
        ``evaluate-round``: the round whose global model the site also evaluates, folded into
        its train reply (default None: no folded evaluation).
    """

    settings: Settings
    server_round: int = 0
    run_key: str = ""
    proximal_mu: float = 0.0
    evaluate_round: int | None = None

    @classmethod
    def from_message(cls, msg: Message) -> Instruction:
        """Read and check the message's ``config`` record.

        Parameters
        ----------
        msg : Message
            A train or evaluate instruction.

        Returns
        -------
        Instruction
            The instruction.

        Raises
        ------
        ConfigError
            The message has no ``config`` record, or a round key has the wrong type or is
            negative.
        """
        record = msg.content.config_records.get(K.CONFIG)
        if record is None:
            raise ConfigError(f"instruction has no '{K.CONFIG}' record")
        settings: Settings = dict(record.items())
        evaluate_round = settings.get(K.EVALUATE_ROUND)
        return cls(
            settings=settings,
            server_round=_round(settings.get(K.SERVER_ROUND, 0), K.SERVER_ROUND),
            run_key=str(settings.get(K.RUN_KEY) or ""),
            proximal_mu=_mu(settings.get(K.PROXIMAL_MU, 0.0)),
            evaluate_round=(
                None if evaluate_round is None else _round(evaluate_round, K.EVALUATE_ROUND)
            ),
        )


def derive_seed(seed: int, site: str, server_round: int, phase: str) -> int:
    """Derive a per-site, per-round seed: same config, same randomness; sites independent.

    Seeds data order and augmentation only: DP noise never depends on it (it comes from the
    site's OS entropy, or from a seed the coordinator cannot know).

    Parameters
    ----------
    seed : int
        The run's seed.
    site : str
        The site's name.
    server_round : int
        The server round.
    phase : str
        ``"train"`` or ``"evaluate"``.

    Returns
    -------
    int
        The first 4 bytes (little-endian) of sha256 over ``seed/site/round/phase``.
    """
    digest = hashlib.sha256(f"{seed}/{site}/{server_round}/{phase}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def model_digest(arrays: ArrayRecord) -> str:
    """Hash the global model: sha256 over its keys, dtypes, shapes and bytes.

    Parameters
    ----------
    arrays : ArrayRecord
        The global model as received.

    Returns
    -------
    str
        The hex digest (the ledger's release key: a replayed round is charged once).
    """
    digest = hashlib.sha256()
    for key in sorted(arrays):
        array = arrays[key]
        digest.update(f"{key}|{array.dtype}|{array.shape}|".encode())
        digest.update(array.data)
    return digest.hexdigest()


def _integer(value: ConfigRecordValues, key: str) -> int:
    number = _number(value, key)
    if not math.isfinite(number) or number != int(number):
        raise ConfigError(f"instruction field '{key}'={value!r}: not an integer")
    return int(number)


MAX_ROUND = 1_000_000  # a round number beyond any run's (and within SQLite's integers)


def _round(value: ConfigRecordValues, key: str) -> int:
    number = _integer(value, key)
    if not 0 <= number <= MAX_ROUND:
        raise ConfigError(f"instruction field '{key}'={value!r}: not a round in [0, {MAX_ROUND}]")
    return number


def _mu(value: ConfigRecordValues) -> float:
    mu = _number(value, K.PROXIMAL_MU)
    if not 0 <= mu < float("inf"):
        raise ConfigError(f"instruction field '{K.PROXIMAL_MU}'={value!r}: must be finite, >= 0")
    return mu


def _number(value: ConfigRecordValues, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"instruction field '{key}'={value!r}: not a number")
    try:
        return float(value)
    except ValueError as exc:
        raise ConfigError(f"instruction field '{key}'={value!r}: not a number") from exc
