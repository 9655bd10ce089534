"""The coordinator's side of SecAgg+: it routes ciphertexts and learns only the unmasked sum.

SecAgg+ (Bell et al. 2020, https://eprint.iacr.org/2020/704); the stages are described in
:mod:`fedhealth.security.secagg`, whence this class is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from numpy.typing import NDArray

from fedhealth.errors import SecAggError
from fedhealth.security.secagg_primitives import (
    SecAggParams,
    agree,
    apply_mask,
    dequantize_sum,
    pair_info,
)


@dataclass
class SecAggServer:
    """The coordinator's side of one round: routes ciphertexts, learns only the unmasked sum.

    The caller fills ``publics`` (stage 1), ``shared`` (stage 2) and ``masked`` (stage 3) from
    the sites' replies, then calls :meth:`route`, :meth:`survivors_and_dropped` and
    :meth:`aggregate`.

    Parameters
    ----------
    params : SecAggParams
        The round's public parameters.
    graph : dict of int to list of int
        The masking graph (:func:`~fedhealth.security.secagg.neighbour_graph`).
    publics : dict of int to (bytes, bytes), default {}
        Site -> its advertised (encryption, masking) X25519 public keys.
    shared : dict of int to dict of int to bytes, default {}
        Sender -> (recipient -> encrypted shares).
    masked : dict of int to numpy.ndarray of uint32, default {}
        Site -> its masked input.
    """

    params: SecAggParams
    graph: dict[int, list[int]]
    publics: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    shared: dict[int, dict[int, bytes]] = field(default_factory=dict)
    masked: dict[int, NDArray[np.uint32]] = field(default_factory=dict)

    def route(self) -> dict[int, dict[int, bytes]]:
        """Route stage 2's ciphertexts: each recipient gets those addressed to it, by sender.

        Returns
        -------
        dict of int to dict of int to bytes
            Recipient -> (sender -> ciphertext), for every site that sent shares.
        """
        inbox: dict[int, dict[int, bytes]] = {i: {} for i in self.shared}
        for src, boxes in self.shared.items():
            for dst, blob in boxes.items():
                if dst in inbox:
                    inbox[dst][src] = blob
        return inbox

    def survivors_and_dropped(self) -> tuple[list[int], list[int]]:
        """Split the sites that shared keys into those that sent masked input and the rest.

        Returns
        -------
        survivors : list of int
            Sites that sent masked input, sorted.
        dropped : list of int
            Sites that shared keys but sent no masked input, sorted.

        Raises
        ------
        SecAggError
            If fewer than ``threshold`` sites sent masked input.
        """
        survivors = sorted(self.masked)
        dropped = sorted(set(self.shared) - set(self.masked))
        if len(survivors) < self.params.threshold:
            raise SecAggError(
                f"{len(survivors)} site(s) sent masked input, fewer than the "
                f"threshold {self.params.threshold}: the round cannot be unmasked"
            )
        return survivors, dropped

    def aggregate(
        self,
        reveals: dict[int, dict[int, bytes]],
        dtype: type[np.floating[Any]] = np.float64,
    ) -> tuple[NDArray[np.floating[Any]], int]:
        """Unmask the sum from the survivors' reveals.

        Survivors' self masks are rebuilt from their seed shares and removed; dropped sites'
        masking keys are rebuilt from their key shares and the pairwise masks they shared with
        survivors removed (Shamir 1979, via Flower's ``combine_shares``).

        Parameters
        ----------
        reveals : dict of int to dict of int to bytes
            Revealing site -> (owner -> share), from stage 4.
        dtype : numpy floating type, default numpy.float64
            The mean's dtype (computed in float64 either way, block by block).

        Returns
        -------
        mean : numpy.ndarray of ``dtype``, shape (n,)
            The example-weighted mean update, ``n`` the masked length minus one.
        count_sum : int
            The survivors' total example count.

        Raises
        ------
        SecAggError
            If fewer than ``threshold`` sites sent masked input or reveals, the masked inputs
            differ in length, a secret has fewer than ``threshold`` shares or its shares do not
            combine, or the unmasked example count is out of bounds.
        """
        survivors, dropped = self.survivors_and_dropped()
        if len(reveals) < self.params.threshold:
            raise SecAggError(
                f"{len(reveals)} unmasking replies < threshold {self.params.threshold}"
            )
        lengths = {v.size for v in self.masked.values()}
        if len(lengths) != 1:
            raise SecAggError(f"masked inputs differ in length: {sorted(lengths)}")
        length = lengths.pop()
        total = np.zeros(length, dtype=np.uint32)
        for vector in self.masked.values():
            total += vector  # in place: a 30M-value model is 120 MB a copy
        for i in survivors:
            apply_mask(total, self._rebuild(i, reveals), -1)
        for j in dropped:
            s_j = X25519PrivateKey.from_private_bytes(self._rebuild(j, reveals))
            for i in self.graph[j]:
                if i in survivors and i in self.shared[j]:  # i masked with j: j shared to i
                    pair = agree(s_j, self.publics[i][1], pair_info(i, j, b"mask"))
                    # survivor i added +pair if i < j else -pair; remove it
                    apply_mask(total, pair, -1 if i < j else +1)
        count_sum = int(total[-1])
        if not 1 <= count_sum <= self.params.max_examples * len(survivors):
            raise SecAggError(f"unmasked example count {count_sum} is out of bounds")
        return dequantize_sum(total[:-1], count_sum, len(survivors), self.params, dtype), count_sum

    def _rebuild(self, owner: int, reveals: dict[int, dict[int, bytes]]) -> bytes:
        shares = [r[owner] for r in reveals.values() if owner in r]
        if len(shares) < self.params.threshold:
            raise SecAggError(
                f"only {len(shares)} share(s) of site {owner}'s secret, "
                f"threshold {self.params.threshold}"
            )
        try:
            return combine_shares(shares[: self.params.threshold])
        except ValueError as exc:
            raise SecAggError(f"shares of site {owner}'s secret do not combine") from exc
