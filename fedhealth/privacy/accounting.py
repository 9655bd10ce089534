"""Glue over Opacus's accountants: epsilon of a recorded history, and noise planning.

A history is the list of ``(noise_multiplier, sample_rate, steps)`` DP-SGD phases a site has
run, exactly Opacus's ``accountant.history``. Nothing here implements an accountant: RDP
(Mironov 2017; Balle et al. 2020 conversion) and PRV (Gopi et al. 2021) are Opacus's.
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
    if name not in ACCOUNTANTS:
        raise ConfigError(f"privacy.accountant={name!r}: choose one of {sorted(ACCOUNTANTS)}")
    acc = ACCOUNTANTS[name]()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return acc


def epsilon(history: Sequence[Phase], delta: float, name: str = "rdp") -> float:
    """Epsilon spent by ``history`` at ``delta`` (0 for an empty history)."""
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
    """Smallest noise multiplier whose ``steps`` more steps keep epsilon within ``cap``.

    Bisection over Opacus's accountant with the site's past history included; ``None`` when
    even :data:`SIGMA_MAX` would exceed the cap (the budget is spent).
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
