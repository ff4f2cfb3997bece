"""Device authentication: signed bearer tokens (JWT) checked against a key store.

Every device API call carries ``Authorization: Bearer <jwt>``.  A token is
accepted when, in this order:

1. the header is ``Bearer <token>`` (else 401 ``token_missing`` /
   ``token_malformed``);
2. its JOSE header names a ``kid`` present in the key store (else 401
   ``token_unknown_key``) and an ``alg`` equal to that key's configured
   algorithm (else 401 ``token_alg_refused``; ``none`` is always refused).
   The algorithm used to verify is the *key's*, never the token's: a token
   cannot make an RSA or Ed25519 public key serve as an HMAC secret;
3. the signature verifies (``token_bad_signature``), ``exp`` is in the future
   and ``nbf``/``iat`` are not (``token_expired``, ``token_not_yet_valid``,
   each with the configured leeway), ``aud`` names this relay
   (``token_wrong_audience``), ``iss`` is the expected issuer
   (``token_wrong_issuer``); ``exp``, ``iat``, ``sub``, ``aud`` and ``iss``
   must be present (``token_malformed``);
4. the device (``sub``) is not revoked, wholly or for tokens issued before a
   time (403 ``token_revoked``).

A valid token for one device acting on another device's resources is 403
``forbidden_device`` (:func:`require_device`).  Error messages never contain
the token itself.

The keys (``kid`` → algorithm and key material) come from the key store,
relay/auth_keys.py; revoked devices from the revocation list (TOML, below).

Concurrency: :class:`relay.auth_keys.KeyStore`, :class:`RevocationList` and
:class:`Authenticator` are immutable after construction, except that
``Authenticator.revoked`` may be replaced by assignment (an atomic reference
swap) to reload revocations; they can be shared between threads.
"""

from __future__ import annotations

import datetime as dt
import re
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import jwt

from relay.auth_keys import Key, KeyStore
from relay.claims import REGISTERED_CLAIMS
from relay.config_file import read_toml_file
from relay.errors import (
    ConfigError,
    DeviceRevoked,
    KeyStoreError,
    NotOwnDevice,
    TokenAlgorithmRefused,
    TokenBadSignature,
    TokenExpired,
    TokenMalformed,
    TokenMissing,
    TokenNotYetValid,
    TokenUnknownKey,
    TokenWrongAudience,
    TokenWrongIssuer,
)

DEFAULT_AUDIENCE: Final = "fieldsync-relay"
DEFAULT_ISSUER: Final = "fieldsync"
DEFAULT_LEEWAY_S: Final = 30.0
MAX_TOKEN_CHARS: Final = 16384
_REQUIRED_CLAIMS: Final = ["exp", "iat", "sub", "aud", "iss"]
_CLAIM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def valid_device_id(device_id: object) -> bool:
    """A device id is 1-128 printable characters without whitespace."""
    return (
        isinstance(device_id, str)
        and 0 < len(device_id) <= 128
        and all(ch.isprintable() and not ch.isspace() for ch in device_id)
    )


# --------------------------------------------------------------------------- revocation


@dataclass(frozen=True)
class Revocation:
    """A revoked device: every token (``issued_before`` None) or those issued before a time."""

    device_id: str
    issued_before: float | None = None
    reason: str = ""

    def applies(self, issued_at: float) -> bool:
        return self.issued_before is None or issued_at < self.issued_before


class RevocationList:
    """Revoked devices.  File (TOML): ``[[revoked]]`` with ``device``, optional ``issued_before``
    (an offset date-time) and ``reason``."""

    def __init__(self, entries: Iterable[Revocation] = ()) -> None:
        by_device: dict[str, list[Revocation]] = {}
        for entry in entries:
            by_device.setdefault(entry.device_id, []).append(entry)
        self._by_device = {d: tuple(v) for d, v in by_device.items()}

    def __len__(self) -> int:
        return len(self._by_device)

    def revocation_for(self, device_id: str, issued_at: float) -> Revocation | None:
        """The revocation that refuses a token of ``device_id`` issued at ``issued_at``, if any."""
        for entry in self._by_device.get(device_id, ()):
            if entry.applies(issued_at):
                return entry
        return None

    @classmethod
    def from_file(cls, path: str | Path) -> RevocationList:
        path = Path(path)
        data = read_toml_file(path, "revocation list", KeyStoreError)
        unknown = [k for k in data if k != "revoked"]
        if unknown:
            raise KeyStoreError(f"{path}: {unknown[0]} is not a known key (known: revoked)")
        raw = data.get("revoked", [])
        if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
            raise KeyStoreError(f"{path}: revoked must be an array of tables ([[revoked]])")
        return cls(_revocation(path, i, r) for i, r in enumerate(raw))


def _revocation(path: Path, index: int, raw: Mapping[str, Any]) -> Revocation:
    scope = f"{path}: revoked #{index + 1}"
    for name in raw:
        if name not in ("device", "issued_before", "reason"):
            raise KeyStoreError(
                f"{scope}: {name} is not a known key (known: device, issued_before, reason)"
            )
    device = raw.get("device")
    if not valid_device_id(device):
        raise KeyStoreError(f"{scope}: device must be a device id, not {device!r}")
    before = raw.get("issued_before")
    if before is not None and (not isinstance(before, dt.datetime) or before.tzinfo is None):
        raise KeyStoreError(
            f"{scope}: issued_before must be a date-time with offset (e.g. 2024-06-01T12:00:00Z)"
        )
    reason = raw.get("reason", "")
    if not isinstance(reason, str):
        raise KeyStoreError(f"{scope}: reason must be a string")
    assert isinstance(device, str)
    return Revocation(device, before.timestamp() if before is not None else None, reason)


# --------------------------------------------------------------------------- authentication


@dataclass(frozen=True)
class DeviceIdentity:
    """Who a verified token speaks for.  ``claims`` is the whole (read-only) payload."""

    device_id: str
    claims: Mapping[str, Any]
    kid: str
    expires_at: dt.datetime


class Authenticator:
    """Verifies bearer tokens (see the module docstring for the checks and their errors)."""

    def __init__(
        self,
        keystore: KeyStore,
        audience: str = DEFAULT_AUDIENCE,
        issuer: str = DEFAULT_ISSUER,
        leeway_s: float = DEFAULT_LEEWAY_S,
        revoked: RevocationList | None = None,
    ) -> None:
        if not audience or not issuer:
            raise ConfigError("the relay's token audience and issuer must not be empty")
        if leeway_s < 0:
            raise ConfigError(f"token leeway must not be negative (got {leeway_s})")
        self.keystore = keystore
        self.audience = audience
        self.issuer = issuer
        self.leeway_s = leeway_s
        self.revoked = revoked if revoked is not None else RevocationList()

    def authenticate(self, header_value: str | None) -> DeviceIdentity:
        """Check an ``Authorization`` header value; raises an :class:`~relay.errors.AuthError`."""
        if header_value is None or not header_value.strip():
            raise TokenMissing("no bearer token: send 'Authorization: Bearer <token>'")
        parts = header_value.split()
        if len(parts) != 2 or parts[0].lower() != "bearer":
            raise TokenMalformed("the Authorization header must be 'Bearer <token>'")
        return self.verify(parts[1])

    def verify(self, token: str) -> DeviceIdentity:
        """Check a bare token."""
        if len(token) > MAX_TOKEN_CHARS:
            raise TokenMalformed(f"token is longer than {MAX_TOKEN_CHARS} characters")
        key = self._key_for(token)
        try:
            payload = jwt.decode(
                token,
                key.verify_key,
                algorithms=[key.alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": list(_REQUIRED_CLAIMS)},
            )
        except jwt.PyJWTError as exc:
            raise _auth_error(exc, key.kid) from exc
        device_id = payload["sub"]
        if not valid_device_id(device_id):
            raise TokenMalformed("token sub is not a valid device id")
        revocation = self.revoked.revocation_for(device_id, float(payload["iat"]))
        if revocation is not None:
            reason = f": {revocation.reason}" if revocation.reason else ""
            raise DeviceRevoked(f"device {device_id!r} is revoked{reason}")
        try:
            expires = dt.datetime.fromtimestamp(float(payload["exp"]), dt.UTC)
        except (OverflowError, ValueError, OSError) as exc:
            raise TokenMalformed("token exp is not a representable time") from exc
        return DeviceIdentity(device_id, MappingProxyType(payload), key.kid, expires)

    def _key_for(self, token: str) -> Key:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenMalformed("token is not a JWT (header cannot be decoded)") from exc
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise TokenAlgorithmRefused("token alg 'none' (unsigned) is refused")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenUnknownKey("token header has no kid")
        key = self.keystore.get(kid)
        if key is None:
            raise TokenUnknownKey(f"token kid {kid[:64]!r} is not a key of this relay")
        if alg != key.alg:
            raise TokenAlgorithmRefused(
                f"token alg {alg[:16]!r} differs from key {kid!r}'s alg {key.alg}"
            )
        return key


def _auth_error(exc: jwt.PyJWTError, kid: str) -> Exception:
    # Order matters: InvalidSignatureError is a DecodeError, the rest are InvalidTokenErrors.
    if isinstance(exc, jwt.ExpiredSignatureError):
        return TokenExpired("token has expired")
    if isinstance(exc, jwt.ImmatureSignatureError):
        return TokenNotYetValid("token is not valid yet (nbf or iat in the future)")
    if isinstance(exc, jwt.InvalidAudienceError):
        return TokenWrongAudience("token audience does not name this relay")
    if isinstance(exc, jwt.InvalidIssuerError):
        return TokenWrongIssuer("token issuer is not the expected issuer")
    if isinstance(exc, jwt.InvalidSignatureError):
        return TokenBadSignature(f"token signature does not verify with key {kid!r}")
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return TokenAlgorithmRefused(f"token algorithm is not allowed for key {kid!r}")
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return TokenMalformed(f"token lacks the {exc.claim!r} claim")
    if isinstance(exc, jwt.InvalidKeyError):
        return KeyStoreError(f"key {kid!r} cannot verify tokens: {exc}")
    return TokenMalformed(f"token is malformed: {exc}")


def require_device(identity: DeviceIdentity, device_id: str) -> None:
    """Refuse (403) a device acting on another device's resources."""
    if identity.device_id != device_id:
        raise NotOwnDevice(f"device {identity.device_id!r} may not act for device {device_id!r}")


# --------------------------------------------------------------------------- issuing


def issue_token(
    keystore: KeyStore,
    kid: str | None,
    device_id: str,
    claims: Mapping[str, Any],
    ttl_s: float,
    audience: str = DEFAULT_AUDIENCE,
    issuer: str = DEFAULT_ISSUER,
    now: float | None = None,
) -> str:
    """Sign a token for ``device_id`` (``sub``) with ``claims`` and a ``jti``, valid ``ttl_s``."""
    key = keystore.signing_key(kid)
    if not valid_device_id(device_id):
        raise ConfigError(
            f"device id {device_id!r} is not valid (1-128 printable characters, no spaces)"
        )
    if ttl_s <= 0:
        raise ConfigError(f"token lifetime must be positive (got {ttl_s} s)")
    for name, value in claims.items():
        _check_claim(name, value)
    issued = int(time.time() if now is None else now)
    payload: dict[str, Any] = dict(claims)
    payload.update(
        sub=device_id,
        iss=issuer,
        aud=audience,
        iat=issued,
        exp=issued + max(1, int(ttl_s)),
        jti=uuid.uuid4().hex,
    )
    try:
        return jwt.encode(payload, key.sign_key, algorithm=key.alg, headers={"kid": key.kid})
    except jwt.PyJWTError as exc:
        raise KeyStoreError(f"key {key.kid!r} cannot sign: {exc}") from exc


def _check_claim(name: str, value: object) -> None:
    if not _CLAIM_NAME.match(name):
        raise ConfigError(
            f"claim name {name!r} is not valid (letters, digits and _, not starting with a digit)"
        )
    if name in REGISTERED_CLAIMS:
        raise ConfigError(
            f"claim {name!r} is a registered JWT claim set by the issuer; choose another name"
        )
    scalars = str | int  # bool is an int
    if isinstance(value, scalars):
        return
    if isinstance(value, Sequence) and all(isinstance(v, scalars) for v in value):
        return
    raise ConfigError(
        f"claim {name!r} must be a string, integer, boolean or a list of them, not {value!r}"
    )
