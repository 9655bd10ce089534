"""The site's own privacy policy: what a coordinator's instruction may ask, checked at the site.

The run config asks; the site decides. Every limit here is the hospital's (site.yaml's
``policy`` block; a simulation's ``privacy.site_policy``), travels to the site's ClientApp only
through its node config (:data:`fedhealth.protocol.keys.NODE_POLICY`), and is checked before
anything is read, trained or charged: a refusal names the field and the site's limit
(:class:`~fedhealth.errors.PolicyRefused`) and leaves the ledger as it was. The limits that
depend on the ledger (epsilon and rounds per run, the noise ceiling for a planned noise) are
checked inside the ledger's exclusive transaction (:func:`fedhealth.privacy.budget.charge_round`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from fedhealth.errors import ConfigError, PolicyRefused
from fedhealth.protocol.keys import NODE_POLICY

RELEASABLE = (
    *("loss", "train-seconds", "num-examples", "sample-rate", "noise-multiplier", "history"),
    "evaluation",
)
"""What a site may release to the coordinator beyond the minimal reply (``policy.release``)."""


@dataclass
class SitePolicy:
    """A hospital's privacy policy (site.yaml ``policy:``; simulation ``privacy.site_policy``).

    Parameters
    ----------
    require_dp : bool, default True
        Refuse any train instruction without DP. ``false`` is the site's explicit opt-out;
        its replies and the privacy report then say "DP off by the site's own choice".
    require_secure_aggregation : bool, default True
        Refuse a plain ``train`` instruction: the site's update leaves only masked, inside a
        secure sum (SecAgg+).
    min_secagg_sites : int, default 3
        The fewest sites in a secure sum the site takes part in (>= 2; with 2, each site can
        subtract its own update from the sum and learn the other's). Checked when the round's
        sites are announced and again before the site reveals its unmasking shares.
    max_epsilon_per_run : float, default 0.0
        The most epsilon one run (``run-key``, named by the coordinator) may spend here, composed
        by the site's accountant; 0: only the site's overall cap, which bounds every run, applies.
    max_rounds_per_run : int, default 100
        The most rounds one run may train here; 0: no limit.
    max_noise_multiplier : float, default 10.0
        The noise-multiplier ceiling: a run whose noise (fixed by the run or planned by the
        site to fit its budget) is above it is refused, its update would be mostly noise.
    min_max_grad_norm, max_max_grad_norm : float, default 0.01, 10.0
        Bounds on the run's per-record clipping norm ``privacy.max_grad_norm``.
    max_local_epochs : int, default 10
        The most local epochs per round (``train.local_epochs``).
    min_lr, max_lr : float, default 1e-6, 1.0
        Bounds on the run's learning rate ``train.lr``.
    max_model_parameters : int, default 100_000_000
        The largest model (``model.*``, counted on PyTorch's meta device without allocating
        it) the site builds, trains and evaluates.
    max_patch_size : int, default 160
        The largest training patch and sliding window edge ``data.patch_size`` (voxels).
    min_target_spacing : float, default 0.5
        The finest resampling grid ``data.target_spacing`` (mm): a finer grid multiplies the
        voxels of every volume the site loads by the cube of the ratio.
    max_batch_size : int, default 64
        The most patches per training step ``train.batch_size``.
    max_sw_batch_size : int, default 32
        The most sliding windows per inference step ``data.sw_batch_size``.
    max_num_threads : int, default 0
        The most CPU threads ``train.num_threads``; 0: the machine's CPU count.
    models : list of str, default []
        The model architectures (``model.name``) the site trains; empty: every model of the
        installed fedhealth.
    release : list of str, default ["evaluation"]
        What the site releases beyond the minimal reply (the update, the example count inside
        the secure sum, epsilon spent and its ledger standing): any of :data:`RELEASABLE`.
        ``evaluation``: Dice, loss and test-volume count of any model the coordinator sends,
        un-noised and uncharged (without it, evaluate instructions are refused).

    Raises
    ------
    ConfigError
        From :meth:`validate`, naming the field.
    """

    require_dp: bool = True
    require_secure_aggregation: bool = True
    min_secagg_sites: int = 3
    max_epsilon_per_run: float = 0.0
    max_rounds_per_run: int = 100
    max_noise_multiplier: float = 10.0
    min_max_grad_norm: float = 0.01
    max_max_grad_norm: float = 10.0
    max_local_epochs: int = 10
    min_lr: float = 1e-6
    max_lr: float = 1.0
    max_model_parameters: int = 100_000_000
    max_patch_size: int = 160
    min_target_spacing: float = 0.5
    max_batch_size: int = 64
    max_sw_batch_size: int = 32
    max_num_threads: int = 0
    models: list[str] = field(default_factory=list)
    release: list[str] = field(default_factory=lambda: ["evaluation"])

    def validate(self, where: str = "site policy") -> SitePolicy:
        """Check the limits together.

        Parameters
        ----------
        where : str, optional
            What to name in errors (default ``"site policy"``).

        Returns
        -------
        SitePolicy
            ``self``.

        Raises
        ------
        ConfigError
            A field is out of range; the message names it.
        """
        checks = {
            "min_secagg_sites": self.min_secagg_sites >= 2,
            "max_epsilon_per_run": self.max_epsilon_per_run >= 0,
            "max_rounds_per_run": self.max_rounds_per_run >= 0,
            "max_noise_multiplier": self.max_noise_multiplier > 0,
            "min_max_grad_norm": 0 < self.min_max_grad_norm <= self.max_max_grad_norm,
            "max_local_epochs": self.max_local_epochs >= 1,
            "min_lr": 0 < self.min_lr <= self.max_lr,
            "max_model_parameters": self.max_model_parameters >= 1,
            "max_patch_size": self.max_patch_size >= 16,
            "min_target_spacing": self.min_target_spacing > 0,
            "max_batch_size": self.max_batch_size >= 1,
            "max_sw_batch_size": self.max_sw_batch_size >= 1,
            "max_num_threads": self.max_num_threads >= 0,
            "release": set(self.release) <= set(RELEASABLE),
        }
        if bad := [name for name, ok in checks.items() if not ok]:
            raise ConfigError(f"{where}: out of range: {', '.join(bad)} (release: {RELEASABLE})")
        return self

    def releases(self, what: str) -> bool:
        """Tell whether the policy releases ``what`` (one of :data:`RELEASABLE`)."""
        return what in self.release

    def to_json(self) -> str:
        """Serialise for the node config (:data:`fedhealth.protocol.keys.NODE_POLICY`)."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_mapping(cls, raw: Any, where: str) -> SitePolicy:
        """Build and check a policy from a mapping (node config JSON or a config section).

        Parameters
        ----------
        raw : Any
            A mapping of field names to values; absent fields take their defaults.
        where : str
            What to name in errors.

        Returns
        -------
        SitePolicy
            The checked policy.

        Raises
        ------
        ConfigError
            Not a mapping, an unknown field, or a value of the wrong type or range.
        """
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping of policy fields")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ConfigError(f"{where}: unknown policy field(s) {unknown}")
        defaults = asdict(cls())
        for name, value in raw.items():
            want = type(defaults[name])
            ok = (
                isinstance(value, list) and all(isinstance(v, str) for v in value)
                if want is list
                else isinstance(value, want) and not (want is not bool and isinstance(value, bool))
            ) or (want is float and isinstance(value, int) and not isinstance(value, bool))
            if not ok:
                raise ConfigError(
                    f"{where}: policy field {name}={value!r}: expected {want.__name__}"
                )
        values: dict[str, Any] = {
            k: float(v) if type(defaults[k]) is float else v for k, v in raw.items()
        }
        return cls(**values).validate(where)

    @classmethod
    def from_json(cls, text: str, where: str) -> SitePolicy:
        """Parse :meth:`to_json`'s form (the node config value).

        Parameters
        ----------
        text : str
            The JSON object.
        where : str
            What to name in errors.

        Returns
        -------
        SitePolicy
            The checked policy.

        Raises
        ------
        ConfigError
            Not JSON, or as :meth:`from_mapping`.
        """
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{where}: not a JSON policy: {exc}") from exc
        return cls.from_mapping(raw, where)

    def check_instruction(
        self,
        site: str,
        *,
        dp: bool,
        secure: bool,
        rounds: int,
        max_grad_norm: float,
        local_epochs: int,
        lr: float,
        model: str,
        noise_multiplier: float,
    ) -> None:
        """Refuse a train instruction that asks for more than the policy allows.

        Called before the site reads its data: a refusal trains and charges nothing.

        Parameters
        ----------
        site : str
            The site's name, for the message.
        dp : bool
            The run's ``privacy.enabled``.
        secure : bool
            Whether the instruction is a secure-aggregation stage (False: a plain ``train``).
        rounds : int
            The run's ``rounds``.
        max_grad_norm : float
            The run's ``privacy.max_grad_norm``.
        local_epochs : int
            The run's ``train.local_epochs``.
        lr : float
            The run's ``train.lr``.
        model : str
            The run's ``model.name``.
        noise_multiplier : float
            The run's fixed ``privacy.noise_multiplier`` (0: the site plans its own).

        Raises
        ------
        DPRequired
            ``dp`` is False and the policy requires DP.
        PolicyRefused
            Any other limit; the message names the run config field and the site's limit.
        """
        from fedhealth.errors import DPRequired

        if not dp and self.require_dp:
            raise DPRequired(
                f"site {site}: refused before training: the instruction sets "
                "privacy.enabled=false, and this site's policy requires DP (site.yaml "
                "policy.require_dp: true, the default). Nothing was trained or charged."
            )
        if not secure and self.require_secure_aggregation:
            refuse(
                site,
                "require_secure_aggregation",
                "a plain train instruction asks for the site's unmasked update; this site "
                "releases updates only inside a secure sum (policy.require_secure_aggregation: "
                "true)",
            )
        if self.max_rounds_per_run and rounds > self.max_rounds_per_run:
            refuse(
                site,
                "max_rounds_per_run",
                f"the run asks for rounds={rounds}; this site allows "
                f"{self.max_rounds_per_run} per run",
            )
        if dp and not self.min_max_grad_norm <= max_grad_norm <= self.max_max_grad_norm:
            refuse(
                site,
                "max_grad_norm",
                f"privacy.max_grad_norm={max_grad_norm:g} is outside this site's "
                f"[{self.min_max_grad_norm:g}, {self.max_max_grad_norm:g}]",
            )
        if local_epochs > self.max_local_epochs:
            refuse(
                site,
                "max_local_epochs",
                f"train.local_epochs={local_epochs}; this site allows {self.max_local_epochs}",
            )
        if not self.min_lr <= lr <= self.max_lr:
            refuse(
                site,
                "lr",
                f"train.lr={lr:g} is outside this site's [{self.min_lr:g}, {self.max_lr:g}]",
            )
        if self.models and model not in self.models:
            refuse(site, "models", f"model.name={model!r}; this site trains {self.models}")
        if dp and noise_multiplier > self.max_noise_multiplier:
            refuse(
                site,
                "max_noise_multiplier",
                f"privacy.noise_multiplier={noise_multiplier:g} is above this site's ceiling "
                f"{self.max_noise_multiplier:g} (the update would be mostly noise)",
            )

    def check_secure_sum(self, site: str, sites: int, stage: str) -> None:
        """Refuse to take part in a secure sum of fewer sites than the policy's minimum.

        Parameters
        ----------
        site : str
            The site's name.
        sites : int
            The sites the coordinator announced (share stage) or says survived (unmask stage).
        stage : str
            The secure-aggregation stage, for the message.

        Raises
        ------
        PolicyRefused
            ``sites`` is below :attr:`min_secagg_sites`.
        """
        if sites < self.min_secagg_sites:
            refuse(
                site,
                "min_secagg_sites",
                f"{stage}: the secure sum would hold {sites} site(s); this site takes part "
                f"only in sums of at least {self.min_secagg_sites}",
            )


def node_policy(node: Mapping[str, Any], simulated: SitePolicy | None = None) -> SitePolicy:
    """Read the site's policy from its node config (deployment) or the simulation's block.

    Parameters
    ----------
    node : mapping
        The SuperNode's node config; its ``site-policy`` (:data:`fedhealth.protocol.keys.
        NODE_POLICY`) is the JSON the site daemon wrote from site.yaml.
    simulated : SitePolicy, optional
        Simulation only: ``privacy.site_policy``, used when the node config has no policy
        (default None).

    Returns
    -------
    SitePolicy
        The checked policy; with neither, the defaults (DP and secure aggregation required).

    Raises
    ------
    ConfigError
        The node config's policy is not valid JSON or breaks a rule of :meth:`SitePolicy.
        validate`.
    """
    raw = node.get(NODE_POLICY)
    if raw is not None:
        return SitePolicy.from_json(str(raw), f"node config {NODE_POLICY}")
    if simulated is not None:
        return SitePolicy.from_mapping(asdict(simulated), "config privacy.site_policy")
    return SitePolicy()


def refuse(site: str, field_name: str, reason: str) -> None:
    """Raise the catalogued policy refusal for ``field_name``.

    Parameters
    ----------
    site : str
        The site's name.
    field_name : str
        The policy field whose limit the instruction breaks (sent to the coordinator).
    reason : str
        What was asked and the site's limit (stays in the site's log).

    Raises
    ------
    PolicyRefused
        Always.
    """
    raise PolicyRefused(
        f"site {site}: refused by its privacy policy ({field_name}): {reason}. Nothing was "
        "trained or charged.",
        field=field_name,
    )
