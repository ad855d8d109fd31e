"""Keys of a mesh and of its links. Pure functions and small objects; no I/O but reading /proc/cpuinfo once.

The mesh key: the secret stretched once per process by scrypt (memory-hard, from the standard library). Everything
a stranger can see (the handshake's proofs, the mesh id in the TXT record) is computed from this key, never from
the secret itself, so testing a guessed secret against anything observable costs one scrypt per guess.

A link's keys: both sides send an ephemeral X25519 public key in their hello; HKDF-SHA256 turns the shared
Diffie-Hellman value, salted with the mesh key, and bound to the transcript (both nonces, node ids, public keys and
cipher lists) into a proof key and one key per direction. A relay without the secret can neither read a frame, nor
forge one, nor complete a handshake in the middle; a recorded link stays unreadable even to someone who learns the
secret later (forward secrecy: the X25519 keys live only as long as the handshake).

Frames after the handshake are sealed with an AEAD under a per-direction counter nonce, the length header as
associated data: a changed, dropped, replayed or reordered frame fails to open. The AEAD is AES-256-GCM when both
CPUs have AES instructions (1.7 us to seal 8 KB here, against 4.8 us for ChaCha20-Poly1305), else
ChaCha20-Poly1305 (the faster one without them: ARM boards without the crypto extension).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
import platform
from collections import Counter

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import IntegrityError

# scrypt at 2^15 x 8: 32 MiB and ~0.15 s on one core of this machine, once per process and secret
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
_SCRYPT_SALT = b"meshllm mesh key v1"
_HKDF_LABEL = b"meshllm link keys v1"
TAG = 16  # bytes the AEAD adds to a frame
CIPHERS = ("aes256-gcm", "chacha20-poly1305")  # our preference, best first
MIN_SECRET_CHARS = 16
SECRET_ADVICE = "make a strong one with `python -m meshllm secret` and give it to every device"


_keys: dict[bytes, bytes] = {}  # secret -> its mesh key, for the few secrets a process uses


def mesh_key(secret: bytes) -> bytes:
    """32 bytes stretched from the mesh secret (scrypt, ~0.15 s the first time for a secret: off the event loop,
    see prepare_async; remembered after)."""
    key = _keys.get(secret)
    if key is None:
        key = hashlib.scrypt(secret, salt=_SCRYPT_SALT, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=2**26, dklen=32)
        if len(_keys) >= 8:
            del _keys[next(iter(_keys))]
        _keys[secret] = key
    return key


async def prepare_async(secret: bytes) -> bytes:
    """mesh_key(secret) without blocking the event loop the first time."""
    if secret in _keys:
        return _keys[secret]
    import asyncio

    return await asyncio.to_thread(mesh_key, secret)


def secret_weakness(secret: bytes | str) -> str | None:
    """Why a secret is easy to guess (too short, or too few distinct characters), or None."""
    text = secret.decode("utf-8", "replace") if isinstance(secret, bytes) else secret
    if len(text) < MIN_SECRET_CHARS:
        return f"the mesh secret is short ({len(text)} characters; use at least {MIN_SECRET_CHARS})"
    counts = Counter(text)
    bits = len(text) * -sum(c / len(text) * math.log2(c / len(text)) for c in counts.values())
    if bits < 64:
        return f"the mesh secret has little variety (about {bits:.0f} bits by its letter counts; use at least 64)"
    return None


def warn_if_weak(secret: bytes | str, log) -> None:
    """One warning on `log` when the secret is easy to guess, with the fix."""
    why = secret_weakness(secret)
    if why:
        log.warning("%s: whoever records one handshake, or reads the mesh id on the LAN, can try guesses offline; "
                    "%s", why, SECRET_ADVICE)


def hardware_aes() -> bool:
    """Whether this CPU has AES instructions (x86 `aes` flag, ARM `aes` feature)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return "aes" in value.split()
    except OSError:
        pass
    return platform.machine().lower() in ("x86_64", "amd64", "arm64")  # macOS and Windows: no cpuinfo


@functools.lru_cache(maxsize=1)
def local_ciphers() -> tuple[str, ...]:
    """The ciphers this device offers, fastest on its CPU first."""
    return CIPHERS if hardware_aes() else ("chacha20-poly1305",)


def choose_cipher(initiator: list[str], responder: list[str]) -> str | None:
    """AES-GCM only when both sides offer it (both have AES instructions); else ChaCha20-Poly1305 if both offer it."""
    for name in CIPHERS:
        if name in initiator and name in responder:
            return name
    return None


class Ephemeral:
    """One handshake's X25519 key pair."""

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()
        self.public = self._private.public_key().public_bytes_raw()

    def shared(self, peer_public: bytes) -> bytes:
        """The Diffie-Hellman value (ValueError for a malformed or low-order public key)."""
        if not isinstance(peer_public, bytes) or len(peer_public) != 32:
            raise ValueError("an X25519 public key is 32 bytes")
        return self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))


def transcript(*fields: bytes) -> bytes:
    """Fields joined with a length before each, so that peer-chosen fields cannot be shifted into one another."""
    return b"".join(len(f).to_bytes(4, "big") + f for f in fields)


def link_keys(key: bytes, shared: bytes, context: bytes) -> tuple[bytes, bytes, bytes]:
    """(proof key, initiator->responder key, responder->initiator key) for one link."""
    okm = HKDF(algorithm=hashes.SHA256(), length=96, salt=key, info=_HKDF_LABEL + context).derive(shared)
    return okm[:32], okm[32:64], okm[64:]


def proof(proof_key: bytes, role: bytes) -> bytes:
    """What a side sends to show it holds the mesh key: HMAC of its role under the link's proof key."""
    return hmac.new(proof_key, role, hashlib.sha256).digest()


def _aead(cipher: str, key: bytes):
    return AESGCM(key) if cipher == "aes256-gcm" else ChaCha20Poly1305(key)


class Sealer:
    """Seals one direction's frames: nonce = 64-bit frame counter, associated data = the length header."""

    def __init__(self, cipher: str, key: bytes) -> None:
        self._aead = _aead(cipher, key)
        self.count = 0

    def seal(self, header: bytes, body: bytes) -> bytes:
        nonce = self.count.to_bytes(12, "little")
        self.count += 1
        return self._aead.encrypt(nonce, body, header)

    def frame(self, header: bytes, body: bytes) -> bytearray:
        """header || sealed body, encrypted straight into the frame's buffer (no copy of the ciphertext)."""
        if not hasattr(self._aead, "encrypt_into"):  # cryptography before 45
            return bytearray(header + self.seal(header, body))
        nonce = self.count.to_bytes(12, "little")
        self.count += 1
        out = bytearray(len(header) + len(body) + TAG)
        out[:len(header)] = header
        with memoryview(out) as view, view[len(header):] as tail:
            self._aead.encrypt_into(nonce, body, header, tail)
        return out


class Opener:
    """Opens the other direction's frames, in order; anything else raises IntegrityError."""

    REUSE = 1 << 16  # bodies up to this size are opened into one reused buffer (the data path's parts and sums)

    def __init__(self, cipher: str, key: bytes) -> None:
        self._aead = _aead(cipher, key)
        self._into = hasattr(self._aead, "decrypt_into")  # cryptography 45 and later
        self._buf = bytearray(self.REUSE)
        self.count = 0

    def open(self, header: bytes, sealed) -> bytes | memoryview:
        """The body; a small one is a view of a buffer the next call overwrites (unpack it before then)."""
        nonce = self.count.to_bytes(12, "little")
        n = len(sealed) - TAG
        try:
            if self._into and 0 <= n <= self.REUSE:
                view = memoryview(self._buf)[:n]
                self._aead.decrypt_into(nonce, sealed, header, view)
                body: bytes | memoryview = view
            else:
                body = self._aead.decrypt(nonce, sealed, header)
        except InvalidTag:
            raise IntegrityError(f"frame {self.count} failed its integrity check: altered, replayed, reordered or "
                                 f"dropped on the way") from None
        self.count += 1
        return body
