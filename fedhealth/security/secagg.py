"""Secure aggregation: the SecAgg+ protocol's four stages, as site and coordinator state machines.

Implements SecAgg+ (Bell et al. 2020, https://eprint.iacr.org/2020/704), which builds on SecAgg
(Bonawitz et al. 2017, https://eprint.iacr.org/2017/281): every site masks its quantized,
example-weighted update with a self mask and with pairwise masks shared with its neighbours in a
k-regular graph, so the coordinator learns only the sum. Secrets are Shamir-shared among the
neighbours so the sum can still be unmasked when sites drop, as long as at least ``threshold`` of
each dropped site's neighbours survive.

The primitives are libraries': X25519 key agreement, HKDF-SHA256 and ChaCha20-Poly1305 from
``cryptography``; masks are ChaCha20 keystreams keyed by the full 32-byte derived key (not a
32-bit seed); Shamir sharing (Shamir 1979, https://doi.org/10.1145/359168.359176) from
Flower's secure-aggregation helpers. Quantization is stochastic rounding onto a public grid
(:func:`quantize`).

The state machines exchange plain bytes and integer arrays only: the Flower workflow carries them
in ConfigRecords and ArrayRecords, never as pickles.

Stages (site ``SecAggSite`` / coordinator ``SecAggServer``):
0. setup: the coordinator picks the participants, the graph and the parameters;
1. advertise: each site sends two X25519 public keys (share encryption, masking);
2. share keys: each site Shamir-shares its self-mask seed and its masking private key among its
   neighbours, each share encrypted for its recipient; the coordinator only routes ciphertexts;
3. masked input: each site sends ``quantize(w_i * x_i / W) + PRG(b_i) +- PRG(s_ij) mod 2^32`` plus
   its example count; sites that shared keys but send nothing now count as dropped;
4. unmask: each survivor reveals, per neighbour, the self-mask share of a survivor or the
   masking-key share of a dropped site, never both for one site.

The parameters, graph and primitives live in :mod:`fedhealth.security.secagg_primitives`, the
coordinator's side in :mod:`fedhealth.security.secagg_server`; every public name is importable
from here.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from flwr.app.typing import ConfigRecordValues
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from numpy.typing import NDArray

from fedhealth.errors import SecAggError
from fedhealth.security.secagg_primitives import (
    MASK_CHUNK,
    MODULUS_BITS,
    SecAggParams,
    agree,
    apply_mask,
    auto_degree,
    dequantize_sum,
    derive_key,
    neighbour_graph,
    pair_info,
    prg,
    quantize,
)
from fedhealth.security.secagg_server import SecAggServer

__all__ = [
    "MODULUS_BITS",
    "SecAggError",
    "SecAggParams",
    "SecAggServer",
    "SecAggSite",
    "agree",
    "dequantize_sum",
    "derive_key",
    "auto_degree",
    "neighbour_graph",
    "pair_info",
    "prg",
    "quantize",
]

_RAW = serialization.Encoding.Raw


@dataclass
class SecAggSite:
    """One site's side of the protocol for one round.

    A site is built at stage 1 and, between stages, kept as :meth:`to_state` in the
    SuperNode's ``context.state`` (it never leaves the site).

    Parameters
    ----------
    site_id : int
        This site's id in the round.
    params : SecAggParams
        The round's public parameters.
    neighbours : list of int
        This site's neighbours in the masking graph.

    Notes
    -----
    The remaining fields are the site's secrets, generated fresh for each round (two X25519
    keys, for share encryption and masking, and a 32-byte self-mask seed from ``os.urandom``),
    and what the stages receive. Callers pass only the three above; :meth:`from_state`
    restores the rest.
    """

    site_id: int
    params: SecAggParams
    neighbours: list[int]
    _c: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    _s: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    _seed: bytes = field(default_factory=lambda: os.urandom(32))
    _publics: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    _received: dict[int, bytes] = field(default_factory=dict)
    _revealed: dict[int, str] = field(default_factory=dict)

    def to_state(self) -> dict[str, ConfigRecordValues]:
        """Export the site as plain values for its Flower ``context.state``.

        The state holds the site's private keys and seed: it must never leave the site.

        Returns
        -------
        dict of str to ConfigRecordValues
            Ints, floats, bytes and lists of them, accepted by a ``ConfigRecord``.
        """
        raw = serialization.PrivateFormat.Raw
        return {
            "site-id": self.site_id,
            "neighbours": list(self.neighbours),
            "threshold": self.params.threshold,
            "clip": self.params.clipping_range,
            "levels": self.params.quantization_levels,
            "max-examples": self.params.max_examples,
            "c": self._c.private_bytes(_RAW, raw, serialization.NoEncryption()),
            "s": self._s.private_bytes(_RAW, raw, serialization.NoEncryption()),
            "seed": self._seed,
            "pub-ids": list(self._publics),
            "pub-c": [v[0] for v in self._publics.values()],
            "pub-s": [v[1] for v in self._publics.values()],
            "rx-ids": list(self._received),
            "rx": list(self._received.values()),
            "rev-ids": list(self._revealed),
            "rev": list(self._revealed.values()),
        }

    @classmethod
    def from_state(cls, st: Mapping[str, Any]) -> SecAggSite:
        """Rebuild a site from :meth:`to_state`'s values.

        Parameters
        ----------
        st : mapping of str to Any
            The values :meth:`to_state` returned (as read back from ``context.state``).

        Returns
        -------
        SecAggSite
            The site, secrets and protocol state included.

        Raises
        ------
        KeyError
            If a key is missing.
        ValueError
            If a key is malformed or paired lists differ in length.
        """
        params = SecAggParams(
            int(st["threshold"]), float(st["clip"]), int(st["levels"]), int(st["max-examples"])
        )
        site = cls(
            int(st["site-id"]),
            params,
            [int(n) for n in st["neighbours"]],
            X25519PrivateKey.from_private_bytes(st["c"]),
            X25519PrivateKey.from_private_bytes(st["s"]),
            bytes(st["seed"]),
        )
        site._publics = {
            int(i): (c, s) for i, c, s in zip(st["pub-ids"], st["pub-c"], st["pub-s"], strict=True)
        }
        site._received = {int(i): b for i, b in zip(st["rx-ids"], st["rx"], strict=True)}
        site._revealed = {int(i): k for i, k in zip(st["rev-ids"], st["rev"], strict=True)}
        return site

    @property
    def heard_from(self) -> frozenset[int]:
        """Return the sites whose shares this site holds (itself included, after stage 3).

        The only survivors a site can vouch for: an id the coordinator lists as a survivor
        that never shared with this site may be made up.
        """
        return frozenset(self._received)

    def advertise(self) -> tuple[bytes, bytes]:
        """Stage 1: give the site's two public keys.

        Returns
        -------
        tuple of (bytes, bytes)
            Raw 32-byte X25519 public keys: (share encryption, masking).
        """
        return (
            self._c.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw),
            self._s.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw),
        )

    def share_keys(self, publics: dict[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Stage 2: Shamir-share the self-mask seed and masking key among the neighbours.

        Neighbours absent from ``publics`` are dropped from this site's graph. Each holder's
        pair of shares is encrypted for it with ChaCha20-Poly1305 (RFC 8439) under a key
        agreed with its encryption public key, the two ids as associated data.

        Parameters
        ----------
        publics : dict of int to (bytes, bytes)
            Site -> its advertised (encryption, masking) public keys; this site included.

        Returns
        -------
        dict of int to bytes
            Recipient (each neighbour, and this site itself) -> 12-byte nonce + ciphertext.

        Raises
        ------
        SecAggError
            If this site is missing from ``publics``, fewer than ``threshold - 1``
            neighbours advertised, or two sites advertised the same encryption key.
        """
        # Neighbours that did not advertise dropped before any secret was shared: no pairwise
        # mask with them; the round goes on while threshold holders remain.
        self.neighbours = [j for j in self.neighbours if j in publics]
        if self.site_id not in publics or len(self.neighbours) + 1 < self.params.threshold:
            raise SecAggError(
                f"site {self.site_id}: {len(self.neighbours)} neighbour(s) advertised "
                f"keys, fewer than the threshold {self.params.threshold} - 1"
            )
        if len({c for c, _ in publics.values()}) != len(publics):
            raise SecAggError(f"site {self.site_id}: duplicate public keys advertised")
        self._publics = dict(publics)
        holders = sorted([self.site_id, *self.neighbours])
        s_raw = self._s.private_bytes(
            _RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        seed_shares = create_shares(self._seed, self.params.threshold, len(holders))
        key_shares = create_shares(s_raw, self.params.threshold, len(holders))
        out = {}
        for holder, b_share, s_share in zip(holders, seed_shares, key_shares, strict=True):
            plaintext = struct.pack("<QQHH", self.site_id, holder, len(b_share), len(s_share))
            out[holder] = self._seal(holder, plaintext + b_share + s_share)
        return out

    def _aead(self, peer: int) -> ChaCha20Poly1305:
        return ChaCha20Poly1305(
            agree(self._c, self._publics[peer][0], pair_info(self.site_id, peer, b"enc"))
        )

    def _seal(self, peer: int, plaintext: bytes) -> bytes:
        nonce = os.urandom(12)
        aad = struct.pack("<QQ", self.site_id, peer)
        return nonce + self._aead(peer).encrypt(nonce, plaintext, aad)

    def masked_input(
        self,
        update: NDArray[Any],
        weight: int,
        received: dict[int, bytes],
        rng: np.random.Generator | None = None,
    ) -> NDArray[np.uint32]:
        """Stage 3: mask the quantized, weighted update, the example count as last word.

        The vector is ``quantize(update) || weight`` plus the self mask ``PRG(seed)`` plus,
        for each neighbour ``j`` that shared with this site, ``+PRG(s_ij)`` if this id is
        smaller than ``j`` and ``-PRG(s_ij)`` otherwise, all modulo 2^32.

        Parameters
        ----------
        update : numpy.ndarray
            The site's update, any shape (flattened here).
        weight : int
            The site's example count, in [1, max_examples].
        received : dict of int to bytes
            Sender -> the encrypted shares routed to this site in stage 2.
        rng : numpy.random.Generator or None, default None
            Source of the quantization's rounding draws; None uses a fresh OS-seeded one.

        Returns
        -------
        numpy.ndarray of uint32, shape (update.size + 1,)
            The masked input.

        Raises
        ------
        SecAggError
            If ``weight`` is not an int in [1, max_examples], or ``update`` has NaN or
            infinite values.
        """
        if not isinstance(weight, int) or not 1 <= weight <= self.params.max_examples:
            raise SecAggError(f"site {self.site_id}: example count {weight} out of bounds")
        if not np.isfinite(update).all():
            raise SecAggError(f"site {self.site_id}: update has NaN or infinite values")
        self._received = dict(received)
        flat = update.ravel()
        rng = rng or np.random.default_rng()
        masked = np.empty(flat.size + 1, dtype=np.uint32)
        # quantised block by block (the rounding draws continue one stream), then each mask
        # applied in place block by block: no full-size temporaries for a 30M-value model
        for start in range(0, flat.size, MASK_CHUNK):
            block = flat[start : start + MASK_CHUNK]
            masked[start : start + block.size] = quantize(block, weight, self.params, rng)
        masked[-1] = weight
        apply_mask(masked, self._seed, +1)
        for j in self.neighbours:
            if j not in received:  # j dropped before sharing its secrets: no mask with it
                continue
            pair = agree(self._s, self._publics[j][1], pair_info(self.site_id, j, b"mask"))
            apply_mask(masked, pair, +1 if self.site_id < j else -1)
        return masked

    def unmask(self, survivors: list[int], dropped: list[int]) -> dict[int, bytes]:
        """Stage 4: reveal the seed share of each survivor, the key share of each dropped site.

        Only shares this site received from itself or a neighbour are revealed; once a site's
        seed share (or key share) is revealed, its other share never is.

        Parameters
        ----------
        survivors : list of int
            Sites whose masked input the coordinator received.
        dropped : list of int
            Sites that shared keys but sent no masked input.

        Returns
        -------
        dict of int to bytes
            Owner -> its share held by this site.

        Raises
        ------
        SecAggError
            If a site is in both lists, there are fewer survivors than ``threshold``, the other
            share of a site was revealed before, or a share fails authentication or is
            addressed to another site.
        """
        if set(survivors) & set(dropped):
            raise SecAggError(
                f"site {self.site_id}: asked to reveal both shares of "
                f"{sorted(set(survivors) & set(dropped))}"
            )
        if len(survivors) < self.params.threshold:
            raise SecAggError(
                f"site {self.site_id}: {len(survivors)} survivors < threshold "
                f"{self.params.threshold}; refusing to reveal anything"
            )
        out = {}
        for src in sorted(set(survivors) | set(dropped)):
            if src not in self._received or (src != self.site_id and src not in self.neighbours):
                continue
            kind = "seed" if src in survivors else "key"
            if self._revealed.setdefault(src, kind) != kind:
                raise SecAggError(f"site {self.site_id}: already revealed the other share of {src}")
            out[src] = self._open(src, kind)
        return out

    def _open(self, src: int, kind: str) -> bytes:
        blob = self._received[src]
        aad = struct.pack("<QQ", src, self.site_id)
        try:
            plaintext = self._aead(src).decrypt(blob[:12], blob[12:], aad)
        except Exception as exc:  # cryptography raises InvalidTag
            raise SecAggError(
                f"site {self.site_id}: share from {src} fails authentication"
            ) from exc
        sender, holder, nb, ns = struct.unpack("<QQHH", plaintext[:20])
        if (sender, holder) != (src, self.site_id):
            raise SecAggError(f"site {self.site_id}: share from {src} is addressed wrongly")
        body = plaintext[20:]
        return body[:nb] if kind == "seed" else body[nb : nb + ns]
