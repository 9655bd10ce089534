"""Glue over Opacus's accountants: epsilon of a recorded history, and noise planning.

A history is the list of ``(noise_multiplier, sample_rate, steps)`` DP-SGD phases a site has
run, exactly Opacus's ``accountant.history``. Nothing here implements an accountant: RDP
(Mironov 2017, https://arxiv.org/abs/1702.07476; the subsampled Gaussian of Mironov, Talwar and
Zhang 2019, https://arxiv.org/abs/1908.10530; the epsilon conversion of Balle et al. 2020,
https://arxiv.org/abs/1905.09982, Theorem 21) and PRV (Gopi, Lee and Wutschitz 2021,
https://arxiv.org/abs/2106.02848) are Opacus's.
"""

from __future__ import annotations

from collections.abc import Sequence

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant

from fedhealth.errors import ConfigError

Phase = tuple[float, float, int]
ACCOUNTANTS: dict[str, type[IAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}

# Planning searches noise multipliers in this range; above it the utility is nil anyway.
SIGMA_MIN, SIGMA_MAX = 0.3, 64.0


def accountant(name: str, history: Sequence[Phase] = ()) -> IAccountant:
    """Make an Opacus accountant holding ``history``.

    Parameters
    ----------
    name : str
        ``"rdp"`` (Opacus ``RDPAccountant``) or ``"prv"`` (``PRVAccountant``).
    history : sequence of (float, float, int), optional
        ``(noise_multiplier, sample_rate, steps)`` phases (default: none).

    Returns
    -------
    IAccountant
        The accountant, its ``history`` set to ``history``.

    Raises
    ------
    ConfigError
        ``name`` is not one of :data:`ACCOUNTANTS`.
    """
    if name not in ACCOUNTANTS:
        raise ConfigError(f"privacy.accountant={name!r}: choose one of {sorted(ACCOUNTANTS)}")
    acc = ACCOUNTANTS[name]()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return acc


def epsilon(history: Sequence[Phase], delta: float, name: str = "rdp") -> float:
    """Compute the epsilon ``history`` spends at ``delta``.

    Parameters
    ----------
    history : sequence of (float, float, int)
        ``(noise_multiplier, sample_rate, steps)`` phases, in order.
    delta : float
        The target delta, in (0, 1).
    name : str, optional
        The accountant, ``"rdp"`` (default) or ``"prv"``.

    Returns
    -------
    float
        Epsilon (0.0 for an empty history).

    Raises
    ------
    ConfigError
        Unknown accountant.
    """
    if not history:
        return 0.0
    return float(accountant(name, history).get_epsilon(delta=delta))


def plan_noise(
    history: Sequence[Phase],
    sample_rate: float,
    steps: int,
    cap: float,
    delta: float,
    name: str = "rdp",
    tolerance: float = 0.005,
) -> float | None:
    """Find the smallest noise multiplier whose ``steps`` more steps keep epsilon within ``cap``.

    Bisection over Opacus's accountant, the site's past history included, in
    [:data:`SIGMA_MIN`, :data:`SIGMA_MAX`].

    Parameters
    ----------
    history : sequence of (float, float, int)
        The phases already spent.
    sample_rate : float
        Poisson sampling rate of the planned phase, in (0, 1].
    steps : int
        Steps of the planned phase (all the run's remaining rounds).
    cap : float
        The epsilon cap.
    delta : float
        The target delta, in (0, 1).
    name : str, optional
        The accountant, ``"rdp"`` (default) or ``"prv"``.
    tolerance : float, optional
        Relative width of the final bisection interval (default 0.005).

    Returns
    -------
    float or None
        The noise multiplier (an upper end of the interval: it fits); :data:`SIGMA_MIN` when
        even that fits; None when even :data:`SIGMA_MAX` exceeds the cap (the budget is spent).
    """

    def fits(sigma: float) -> bool:
        return epsilon([*history, (sigma, sample_rate, steps)], delta, name) <= cap

    if not fits(SIGMA_MAX):
        return None
    lo, hi = SIGMA_MIN, SIGMA_MAX
    if fits(lo):
        return lo
    while hi - lo > tolerance * lo:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi
