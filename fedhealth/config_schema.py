"""The configuration schema: one dataclass per section of ``configs/config.yaml``.

:mod:`fedhealth.config` composes the YAML with Hydra and validates it against these classes;
import them from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedhealth.privacy.policy import SitePolicy


@dataclass
class ModelConfig:
    """A MONAI segmentation network; see :mod:`fedhealth.models`.

    Parameters
    ----------
    name : str, default "unet"
        ``"unet"`` or ``"segresnet"``.
    channels : list of int, default [8, 16, 32]
        U-Net feature channels per level; SegResNet uses ``channels[0]`` as its initial filters.
    strides : list of int, default [2, 2]
        U-Net downsampling strides, one fewer than ``channels``.
    num_res_units : int, default 1
        Residual units per U-Net block, in [0, 8].
    norm : str, default "instance"
        ``"instance"`` or ``"group"`` (never BatchNorm: it breaks DP-SGD).
    num_groups : int, default 4
        Groups of GroupNorm, with ``norm="group"``.
    in_channels : int, default 1
        Image channels: the number of sequences the sites' ``dataset.json`` declare under
        ``modality``.
    out_channels : int, default 2
        Output classes, background included: the number of ``labels`` the sites declare.
    """

    name: str = "unet"
    channels: list[int] = field(default_factory=lambda: [8, 16, 32])
    strides: list[int] = field(default_factory=lambda: [2, 2])
    num_res_units: int = 1
    norm: str = "instance"
    num_groups: int = 4
    in_channels: int = 1
    out_channels: int = 2


@dataclass
class DataConfig:
    """Where the sites' data is and how every volume is prepared; see :mod:`fedhealth.data`.

    Parameters
    ----------
    site_dirs : list of str, default []
        The hospitals' own sites: one folder per site, each with its Decathlon
        ``dataset.json``; the site is named after its folder. When set, ``sites`` is their
        number and nothing is synthesized. fedhealth only reads these folders.
    root : str, default "data/synthetic"
        Without ``site_dirs``: the synthetic cohort's folder, site ``i`` in
        ``<root>/site-<i>/``. fedhealth writes only into a folder it created (marked by
        ``.fedhealth-synthetic.json``) and never over an existing file.
    train_per_site : int, default 64
        Training volumes (patients) written per synthetic site.
    test_per_site : int, default 8
        Test volumes written per synthetic site.
    fov : int, default 120
        Field of view of a synthetic phantom, in mm (voxels per edge: ``fov`` / the site's
        spacing, 1.0 to 1.5 mm: 80 to 120).
    patch_size : int, default 32
        Edge of the cubic training patch and of the sliding window, in voxels; at least 16
        and a multiple of 4.
    target_spacing : float, default 1.25
        Isotropic voxel edge every volume is resampled to (after reorientation to RAS), in mm.
    sw_overlap : float, default 0.25
        Overlap of neighbouring sliding windows at evaluation and prediction, in [0, 0.9].
    sw_batch_size : int, default 4
        Windows per forward pass of the sliding-window inference.
    heterogeneity : float, default 1.0
        How much synthetic sites' scanners differ (0 to 2).
    cache : bool, default True
        Cache the deterministic preprocessing in memory.
    """

    site_dirs: list[str] = field(default_factory=list)
    root: str = "data/synthetic"
    train_per_site: int = 64
    test_per_site: int = 8
    fov: int = 120
    patch_size: int = 32
    target_spacing: float = 1.25
    sw_overlap: float = 0.25
    sw_batch_size: int = 4
    heterogeneity: float = 1.0
    cache: bool = True


@dataclass
class TrainConfig:
    """Local training at a site; round ``r`` trains with ``lr * lr_decay ** (r - 1)``.

    Parameters
    ----------
    local_epochs : int, default 1
        Passes over the site's data per round.
    batch_size : int, default 16
        Records per batch (the expected batch size under DP's Poisson sampling).
    lr : float, default 3e-2
        Adam learning rate of round 1.
    lr_decay : float, default 0.9
        Factor applied to the learning rate per round, in (0, 1].
    weight_decay : float, default 0.0
        Adam's L2 weight decay (>= 0).
    num_threads : int, default 1
        Torch CPU threads.
    device : str, default "auto"
        Where simulated sites, baselines and ``predict`` train and infer: ``auto`` (CUDA when
        PyTorch sees a GPU), ``cpu``, ``cuda`` or ``cuda:N``. Never sent to a site: a deployed
        site's device is its own (site.yaml ``device``).
    """

    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 3e-2
    lr_decay: float = 0.9
    weight_decay: float = 0.0
    num_threads: int = 1
    device: str = "auto"


@dataclass
class StrategyConfig:
    """Server strategy from ``flwr.serverapp.strategy``.

    FedAvg (McMahan et al. 2017, https://arxiv.org/abs/1602.05629), FedProx (Li et al. 2020,
    https://arxiv.org/abs/1812.06127) or FedAdam (Reddi et al. 2021,
    https://arxiv.org/abs/2003.00295).

    Parameters
    ----------
    name : str, default "fedavg"
        ``"fedavg"``, ``"fedprox"`` or ``"fedadam"``.
    fraction_train : float, default 1.0
        Fraction of connected sites asked to train each round, in (0, 1].
    fraction_evaluate : float, default 1.0
        Fraction of connected sites asked to evaluate; 0 disables evaluation.
    min_sites : int, default 2
        Sites a round needs (capped at ``sites``).
    proximal_mu : float, default 0.0
        FedProx's proximal weight ``mu``.
    eta : float, default 1e-2
        FedAdam's server learning rate.
    eta_l : float, default 1e-2
        FedAdam's client learning rate parameter.
    beta_1 : float, default 0.9
        FedAdam's first-moment decay.
    beta_2 : float, default 0.99
        FedAdam's second-moment decay.
    tau : float, default 1e-3
        FedAdam's adaptivity (epsilon) term.
    max_examples_per_site : int, default 100000
        Largest example count a site's reply may claim (FedAvg weights by it).
    """

    name: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_sites: int = 2
    proximal_mu: float = 0.0
    eta: float = 1e-2
    eta_l: float = 1e-2
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    max_examples_per_site: int = 100000


@dataclass
class FederationConfig:
    """How rounds are run: deadlines, the simulation backend, secure aggregation.

    Secure aggregation is SecAgg+ (Bell et al. 2020, https://eprint.iacr.org/2020/704); see
    :mod:`fedhealth.security.secagg`.

    Parameters
    ----------
    round_timeout : float, default 0.0
        Deadline for a round's replies, in seconds; 0 derives it from the model's size, the
        transport dtype and ``site_link_mbps`` (:func:`fedhealth.protocol.transport.round_deadline`:
        600 s plus twice the transfer time).
    site_link_mbps : float, default 10.0
        The slowest hospital link the derived deadline allows for, in Mb/s (both ways).
    transport_dtype : str, default "float32"
        What the packed model and plain updates travel as: ``float32``, ``float16`` or
        ``bfloat16`` (half the bytes; widened to float32 at both ends; DP noise is added
        before rounding; a secure sum keeps its own fixed-point encoding). Needs
        ``pack_arrays``.
    reply_poll_interval : float, default 0.1
        Seconds between reply pulls (Flower's own: 3 s), in [0.01, 10].
    fold_evaluate : bool, default True
        Evaluate round ``r``'s model with round ``r + 1``'s train message.
    pack_arrays : bool, default True
        The model travels as one float32 vector, not one array per tensor.
    rejoin_wait : float, default 30.0
        With fewer sites than the last round was sent to, wait this long for them, in seconds.
    cpus_per_site : float, default 1.0
        Simulation: CPUs reserved per virtual site.
    ray_num_cpus : int, default 0
        Simulation: CPUs given to Ray; 0 means all of this machine's.
    gpus_per_site : float, default 0.0
        Simulation: GPUs reserved per virtual site (Flower's ``client_resources.num_gpus``;
        a fraction shares one GPU between sites).
    ray_address : str, default ""
        Simulation: join this running Ray cluster (``ray start --head`` on one machine,
        ``ray start --address=...`` on the others) instead of starting a local Ray instance;
        ``""``: a local instance on 127.0.0.1.
    secure_aggregation : bool, default True
        Run SecAgg+ so the coordinator sees only the sum of the updates.
    secagg_threshold : float, default 0.51
        Shamir threshold as a fraction of the round's sites, in (0.5, 1] (a site refuses half
        or less of its share holders).
    secagg_degree : int, default 0
        Neighbours per site in the masking graph; 0 means all (SecAgg); -1 SecAgg+'s
        ``2 * ceil(log2 n)`` (near-constant cost per site at scale; the Shamir threshold is then
        ``secagg_threshold`` of a site's neighbourhood).
    secagg_clipping_range : float, default 8.0
        Each coordinate of a weighted update is clipped to +- this before quantization.
    secagg_max_examples : int, default 1024
        Public bound on a site's example count under secure aggregation.
    secagg_key_ahead : bool, default True
        Set up the next round's keys (advertise, share) while the coordinator aggregates and
        checkpoints; False runs all four stages inside each round.
    """

    round_timeout: float = 0.0  # 0: from the model's size and site_link_mbps
    site_link_mbps: float = 10.0
    transport_dtype: str = "float32"  # float32, float16 or bfloat16 on the wire
    reply_poll_interval: float = 0.1  # seconds between reply pulls (Flower's own: 3 s)
    fold_evaluate: bool = True  # evaluate round r's model with round r+1's train message
    pack_arrays: bool = True  # the model travels as one float32 vector, not one array per tensor
    rejoin_wait: float = 30.0  # fewer sites than the last round sent to: wait this for them
    cpus_per_site: float = 1.0
    ray_num_cpus: int = 0
    gpus_per_site: float = 0.0
    ray_address: str = ""
    secure_aggregation: bool = True
    secagg_threshold: float = 0.51
    secagg_degree: int = 0
    secagg_clipping_range: float = 8.0
    secagg_max_examples: int = 1024
    secagg_key_ahead: bool = True  # next round's advertise and share while this one aggregates


@dataclass
class PrivacyConfig:
    """DP-SGD at every site (Opacus) and the site's budget.

    DP-SGD: Abadi et al. 2016, https://arxiv.org/abs/1607.00133. ``enabled``,
    ``max_grad_norm``, ``accountant`` and ``noise_multiplier`` are the consortium's training
    settings, sent to sites each round. ``epsilon``, ``delta`` and ``ledger_root`` are the
    site's own: in deployment each site sets them in its node config (``epsilon-cap``,
    ``delta``, ``ledger-dir``) and the coordinator never sees them as inputs.

    Parameters
    ----------
    enabled : bool, default True
        Train with DP-SGD.
    epsilon : float, default 8.0
        The site's epsilon cap over all its training.
    delta : float, default 1e-5
        The site's delta, in (0, 1).
    max_grad_norm : float, default 0.5
        Per-record L2 clipping bound.
    accountant : str, default "rdp"
        ``"rdp"`` (Mironov 2017, https://arxiv.org/abs/1702.07476) or ``"prv"`` (Gopi et al.
        2021, https://arxiv.org/abs/2106.02848).
    noise_multiplier : float, default 0.0
        Fixed noise multiplier; 0 lets each site plan, once per run, the noise that fits its
        remaining rounds under its cap.
    ledger_root : str, default "ledgers"
        Simulation: directory holding each site's privacy ledger.
    simulated_noise_seed : int, default -1
        Simulation only: a seed (>= 0) the simulated sites use for deterministic DP noise
        (tests that compare runs). Negative: OS entropy, as at real sites. Real sites never
        read it: theirs is site.yaml ``dp_noise_seed``, which the coordinator cannot set.
    site_policy : SitePolicy
        Simulation only: every simulated site's own privacy policy, the block a hospital
        writes under ``policy:`` in its site.yaml (:class:`fedhealth.privacy.policy.SitePolicy`).
        Never sent to a site: a real site's policy is its own.

    Notes
    -----
    No field sets the DP noise's randomness: each site draws its noise and Poisson sampling
    from a generator seeded from its own OS entropy
    (:func:`fedhealth.training.private.site_generator`), never from ``seed``. The former
    ``secure_rng`` switch is gone: it needed ``torchcsprng``, which has no build.
    """

    enabled: bool = True
    epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 0.5
    accountant: str = "rdp"
    noise_multiplier: float = 0.0
    ledger_root: str = "ledgers"
    simulated_noise_seed: int = -1
    site_policy: SitePolicy = field(default_factory=SitePolicy)


@dataclass
class TrackingConfig:
    """Experiment tracking in MLflow; see :mod:`fedhealth.runs.tracking`.

    Parameters
    ----------
    enabled : bool, default True
        Log every run (params, per-round metrics, artifacts).
    uri : str, default ""
        An MLflow tracking server (``http://...``) or store URI; empty: offline, an SQLite store
        ``<run_root>/mlflow.db`` with artifacts in ``<run_root>/mlartifacts``.
    experiment : str, default "fedhealth"
        The MLflow experiment runs are logged under.
    """

    enabled: bool = True
    uri: str = ""
    experiment: str = "fedhealth"


@dataclass
class Config:
    """The whole run configuration (``configs/config.yaml``).

    Parameters
    ----------
    seed : int, default 0
        Drives model initialisation and data order; never DP noise or sampling.
    sites : int, default 3
        Number of sites.
    rounds : int, default 10
        Federated rounds.
    run_root : str, default "runs"
        Directory holding run directories.
    run_name : str, default ""
        The run directory's name; empty means a UTC timestamp.
    model : ModelConfig
        See :class:`ModelConfig`.
    data : DataConfig
        See :class:`DataConfig`.
    train : TrainConfig
        See :class:`TrainConfig`.
    strategy : StrategyConfig
        See :class:`StrategyConfig`.
    federation : FederationConfig
        See :class:`FederationConfig`.
    privacy : PrivacyConfig
        See :class:`PrivacyConfig`.
    tracking : TrackingConfig
        See :class:`TrackingConfig`.
    """

    seed: int = 0
    sites: int = 3
    rounds: int = 10
    run_root: str = "runs"
    run_name: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
