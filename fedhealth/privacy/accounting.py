"""Glue over Opacus's accountants: epsilon of a recorded history, and noise planning.

A history is the list of ``(noise_multiplier, sample_rate, steps)`` DP-SGD phases a site has
run, exactly Opacus's ``accountant.history``. Nothing here implements an accountant: RDP
(Mironov 2017, https://arxiv.org/abs/1702.07476; the subsampled Gaussian of Mironov, Talwar and
Zhang 2019, https://arxiv.org/abs/1908.10530; the epsilon conversion of Balle et al. 2020,
https://arxiv.org/abs/1905.09982, Theorem 21) and PRV (Gopi, Lee and Wutschitz 2021,
https://arxiv.org/abs/2106.02848) are Opacus's.
"""

from __future__ import annotations

import warnings
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
    with warnings.catch_warnings():
        # Opacus warns when the best RDP order is its largest: the epsilon is then a valid upper
        # bound that more orders could only lower (dp-accounting recomputes it independently)
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
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


MAX_ROUNDS_LEFT = 10_000
"""The largest "rounds left" the report computes; more is shown as this number."""


def rounds_left(
    history: Sequence[Phase], last: Phase, cap: float, delta: float, accountant: str
) -> int:
    """Count how many more phases like ``last`` fit within ``cap``.

    ``k`` more phases are accounted as one phase of ``k`` times ``last``'s steps; ``k`` is
    found by exponential, then binary, search.

    Parameters
    ----------
    history : sequence of (float, float, int)
        The phases spent so far: (noise multiplier, sample rate, steps).
    last : (float, float, int)
        The phase to repeat.
    cap : float
        The epsilon cap.
    delta : float
        The delta epsilon is computed at.
    accountant : str
        ``"rdp"`` or ``"prv"``.

    Returns
    -------
    int
        The largest ``k`` with epsilon at most ``cap``, 0 if not even one fits, at most
        :data:`MAX_ROUNDS_LEFT`.
    """

    def fits(k: int) -> bool:
        return epsilon([*history, (last[0], last[1], last[2] * k)], delta, accountant) <= cap

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= MAX_ROUNDS_LEFT and fits(hi):
        lo, hi = hi, hi * 2
    if hi > MAX_ROUNDS_LEFT:
        return MAX_ROUNDS_LEFT
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
