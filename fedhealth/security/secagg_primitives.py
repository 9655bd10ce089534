"""SecAgg+ building blocks: round parameters, the masking graph, key agreement, PRG, quantization.

The protocol that uses them is in :mod:`fedhealth.security.secagg` (SecAgg+, Bell et al. 2020,
https://eprint.iacr.org/2020/704); import these names from there. The primitives are the
``cryptography`` package's: X25519 key agreement, HKDF-SHA256 and the ChaCha20 stream cipher.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

from fedhealth.errors import SecAggError

MODULUS_BITS = 32
"""Masked vectors are summed modulo ``2 ** MODULUS_BITS`` (uint32 arithmetic)."""


@dataclass(frozen=True)
class SecAggParams:
    """Public parameters of one secure-aggregation round.

    Parameters
    ----------
    threshold : int
        Shamir threshold t: shares needed to rebuild a secret; also the minimum number of
        surviving neighbours of every site.
    clipping_range : float, default 8.0
        Each coordinate of a site's weighted update is clipped to
        [-clipping_range, clipping_range] before quantization.
    quantization_levels : int, default 2**20
        Levels per site in that range (:meth:`sized` picks the most that cannot wrap for a
        given number of sites).
    max_examples : int, default 1024
        Public bound on a site's example count; updates are scaled by
        ``count / max_examples`` before masking, so weighted FedAvg survives masking.
    """

    threshold: int
    clipping_range: float = 8.0
    quantization_levels: int = 1 << 20
    max_examples: int = 1024

    @classmethod
    def sized(
        cls,
        participants: int,
        threshold: int,
        clipping_range: float = 8.0,
        max_examples: int = 1024,
    ) -> SecAggParams:
        """Build the parameters with the finest quantization whose sum cannot wrap mod 2^32.

        Starting from 2^30, the levels are halved until ``participants`` times
        ``(levels + 1 + max_examples)`` is below 2^32.

        Parameters
        ----------
        participants : int
            Sites in the round.
        threshold : int
            Shamir threshold, in [2, participants].
        clipping_range : float, default 8.0
            See the class.
        max_examples : int, default 1024
            See the class.

        Returns
        -------
        SecAggParams
            The checked parameters.

        Raises
        ------
        SecAggError
            As :meth:`check`.
        """
        levels = 1 << 30
        while participants * (levels + 1 + max_examples) >= 1 << MODULUS_BITS:
            levels >>= 1
        params = cls(threshold, clipping_range, levels, max_examples)
        params.check(participants)
        return params

    def check(self, participants: int) -> None:
        """Check the parameters for a round of ``participants`` sites.

        Parameters
        ----------
        participants : int
            Sites in the round.

        Raises
        ------
        SecAggError
            If ``threshold`` is not in [2, participants], or the sum of ``participants``
            quantized updates and example counts could wrap modulo 2^32.
        """
        if not 2 <= self.threshold <= participants:
            raise SecAggError(f"threshold {self.threshold} must be in [2, {participants}]")
        if participants * (self.quantization_levels + 1 + self.max_examples) >= 1 << MODULUS_BITS:
            raise SecAggError("quantization_levels too large: the sum would wrap modulo 2^32")


def auto_degree(n: int) -> int:
    """SecAgg+'s logarithmic neighbourhood: ``2 * ceil(log2 n)`` neighbours, at most ``n - 1``.

    Bell et al. 2020 (https://arxiv.org/abs/2009.08043) show that a random-looking graph of
    degree O(log n) keeps the masks secure and the sum recoverable under dropouts, so a site's
    key agreements, shares and mask expansions stay near constant as the federation grows.

    Parameters
    ----------
    n : int
        Sites in the round (>= 1).

    Returns
    -------
    int
        The degree: ``n - 1`` (every other site) up to 7 sites, 8 at 10, 14 at 100, 20 at
        1,000.
    """
    return max(1, min(n - 1, 2 * math.ceil(math.log2(max(n, 2)))))


def neighbour_graph(ids: list[int], degree: int | None = None) -> dict[int, list[int]]:
    """Build the masking graph: a ring (Harary) graph over the sorted ids.

    Each site is joined to its ``max(1, degree // 2)`` nearest ids on either side of the
    ring, so an odd ``degree`` is rounded down (to at least 2).

    Parameters
    ----------
    ids : list of int
        The round's site ids.
    degree : int or None, default None
        Neighbours per site; None, or at least ``len(ids) - 1``, gives the complete graph.

    Returns
    -------
    dict of int to list of int
        Site id -> its neighbours' ids, sorted, itself excluded.
    """
    ordered = sorted(ids)
    n = len(ordered)
    if degree is None or degree >= n - 1:
        return {i: [j for j in ordered if j != i] for i in ordered}
    half = max(1, degree // 2)
    graph = {}
    for pos, i in enumerate(ordered):
        graph[i] = sorted({ordered[(pos + d) % n] for d in range(-half, half + 1) if d})
    return graph


def derive_key(shared: bytes, info: bytes) -> bytes:
    """Derive a 32-byte key from a shared secret with HKDF-SHA256 (RFC 5869, no salt).

    Parameters
    ----------
    shared : bytes
        The key-agreement output.
    info : bytes
        Context string binding the key to its use and its pair of sites.

    Returns
    -------
    bytes
        32 bytes.
    """
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def agree(private: X25519PrivateKey, public: bytes, info: bytes) -> bytes:
    """Agree on a 32-byte pairwise key: X25519 (RFC 7748), then :func:`derive_key`.

    Parameters
    ----------
    private : X25519PrivateKey
        This site's private key.
    public : bytes
        The peer's raw 32-byte X25519 public key.
    info : bytes
        Context string (see :func:`pair_info`).

    Returns
    -------
    bytes
        32 bytes, the same at both ends of the pair.

    Raises
    ------
    ValueError
        If ``public`` is not a valid X25519 public key.
    """
    return derive_key(private.exchange(X25519PublicKey.from_public_bytes(public)), info)


MASK_CHUNK: Final = 1 << 20
"""Words a mask is generated and applied in at a time (4 MB): a 30M-value model is masked in
cache-sized blocks instead of several 120 MB temporaries per mask."""


def keystream(key: bytes, length: int, chunk: int = MASK_CHUNK) -> Iterator[NDArray[np.uint32]]:
    """Yield :func:`prg`'s words in consecutive blocks of ``chunk`` (the last one shorter).

    ChaCha20 is a stream cipher: successive ``update`` calls continue one keystream, so the
    blocks joined are exactly ``prg(key, length)``.

    Parameters
    ----------
    key : bytes
        32 bytes.
    length : int
        Words in all.
    chunk : int, default MASK_CHUNK
        Words per block, >= 1.

    Yields
    ------
    numpy.ndarray of uint32, shape (min(chunk, words left),)
        Read-only.
    """
    encryptor = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()
    zeros = bytes(4 * min(chunk, length))
    for start in range(0, length, chunk):
        words = min(chunk, length - start)
        yield np.frombuffer(encryptor.update(zeros[: 4 * words]), dtype="<u4")


def apply_mask(vector: NDArray[np.uint32], key: bytes, sign: int) -> None:
    """Add (``sign`` +1) or subtract (-1) ``prg(key, vector.size)`` in place, modulo 2^32.

    Parameters
    ----------
    vector : numpy.ndarray of uint32, shape (n,)
        Masked or being masked; changed in place.
    key : bytes
        The mask's 32-byte seed.
    sign : int
        +1 or -1.
    """
    offset = 0
    for words in keystream(key, vector.size):
        block = vector[offset : offset + words.size]
        if sign > 0:
            block += words
        else:
            block -= words
        offset += words.size


def prg(key: bytes, length: int) -> NDArray[np.uint32]:
    """Expand a key into ``length`` uint32 mask words: the ChaCha20 keystream under the key.

    The full 32-byte key keys ChaCha20 (Bernstein 2008) with an all-zero 16-byte nonce and
    counter; the keystream is read as little-endian words.

    Parameters
    ----------
    key : bytes
        32 bytes.
    length : int
        Words to produce.

    Returns
    -------
    numpy.ndarray of uint32, shape (length,)
        The mask.
    """
    out = np.zeros(length, dtype=np.uint32)
    apply_mask(out, key, +1)
    return out


def pair_info(i: int, j: int, kind: bytes) -> bytes:
    """Build the HKDF context of the pair {i, j}: the same whichever site asks.

    Parameters
    ----------
    i, j : int
        The two site ids, in any order.
    kind : bytes
        The key's use: ``b"enc"`` (share encryption) or ``b"mask"`` (pairwise mask).

    Returns
    -------
    bytes
        ``b"fedhealth-secagg/" + kind`` followed by the smaller and larger id as little-endian
        uint64.
    """
    lo, hi = sorted((i, j))
    return b"fedhealth-secagg/" + kind + struct.pack("<QQ", lo, hi)


def quantize(
    update: NDArray[Any],
    weight: int,
    params: SecAggParams,
    rng: np.random.Generator | None = None,
) -> NDArray[np.uint32]:
    """Scale by ``weight / max_examples``, clip, quantize (stochastic rounding) to uint32.

    Values in [-clipping_range, clipping_range] map linearly onto [0, quantization_levels];
    each is rounded up with probability equal to its fractional part, so the rounding is
    unbiased.

    Parameters
    ----------
    update : numpy.ndarray
        The site's update, any shape.
    weight : int
        The site's example count.
    params : SecAggParams
        The round's parameters.
    rng : numpy.random.Generator or None, default None
        Source of the rounding draws; None uses a fresh OS-seeded generator.

    Returns
    -------
    numpy.ndarray of uint32, same shape as ``update``
        Values in [0, quantization_levels].
    """
    scaled = np.clip(
        update.astype(np.float64) * (weight / params.max_examples),
        -params.clipping_range,
        params.clipping_range,
    )
    levels = (scaled + params.clipping_range) * (
        params.quantization_levels / (2 * params.clipping_range)
    )
    floor = np.floor(levels)
    rng = rng or np.random.default_rng()
    rounded = floor + (rng.random(levels.shape) < (levels - floor))
    return rounded.astype(np.uint32)


def dequantize_sum(
    total: NDArray[np.uint32],
    count_sum: int,
    survivors: int,
    params: SecAggParams,
    dtype: type[np.floating[Any]] = np.float64,
) -> NDArray[np.floating[Any]]:
    """Turn the unmasked integer sum into the weighted mean ``sum_i w_i x_i / sum_i w_i``.

    Computed in float64 block by block (:data:`MASK_CHUNK` values at a time) and stored in
    ``dtype``: no full-size float64 temporaries for a 30M-value model.

    Parameters
    ----------
    total : numpy.ndarray of uint32, shape (n,)
        Sum of the survivors' quantized updates, masks removed.
    count_sum : int
        Sum of the survivors' example counts.
    survivors : int
        Number of sites in the sum.
    params : SecAggParams
        The round's parameters.
    dtype : numpy floating type, default numpy.float64
        The returned array's dtype (the coordinator asks for float32 for a packed model).

    Returns
    -------
    numpy.ndarray of ``dtype``, shape (n,)
        The example-weighted mean update (exact up to clipping and quantization, then rounded
        to ``dtype``).
    """
    out = np.empty(total.size, dtype=dtype)
    step = 2 * params.clipping_range / params.quantization_levels
    shift = survivors * params.clipping_range
    scale = params.max_examples / count_sum
    for start in range(0, total.size, MASK_CHUNK):
        block = total[start : start + MASK_CHUNK].astype(np.float64)
        block *= step
        block -= shift
        block *= scale
        out[start : start + block.size] = block
    return out
