"""Secure aggregation (SecAgg+: Bell et al., CCS 2020, after Bonawitz et al., CCS 2017), sans-IO.

The aggregator learns the sum of the owners' noised, quantized vectors and nothing else about
any one of them, even when owners drop out. No sockets, no asyncio, no torch: the node modules
move these messages; tests call the phases directly.

One round, between the owners of `Config.owners` and an aggregator that only relays:

1. **advertise**: each owner makes two fresh X25519 key pairs (c: to encrypt its shares, s: to
   agree pairwise masks) and sends the public halves. The aggregator relays the survivors' (U1)
   keys to all of them.
2. **share keys**: given the round's `Config` (the aggregator fixes it once it knows U1; the node
   first checks each neighbour's relayed keys with that neighbour, nodes/secure.py), each owner
   draws a self-mask seed b and Shamir-shares both b and its s secret
   key, t-of-k, among its neighbours in the round's sparse graph (SecAgg+: a Harary graph of even
   degree k on a permutation drawn from the round id), each share encrypted (ChaCha20-Poly1305)
   for its holder under their c agreement. The aggregator routes them; the senders are U2.
3. **masked input**: each owner clips (the node did), adds its share of the noise, quantizes to
   Z_{2^bits}, and adds PRG(b) and, for every neighbour v it exchanged shares with, +PRG(s_uv)
   if u < v and -PRG(s_uv) otherwise; it sends nothing when fewer than t neighbours are left
   (Bonawitz et al.'s check on U2: its self mask alone would not protect it). The senders are U3.
4. **unmask**: the aggregator names survivors (U3) and dropped (U2 minus U3). Each owner asks
   the named survivors directly which request they were told (the consistency check; nodes/
   secure.py), and answers only if a quorum q = floor((n + c) / 2) + 1 of the round's n owners,
   itself included, were told the very same one (c: the colluders the client's round resists,
   `Config.colluders`; each owner computes q itself). For each peer it holds shares of, it returns the share of the
   self-mask seed of a survivor, or of the mask key of a dropped peer: never both for one peer.
   It answers once per round, refuses a request that names a peer in both sets, leaves itself
   out, or has fewer survivors than the round's minimum m (then the sum would carry less noise
   than every owner was charged for; m is at least q, so up to n - q owners may drop out of
   the unmask phase).

The aggregator reconstructs each survivor's b and each dropped owner's s key from t shares,
removes those masks, and the pairwise masks between survivors cancel.

**Why a lying aggregator gets nothing**, with up to c colluding owners (they confirm any
request and hand over both shares they hold). Different stories for different owners (each
told that only it and v survived, or two halves told two stories) would get b_v from some of
v's neighbours and the neighbours' keys from others. The consistency check stops it: an honest
owner answers only a request that q owners confirm, and two requests confirmed by q each would
need 2q - c > n - c honest owners each told one of them (`Config.quorum`). Under the one story
answered, v is a survivor (honest holders give shares of b_v) or dropped (of its key), never
both; the other kind comes from the colluders alone, c < t. Nor can it strip v's pair masks
with its neighbours' keys: v masks with at least t of them, all named dropped for that, so
the holders of b_v are v's other k - t neighbours plus the colluders, and `Config` requires
t > (k + c) / 2, that is t > (k - t) + c. With more than c colluders none of this holds.

**Noise.** Each owner adds N(0, (sigma C)^2 / m) per coordinate, m = `min_survivors` (>= q); the sum of
at least m survivors carries at least N(0, (sigma C)^2), the noise the accountant charges each
owner for. Owners colluding with the aggregator can subtract their own shares (docs/PRIVACY.md).
"""

from __future__ import annotations

import hashlib
import math
import secrets
import struct
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from fedptr import limits
from fedptr.errors import DropoutError, InvalidArgumentError, PermissionDenied, ProtocolError

PRIME = 2**521 - 1
"""The Shamir field: a Mersenne prime above every 32-byte secret."""
SHARE_BYTES = 66
"""An element of the field, big-endian, as shares travel."""
SELF, KEY = "self", "key"
"""The two kinds of share an owner may reveal for a peer: its self-mask seed's, or its mask key's."""


@dataclass(frozen=True)
class Config:
    """One round, the same at every party (its digest binds the shares and masks to it)."""

    round_id: bytes
    owners: tuple[str, ...]
    dim: int
    threshold: int
    """t: shares that reconstruct a secret; more than half of `degree` plus `colluders`, since
    the aggregator gathers k - t honest shares of the kind it may not have, and the colluders
    give both kinds (0: the least such t)."""
    min_survivors: int
    """m: fewest owners whose inputs may be unmasked together; the noise is sized for m. Raised
    to the `quorum`: fewer survivors cannot confirm an unmask request."""
    clip: float
    noise_multiplier: float
    degree: int = 0
    """k: neighbours per owner; 0 means `limits.SECAGG_DEGREE`, or 3c + 1 (rounded up to even) if
    more, capped to the complete graph."""
    ring_bits: int = limits.SECAGG_RING_BITS
    colluders: int | None = None
    """c: owners that may collude with the aggregator (confirm any unmask request, hand over both
    shares they hold); None means `limits.secagg_default_colluders`. Sets the `quorum` and the
    least threshold."""

    def __post_init__(self) -> None:
        n = len(self.owners)
        if list(self.owners) != sorted(set(self.owners)) or n < 2:
            raise InvalidArgumentError("a secure aggregation round takes at least 2 distinct owners, sorted")
        if self.colluders is None:
            object.__setattr__(self, "colluders", limits.secagg_default_colluders(n))
        c = self.colluding
        if self.degree == 0:
            # a neighbourhood must outnumber the colluders enough to leave a threshold between
            # (k + c) / 2 and k some dropouts: at least 3c + 1, as Bonawitz et al.'s t > 2n/3
            k = max(limits.SECAGG_DEGREE, 3 * c + 1)
            object.__setattr__(self, "degree", min(n - 1, k + k % 2))
        if not (self.degree == n - 1 or (2 <= self.degree < n - 1 and self.degree % 2 == 0)):
            raise InvalidArgumentError(f"the neighbour degree must be even and below {n - 1}, or {n - 1}")
        if not 0 <= c < self.degree:
            raise InvalidArgumentError(f"the colluders must be at least 0 and fewer than the degree {self.degree}")
        if self.threshold == 0:
            object.__setattr__(self, "threshold", (self.degree + c) // 2 + 1)
        if not ((self.degree + c) // 2 < self.threshold <= self.degree):
            raise InvalidArgumentError(
                f"the threshold must be above half the degree {self.degree} plus the {c} colluders, and at most "
                "the degree"
            )
        if not (2 <= self.min_survivors <= n and self.dim >= 1 and 8 <= self.ring_bits <= 64):
            raise InvalidArgumentError("need 2 <= min_survivors <= owners, dim >= 1, 8 <= ring_bits <= 64")
        object.__setattr__(self, "min_survivors", max(self.min_survivors, self.quorum))
        if not (self.clip > 0 and self.noise_multiplier >= 0 and math.isfinite(self.clip * self.noise_multiplier)):
            raise InvalidArgumentError("need clip > 0 and a finite noise_multiplier >= 0")
        # an owner's clipped value plus its noise, and the quantization's reach, stay finite
        # (mechanisms.check_range's rule: a noise drawn past float64's range was an infinity)
        reach = len(self.owners) * self.clip + limits.DP_NOISE_SPAN * self.noise_multiplier * self.clip
        if not 2 * reach <= sys.float_info.max:
            raise InvalidArgumentError(f"the round's clip {self.clip:g} and noise could leave float64's finite range")

    @property
    def digest(self) -> bytes:
        """SHA-256 of every field: parties with different configs cannot read each other's shares."""
        fields = [self.round_id, *(o.encode() for o in self.owners)]
        numbers = struct.pack(
            "<4Q2d", self.dim, self.threshold, self.min_survivors, self.degree, self.clip, self.noise_multiplier
        ) + struct.pack("<2Q", self.ring_bits, self.colluding)
        return hashlib.sha256(b"\0".join(f.replace(b"\0", b"\0\0") for f in fields) + b"\1" + numbers).digest()

    @property
    def colluding(self) -> int:
        """c, resolved (`__post_init__` replaces None)."""
        assert self.colluders is not None, "resolved in __post_init__"
        return self.colluders

    @property
    def quorum(self) -> int:
        """q: the owners that must confirm an unmask request, floor((n + c) / 2) + 1. Two requests
        confirmed by q each would need 2q - c honest confirmers, told one request each, more than
        the n - c there are: so at most one request is answered, whatever the c colluders say."""
        return (len(self.owners) + self.colluding) // 2 + 1

    @property
    def noise_std(self) -> float:
        """Standard deviation of each owner's noise per coordinate: sigma C / sqrt(m)."""
        return self.noise_multiplier * self.clip / math.sqrt(self.min_survivors)

    @property
    def scale(self) -> float:
        """Quantization steps per unit: the sum of n clipped vectors (each coordinate at most C),
        their noise to `SECAGG_NOISE_TAIL` deviations and n rounding steps fit in bits - 1."""
        n = len(self.owners)
        reach = n * self.clip + limits.SECAGG_NOISE_TAIL * self.noise_std * math.sqrt(n)
        return ((1 << (self.ring_bits - 1)) - 1 - n) / reach

    def index(self, owner: str) -> int:
        """`owner`'s Shamir x-coordinate (1-based)."""
        return self.owners.index(owner) + 1

    def ring(self) -> list[str]:
        """The owners in the order of a hash of the round id: neighbours are near on it."""
        return sorted(self.owners, key=lambda o: hashlib.sha256(self.round_id + o.encode()).digest())

    def neighbours(self, owner: str) -> tuple[str, ...]:
        """`owner`'s k neighbours: k/2 on each side of it on a ring ordered by a hash of the round
        id (a Harary graph on a random permutation), or everyone in the complete graph."""
        n = len(self.owners)
        if self.degree == n - 1:
            return tuple(o for o in self.owners if o != owner)
        ring = self.ring()
        at = ring.index(owner)
        half = self.degree // 2
        return tuple(sorted(ring[(at + d) % n] for d in range(-half, half + 1) if d != 0))


@dataclass(frozen=True)
class PublicKeys:
    """An owner's two public keys of a round, raw 32 bytes each."""

    cipher: bytes
    mask: bytes


@dataclass(frozen=True)
class UnmaskRequest:
    """What the aggregator asks in the last phase: who survived (sent a masked input) and who
    dropped (sent shares, then no input)."""

    survivors: frozenset[str]
    dropped: frozenset[str]


# --- primitives ---------------------------------------------------------------------------
def _kdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def prg(seed: bytes, config: Config) -> np.ndarray:
    """`config.dim` pseudorandom ring elements (uint64 below 2^bits): ChaCha20's keystream under
    a key derived from `seed` and the round."""
    key = _kdf(seed, b"fedptr-secagg-prg" + config.digest)
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(8 * config.dim))
    return np.frombuffer(stream, dtype="<u8") & _mask(config)


def _mask(config: Config) -> np.uint64:
    return np.uint64((1 << config.ring_bits) - 1)


def share(secret: bytes, xs: Collection[int], threshold: int) -> dict[int, int]:
    """Shamir shares of `secret` at the points `xs` (nonzero), any `threshold` of which recover it."""
    coefficients = [int.from_bytes(secret, "big"), *(secrets.randbelow(PRIME) for _ in range(threshold - 1))]
    return {x: sum(c * pow(x, i, PRIME) for i, c in enumerate(coefficients)) % PRIME for x in xs}


def reconstruct(points: Mapping[int, int], size: int = 32) -> bytes:
    """The secret of `size` bytes at 0 of the polynomial through `points` (Lagrange). Too few
    points give a wrong value, or OverflowError when it does not even fit `size` bytes."""
    secret = 0
    for x, y in points.items():
        num = den = 1
        for other in points:
            if other != x:
                num, den = num * -other % PRIME, den * (x - other) % PRIME
        secret = (secret + y * num * pow(den, -1, PRIME)) % PRIME
    return secret.to_bytes(size, "big")


def _agree(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as e:  # a malformed or low-order key
        raise ProtocolError(f"bad X25519 public key: {e}") from None


def _pair_seed(shared: bytes, a: str, b: str, config: Config) -> bytes:
    lo, hi = sorted((a, b))
    return _kdf(shared, b"fedptr-secagg-pair" + config.digest + lo.encode() + b"\0" + hi.encode())


def _pair_mask(private: X25519PrivateKey, public: bytes, me: str, peer: str, config: Config) -> np.ndarray:
    """The mask `me` adds for `peer`: +PRG(s) when me < peer, its negation otherwise."""
    mask = prg(_pair_seed(_agree(private, public), me, peer, config), config)
    return mask if me < peer else (np.uint64(0) - mask) & _mask(config)


def _channel(shared: bytes, sender: str, receiver: str, config: Config) -> ChaCha20Poly1305:
    # one key per direction, so the all-zero nonce is never used twice under a key
    info = b"fedptr-secagg-share" + config.digest + sender.encode() + b"\0" + receiver.encode()
    return ChaCha20Poly1305(_kdf(shared, info))


def _raw_private(private: X25519PrivateKey) -> bytes:
    return private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _raw_public(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


# --- encoding -----------------------------------------------------------------------------
def encode(value: np.ndarray, config: Config, rng: np.random.Generator) -> np.ndarray:
    """`value` (already clipped to `config.clip`) plus this owner's noise share, stochastically
    rounded to ring elements (uint64 below 2^bits, negatives as two's complement)."""
    v = np.asarray(value, dtype=np.float64).reshape(-1)
    if v.shape != (config.dim,) or not np.all(np.isfinite(v)):
        raise InvalidArgumentError(f"a secure aggregation input is {config.dim} finite numbers")
    if float(np.linalg.norm(v)) > config.clip * (1 + 1e-9):
        raise InvalidArgumentError(f"a secure aggregation input must be clipped to {config.clip} first")
    noisy = (v + rng.normal(0.0, config.noise_std, config.dim)) * config.scale
    low = np.floor(noisy)
    rounded = low + (rng.random(config.dim) < noisy - low)  # unbiased: E[rounded] = noisy
    return rounded.astype(np.int64).view(np.uint64) & _mask(config)


def decode(total: np.ndarray, config: Config) -> np.ndarray:
    """The float sum a ring element stands for (centered: the top half are negatives)."""
    half = np.uint64(1 << (config.ring_bits - 1))
    signed = total.astype(np.float64) - (total >= half) * float(1 << config.ring_bits)
    return signed / config.scale


# --- the owner ----------------------------------------------------------------------------
class Owner:
    """One owner's side of one round. Each phase runs once, in order; anything else is refused."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.config: Config | None = None
        """The round's config: the aggregator fixes it after the keys, from who advertised."""
        self._cipher_key = X25519PrivateKey.generate()
        self._mask_key = X25519PrivateKey.generate()
        self._seed = secrets.token_bytes(32)
        self._phase = 0
        self._peers: dict[str, PublicKeys] = {}
        self._held: dict[str, tuple[int, int]] = {}
        """Shares this owner holds, by the peer they came from: (self-mask seed's, mask key's)."""

    def _enter(self, phase: int, what: str) -> None:
        if self._phase != phase:
            raise PermissionDenied(self.name, f"{what} is not the next step of this round (step {self._phase})")
        self._phase = phase + 1

    @property
    def public_keys(self) -> PublicKeys:
        """This round's public keys (a neighbour may check the relayed ones with them)."""
        return PublicKeys(_raw_public(self._cipher_key), _raw_public(self._mask_key))

    def advertise(self) -> PublicKeys:
        """Phase 1: this round's public keys."""
        self._enter(0, "advertising keys")
        return self.public_keys

    def share_keys(self, config: Config, keys: Mapping[str, PublicKeys]) -> dict[str, bytes]:
        """Phase 2: given the round's config and the advertised keys (U1), the encrypted shares
        for each neighbour in U1."""
        self._enter(1, "sharing keys")
        self.config = config
        self._check_own_keys(keys)
        holders = [v for v in config.neighbours(self.name) if v in keys]
        if len(holders) < config.threshold:
            gone = [v for v in config.neighbours(self.name) if v not in keys]
            raise DropoutError(gone, "share keys", f"{self.name!r} has fewer than {config.threshold} neighbours left")
        self._peers = {v: keys[v] for v in holders}
        xs = [config.index(v) for v in holders]
        seed_shares = share(self._seed, xs, config.threshold)
        key_shares = share(_raw_private(self._mask_key), xs, config.threshold)
        out = {}
        for v, x in zip(holders, xs, strict=True):
            plain = seed_shares[x].to_bytes(SHARE_BYTES, "big") + key_shares[x].to_bytes(SHARE_BYTES, "big")
            channel = _channel(_agree(self._cipher_key, keys[v].cipher), self.name, v, config)
            out[v] = channel.encrypt(bytes(12), plain, config.digest)
        return out

    def _round(self) -> Config:
        assert self.config is not None, "phases run in order (_enter)"
        return self.config

    def _check_own_keys(self, keys: Mapping[str, PublicKeys]) -> None:
        """Refuse a round without this owner, with strangers in its key set, or without this
        owner's own keys as sent."""
        config = self._round()
        if self.name not in config.owners:
            raise PermissionDenied(self.name, f"{self.name!r} is not an owner of this round")
        for name in keys:
            if name not in config.owners:
                raise ProtocolError(f"{name!r} is not an owner of this round")
        if keys.get(self.name) != self.public_keys:
            raise PermissionDenied(self.name, "the relayed keys do not include this owner's own")

    def masked_input(self, value: np.ndarray, ciphertexts: Mapping[str, bytes], rng: np.random.Generator) -> np.ndarray:
        """Phase 3: `value` (clipped) noised, quantized and masked, given the shares relayed from
        the neighbours that sent them (U2); it masks pairwise with those it shared with too.
        Raises DropoutError, sending nothing, when that leaves fewer than t of them."""
        self._enter(2, "sending the masked input")
        config = self._round()
        neighbours = config.neighbours(self.name)
        for v, blob in ciphertexts.items():
            if v not in neighbours:
                raise ProtocolError(f"{self.name!r} got shares from {v!r}, not a neighbour of this round")
            if v not in self._peers:  # left out when sharing: a pair masks only if both shared
                continue
            channel = _channel(_agree(self._cipher_key, self._peers[v].cipher), v, self.name, config)
            try:
                plain = channel.decrypt(bytes(12), blob, config.digest)
            except InvalidTag:
                raise PermissionDenied(self.name, f"the shares relayed from {v!r} do not open") from None
            if len(plain) != 2 * SHARE_BYTES:
                raise ProtocolError(f"shares from {v!r} have {len(plain)} bytes")
            self._held[v] = (int.from_bytes(plain[:SHARE_BYTES], "big"), int.from_bytes(plain[SHARE_BYTES:], "big"))
        if len(self._held) < config.threshold:
            # an aggregator that withheld the neighbours' shares would have this input under its self
            # mask alone, which one honest-looking unmask request (it survived) strips. With t pair
            # masks, one story cannot strip them too: the holders of b and those of each masking
            # neighbour's key would be disjoint sets of t in a neighbourhood of k < 2t.
            missing = sorted(set(neighbours) - set(self._held))
            raise DropoutError(
                missing,
                "masked input",
                f"{self.name!r} got the shares of {len(self._held)} of its neighbours, fewer than "
                f"{config.threshold}: it masks with at least that many",
            )
        y = encode(value, config, rng) + prg(self._seed, config)
        for v in self._held:
            y = y + _pair_mask(self._mask_key, self._peers[v].mask, self.name, v, config)
        out: np.ndarray = y & _mask(config)
        return out

    def unmask(self, request: UnmaskRequest, confirmed: Collection[str]) -> dict[str, tuple[str, int]]:
        """Phase 4: for each peer whose shares this owner holds, the self-mask share of a survivor
        or the mask-key share of a dropped peer, as (kind, share). `confirmed` are the owners
        that said, directly (not through the aggregator), that they were told this very request:
        the named survivors among them, with this owner, must be at least the round's quorum.
        Refused (PermissionDenied) when the request names a peer in both sets, leaves this owner
        out, or has fewer survivors than the round's minimum; a second request is refused too.
        DropoutError when the survivors that confirm it, with this owner, are fewer than the
        quorum."""
        self._enter(3, "unmasking")
        config = self._round()
        both = request.survivors & request.dropped
        if both:
            peer = min(both)
            raise PermissionDenied(self.name, f"the aggregator names {peer!r} both a survivor and dropped")
        if self.name not in request.survivors:
            raise PermissionDenied(self.name, "the aggregator asks this owner to unmask a round it counts it out of")
        if len(request.survivors) < config.min_survivors:
            raise PermissionDenied(
                self.name,
                f"only {len(request.survivors)} survivors; the noise is sized for at least {config.min_survivors}",
            )
        unknown = (request.survivors | request.dropped) - set(config.owners)
        if unknown:
            raise ProtocolError(f"{min(unknown)!r} is not an owner of this round")
        # each honest owner is told one request; the quorum is computed here from n and c, never
        # taken from the aggregator, and two requests cannot both reach it (`Config.quorum`)
        agreeing = (set(confirmed) & request.survivors) | {self.name}
        if len(agreeing) < config.quorum:
            raise DropoutError(
                sorted(set(config.owners) - agreeing),
                "unmask",
                f"{len(agreeing)} of the round's {len(config.owners)} owners confirm being told these "
                f"survivors; the quorum for {config.colluding} colluders is {config.quorum}",
            )
        out: dict[str, tuple[str, int]] = {}
        for v, (seed_share, key_share) in self._held.items():
            if v in request.survivors:
                out[v] = (SELF, seed_share)
            elif v in request.dropped:
                out[v] = (KEY, key_share)
        return out


# --- the aggregator -----------------------------------------------------------------------
class Aggregator:
    """The aggregator's side of one round: relays, then removes the masks it may remove."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._keys: dict[str, PublicKeys] = {}
        self._routed: dict[str, dict[str, bytes]] = {}
        self._masked: dict[str, np.ndarray] = {}

    def _need(self, alive: Collection[str], phase: str) -> None:
        if len(alive) < self.config.min_survivors:
            gone = sorted(set(self.config.owners) - set(alive))
            left = f"{len(alive)} owner{'' if len(alive) == 1 else 's'} left"
            raise DropoutError(gone, phase, f"{left}, fewer than {self.config.min_survivors}")

    def relay_keys(self, keys: Mapping[str, PublicKeys]) -> dict[str, PublicKeys]:
        """Phase 1 -> 2: the keys each surviving owner (U1) is sent."""
        self._need(keys, "advertise")
        self._keys = {o: k for o, k in keys.items() if o in self.config.owners}
        return dict(self._keys)

    def route_shares(self, sent: Mapping[str, Mapping[str, bytes]]) -> dict[str, dict[str, bytes]]:
        """Phase 2 -> 3: from each sender (U2) its ciphertexts by recipient; returns, for each
        recipient in U2, the ciphertexts it receives, by sender."""
        self._need(sent, "share keys")
        inbox: dict[str, dict[str, bytes]] = {u: {} for u in sent}
        for u, blobs in sent.items():
            for v, blob in blobs.items():
                if v in inbox:
                    inbox[v][u] = blob
        self._routed = inbox
        return inbox

    def collect(self, masked: Mapping[str, np.ndarray]) -> UnmaskRequest:
        """Phase 3 -> 4: the masked inputs of U3; returns the unmask request for every survivor."""
        self._need(masked, "masked input")
        self._masked = {u: np.asarray(y, dtype=np.uint64) for u, y in masked.items() if u in self._routed}
        for u, y in self._masked.items():
            if y.shape != (self.config.dim,):
                raise ProtocolError(f"{u!r} sent a masked input of shape {y.shape}, not ({self.config.dim},)")
        return UnmaskRequest(frozenset(self._masked), frozenset(self._routed) - frozenset(self._masked))

    def finish(self, answers: Mapping[str, Mapping[str, tuple[str, int]]]) -> tuple[np.ndarray, int]:
        """Phase 4: from the survivors' answers, the float sum of the survivors' noised inputs and
        how many they were. Raises DropoutError naming the owners whose masks lack shares."""
        survivors = set(self._masked)  # how many answer matters only through the shares below
        by_kind: dict[tuple[str, str], dict[int, int]] = {}
        for holder, given in answers.items():
            if holder not in survivors:
                continue
            for peer, (kind, value) in given.items():
                by_kind.setdefault((peer, kind), {})[self.config.index(holder)] = value
        mask = _mask(self.config)
        total = np.zeros(self.config.dim, dtype=np.uint64)
        for y in self._masked.values():
            total = (total + y) & mask
        short = []
        for u in sorted(survivors):
            points = by_kind.get((u, SELF), {})
            if len(points) < self.config.threshold:
                short.append(u)
                continue
            total = (total - prg(self._secret(points, u), self.config)) & mask
        for d in sorted(set(self._routed) - survivors):
            points = by_kind.get((d, KEY), {})
            if len(points) < self.config.threshold:
                short.append(d)
                continue
            key = X25519PrivateKey.from_private_bytes(self._secret(points, d))
            for u in survivors:
                if d in self._routed[u] and u in self._routed[d]:  # both shared, so u masked with d
                    # u added -(d's mask for u); d's mask for u is what d would have added
                    total = (total + _pair_mask(key, self._keys[u].mask, d, u, self.config)) & mask
        if short:
            raise DropoutError(short, "unmask", f"fewer than {self.config.threshold} of their neighbours answered")
        return decode(total, self.config), len(survivors)

    def _secret(self, points: Mapping[int, int], owner: str) -> bytes:
        chosen = dict(sorted(points.items())[: self.config.threshold])
        try:
            return reconstruct(chosen)
        except OverflowError:
            raise DropoutError([owner], "unmask", "its shares do not reconstruct a secret") from None
