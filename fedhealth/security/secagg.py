"""Secure aggregation: the SecAgg+ protocol's four stages, as site and coordinator state machines.

Implements SecAgg+ (Bell et al. 2020, https://eprint.iacr.org/2020/704), which builds on SecAgg
(Bonawitz et al. 2017, https://eprint.iacr.org/2017/281): every site masks its quantized,
example-weighted update with a self mask and with pairwise masks shared with its neighbours in a
k-regular graph, so the coordinator learns only the sum. Secrets are Shamir-shared among the
neighbours so the sum can still be unmasked when sites drop, as long as at least ``threshold`` of
each dropped site's neighbours survive.

The primitives are libraries': X25519 key agreement, HKDF-SHA256 and ChaCha20-Poly1305 from
``cryptography``; masks are ChaCha20 keystreams keyed by the full 32-byte derived key (not a
32-bit seed); Shamir sharing and quantization from Flower's secure-aggregation helpers.

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
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

from fedhealth.errors import SecAggError

MODULUS_BITS = 32
_RAW = serialization.Encoding.Raw


@dataclass(frozen=True)
class SecAggParams:
    """Public parameters of one secure-aggregation round.

    Parameters
    ----------
    threshold : int, Shamir threshold t: shares needed to rebuild a secret; also the minimum
        number of surviving neighbours of every site.
    clipping_range : float, default 8.0: each coordinate of a site's weighted update is clipped
        to [-clipping_range, clipping_range] before quantization.
    quantization_levels : int, default 2**20: levels per site in that range
        (:meth:`sized` picks the most that cannot wrap for a given number of sites).
    max_examples : int, default 1024: public bound on a site's example count; updates are
        scaled by ``count / max_examples`` before masking, so weighted FedAvg survives masking.
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
        """The finest quantization whose sum over ``participants`` cannot wrap mod 2^32."""
        levels = 1 << 30
        while participants * (levels + 1 + max_examples) >= 1 << MODULUS_BITS:
            levels >>= 1
        params = cls(threshold, clipping_range, levels, max_examples)
        params.check(participants)
        return params

    def check(self, participants: int) -> None:
        if not 2 <= self.threshold <= participants:
            raise SecAggError(f"threshold {self.threshold} must be in [2, {participants}]")
        if participants * (self.quantization_levels + 1 + self.max_examples) >= 1 << MODULUS_BITS:
            raise SecAggError("quantization_levels too large: the sum would wrap modulo 2^32")


def neighbour_graph(ids: list[int], degree: int | None = None) -> dict[int, list[int]]:
    """A k-regular ring graph (Harary): each site's ``degree`` nearest ids; None = complete."""
    ordered = sorted(ids)
    n = len(ordered)
    if degree is None or degree >= n - 1:
        return {i: [j for j in ordered if j != i] for i in ordered}
    half = max(1, degree // 2)
    graph = {}
    for pos, i in enumerate(ordered):
        graph[i] = sorted({ordered[(pos + d) % n] for d in range(-half, half + 1) if d})
    return graph


def _derive(shared: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def _agree(private: X25519PrivateKey, public: bytes, info: bytes) -> bytes:
    return _derive(private.exchange(X25519PublicKey.from_public_bytes(public)), info)


def prg(key: bytes, length: int) -> np.ndarray:
    """``length`` uint32 mask words: the ChaCha20 keystream under the full 32-byte key."""
    encryptor = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()
    stream = encryptor.update(b"\x00" * (4 * length))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)


def _pair_info(i: int, j: int, kind: bytes) -> bytes:
    lo, hi = sorted((i, j))
    return b"fedhealth-secagg/" + kind + struct.pack("<QQ", lo, hi)


def quantize(
    update: np.ndarray, weight: int, params: SecAggParams, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Scale by ``weight / max_examples``, clip, quantize (stochastic rounding) to uint32."""
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
    total: np.ndarray, count_sum: int, survivors: int, params: SecAggParams
) -> np.ndarray:
    """From the unmasked integer sum to the weighted mean ``sum_i w_i x_i / sum_i w_i``."""
    scaled_sum = total.astype(np.float64) * (2 * params.clipping_range / params.quantization_levels)
    scaled_sum -= survivors * params.clipping_range
    return scaled_sum * (params.max_examples / count_sum)


@dataclass
class SecAggSite:
    """One site's side of the protocol for one round."""

    site_id: int
    params: SecAggParams
    neighbours: list[int]
    _c: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    _s: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    _seed: bytes = field(default_factory=lambda: os.urandom(32))
    _publics: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    _received: dict[int, bytes] = field(default_factory=dict)
    _revealed: dict[int, str] = field(default_factory=dict)

    def to_state(self) -> dict:
        """Plain values for the site's Flower ``context.state`` (it never leaves the site)."""
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
    def from_state(cls, st: dict) -> SecAggSite:
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
        site._publics = {int(i): (c, s) for i, c, s in zip(st["pub-ids"], st["pub-c"], st["pub-s"])}
        site._received = {int(i): b for i, b in zip(st["rx-ids"], st["rx"])}
        site._revealed = {int(i): k for i, k in zip(st["rev-ids"], st["rev"])}
        return site

    # stage 1
    def advertise(self) -> tuple[bytes, bytes]:
        return (
            self._c.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw),
            self._s.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw),
        )

    # stage 2
    def share_keys(self, publics: dict[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Encrypted shares for each neighbour (and one for itself), keyed by recipient."""
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
            _agree(self._c, self._publics[peer][0], _pair_info(self.site_id, peer, b"enc"))
        )

    def _seal(self, peer: int, plaintext: bytes) -> bytes:
        nonce = os.urandom(12)
        aad = struct.pack("<QQ", self.site_id, peer)
        return nonce + self._aead(peer).encrypt(nonce, plaintext, aad)

    # stage 3
    def masked_input(
        self,
        update: np.ndarray,
        weight: int,
        received: dict[int, bytes],
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """The masked, quantized, weighted update with the example count as last word."""
        if not isinstance(weight, int) or not 1 <= weight <= self.params.max_examples:
            raise SecAggError(f"site {self.site_id}: example count {weight} out of bounds")
        if not np.isfinite(update).all():
            raise SecAggError(f"site {self.site_id}: update has NaN or infinite values")
        self._received = dict(received)
        vector = np.concatenate(
            [
                quantize(update.ravel(), weight, self.params, rng),
                np.array([weight], dtype=np.uint32),
            ]
        )
        masked = vector + prg(self._seed, vector.size)
        for j in self.neighbours:
            if j not in received:  # j dropped before sharing its secrets: no mask with it
                continue
            pair = prg(
                _agree(self._s, self._publics[j][1], _pair_info(self.site_id, j, b"mask")),
                vector.size,
            )
            masked = masked + pair if self.site_id < j else masked - pair
        return masked.astype(np.uint32)

    # stage 4
    def unmask(self, survivors: list[int], dropped: list[int]) -> dict[int, bytes]:
        """Per neighbour: the seed share of a survivor, the masking-key share of a dropped site."""
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


@dataclass
class SecAggServer:
    """The coordinator's side: routes ciphertexts, learns only the unmasked sum."""

    params: SecAggParams
    graph: dict[int, list[int]]
    publics: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    shared: dict[int, dict[int, bytes]] = field(default_factory=dict)
    masked: dict[int, np.ndarray] = field(default_factory=dict)

    def route(self) -> dict[int, dict[int, bytes]]:
        """Stage 2 -> 3: each recipient gets the ciphertexts addressed to it, by sender."""
        inbox: dict[int, dict[int, bytes]] = {i: {} for i in self.shared}
        for src, boxes in self.shared.items():
            for dst, blob in boxes.items():
                if dst in inbox:
                    inbox[dst][src] = blob
        return inbox

    def survivors_and_dropped(self) -> tuple[list[int], list[int]]:
        survivors = sorted(self.masked)
        dropped = sorted(set(self.shared) - set(self.masked))
        if len(survivors) < self.params.threshold:
            raise SecAggError(
                f"{len(survivors)} site(s) sent masked input, fewer than the "
                f"threshold {self.params.threshold}: the round cannot be unmasked"
            )
        return survivors, dropped

    def aggregate(self, reveals: dict[int, dict[int, bytes]]) -> tuple[np.ndarray, int]:
        """Unmask the sum from the survivors' reveals; returns (weighted mean, example sum)."""
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
            total = total + vector
        for i in survivors:
            seed = self._rebuild(i, reveals)
            total = total - prg(seed, length)
        for j in dropped:
            s_j = X25519PrivateKey.from_private_bytes(self._rebuild(j, reveals))
            for i in self.graph[j]:
                if i in survivors and i in self.shared[j]:  # i masked with j: j shared to i
                    pair = prg(_agree(s_j, self.publics[i][1], _pair_info(i, j, b"mask")), length)
                    # survivor i added +pair if i < j else -pair; remove it
                    total = total - pair if i < j else total + pair
        total = total.astype(np.uint32)
        count_sum = int(total[-1])
        if not 1 <= count_sum <= self.params.max_examples * len(survivors):
            raise SecAggError(f"unmasked example count {count_sum} is out of bounds")
        return dequantize_sum(total[:-1], count_sum, len(survivors), self.params), count_sum

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
