"""Device authentication: signed bearer tokens (JWT) checked against a key store.

Every device API call carries ``Authorization: Bearer <jwt>``.  A token is
accepted when, in this order:

1. the header is ``Bearer <token>`` (else 401 ``token_missing`` /
   ``token_malformed``);
2. its JOSE header names a ``kid`` present in the :class:`KeyStore` (else 401
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

Key store (TOML): ``[[key]]`` entries with ``kid``, ``alg`` (HS256, RS256 or
EdDSA) and either ``secret``/``secret_env`` (HS256) or ``public_key_pem`` /
``private_key_pem`` (paths to PEM files, relative to the keys file).  Several
keys can be live at once: rotation adds a key, issues with it, and removes the
old one once its tokens have expired.  ``current`` names the key tokens are
issued with by default.

Concurrency: :class:`KeyStore`, :class:`RevocationList` and
:class:`Authenticator` are immutable after construction, except that
``Authenticator.revoked`` may be replaced by assignment (an atomic reference
swap) to reload revocations; they can be shared between threads.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import time
import tomllib
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519, rsa

from core.journal_format import valid_device_id
from core.settings_checks import close_match_hint as _hint
from relay.claims import REGISTERED_CLAIMS
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

ALGORITHMS: Final[tuple[str, ...]] = ("HS256", "RS256", "EdDSA")
DEFAULT_AUDIENCE: Final = "fieldsync-relay"
DEFAULT_ISSUER: Final = "fieldsync"
DEFAULT_LEEWAY_S: Final = 30.0
MAX_TOKEN_CHARS: Final = 16384
MIN_HMAC_SECRET_BYTES: Final = 32
MIN_RSA_BITS: Final = 2048
_REQUIRED_CLAIMS: Final = ["exp", "iat", "sub", "aud", "iss"]
_KEY_KEYS: Final = ("kid", "alg", "secret", "secret_env", "public_key_pem", "private_key_pem")
_CLAIM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class Key:
    """One key of the store.  ``verify_key``/``sign_key`` are bytes (HS256) or key objects."""

    kid: str
    alg: str
    verify_key: Any = field(repr=False)
    sign_key: Any = field(repr=False, default=None)

    @property
    def can_sign(self) -> bool:
        return self.sign_key is not None

    @classmethod
    def hmac(cls, kid: str, secret: bytes) -> Key:
        """An HS256 key; the secret must be at least 32 bytes."""
        _check_secret(kid, secret)
        return cls(kid, "HS256", secret, secret)

    @classmethod
    def from_pem(
        cls,
        kid: str,
        alg: str,
        *,
        public_pem: bytes | None = None,
        private_pem: bytes | None = None,
    ) -> Key:
        """An RS256 or EdDSA key from PEM data (private alone is enough: the public is derived)."""
        if alg not in ("RS256", "EdDSA"):
            raise KeyStoreError(f"key {kid!r}: PEM keys are for RS256 or EdDSA, not {alg!r}")
        private: Any = None
        if private_pem is not None:
            try:
                private = serialization.load_pem_private_key(private_pem, password=None)
            except (ValueError, TypeError) as exc:
                raise KeyStoreError(
                    f"key {kid!r}: private key is not an unencrypted PEM key: {exc}"
                ) from exc
            _check_key_type(kid, alg, private.public_key())
        public: Any = None
        if public_pem is not None:
            try:
                public = serialization.load_pem_public_key(public_pem)
            except (ValueError, TypeError) as exc:
                raise KeyStoreError(
                    f"key {kid!r}: public key is not a PEM public key: {exc}"
                ) from exc
            _check_key_type(kid, alg, public)
        if public is None and private is None:
            raise KeyStoreError(f"key {kid!r}: give public_key_pem, private_key_pem or both")
        if public is None:
            public = private.public_key()
        elif private is not None and _public_bytes(private.public_key()) != _public_bytes(public):
            raise KeyStoreError(
                f"key {kid!r}: public_key_pem is not the public half of private_key_pem"
            )
        return cls(kid, alg, public, private)


def _public_bytes(key: Any) -> bytes:
    data: bytes = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def _check_secret(kid: str, secret: bytes) -> None:
    if len(secret) < MIN_HMAC_SECRET_BYTES:
        raise KeyStoreError(
            f"key {kid!r}: HS256 secret is {len(secret)} bytes; use at least {MIN_HMAC_SECRET_BYTES} "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(48))')"
        )
    if secret.lstrip().startswith((b"-----BEGIN", b"ssh-")):
        raise KeyStoreError(
            f"key {kid!r}: HS256 secret looks like a public/private key; use a random secret"
        )


def _check_key_type(kid: str, alg: str, public: Any) -> None:
    if alg == "RS256":
        if not isinstance(public, rsa.RSAPublicKey):
            raise KeyStoreError(
                f"key {kid!r}: alg RS256 needs an RSA key, not {type(public).__name__}"
            )
        if public.key_size < MIN_RSA_BITS:
            raise KeyStoreError(
                f"key {kid!r}: RSA key has {public.key_size} bits; use at least {MIN_RSA_BITS}"
            )
    elif not isinstance(public, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        raise KeyStoreError(
            f"key {kid!r}: alg EdDSA needs an Ed25519 or Ed448 key, not {type(public).__name__}"
        )


class KeyStore:
    """Keys by ``kid``; ``current`` is the default key for issuing tokens."""

    def __init__(
        self, keys: Iterable[Key], current: str | None = None, source: str = "<keys>"
    ) -> None:
        self.source = source
        by_kid: dict[str, Key] = {}
        for key in keys:
            if key.kid in by_kid:
                raise KeyStoreError(f"{source}: kid {key.kid!r} is defined twice")
            if key.alg not in ALGORITHMS:
                raise KeyStoreError(
                    f"{source}: key {key.kid!r}: alg {key.alg!r} is not one of {', '.join(ALGORITHMS)}"
                )
            by_kid[key.kid] = key
        if current is not None and current not in by_kid:
            raise KeyStoreError(
                f"{source}: current {current!r} is not a kid of this file{_hint(current, by_kid)}"
            )
        self._keys = MappingProxyType(by_kid)
        self.current = current

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def get(self, kid: str) -> Key | None:
        return self._keys.get(kid)

    def signing_key(self, kid: str | None) -> Key:
        """The key to issue with (``current`` when ``kid`` is None); it must hold private material."""
        if kid is None:
            if self.current is None:
                raise KeyStoreError(
                    f"{self.source}: no kid given and no 'current' key set (kids: {', '.join(self.kids) or 'none'})"
                )
            kid = self.current
        key = self._keys.get(kid)
        if key is None:
            raise KeyStoreError(
                f"{self.source}: no key with kid {kid!r}{_hint(kid, self._keys)} (kids: {', '.join(self.kids) or 'none'})"
            )
        if not key.can_sign:
            raise KeyStoreError(
                f"{self.source}: key {kid!r} has no private_key_pem; it can verify tokens but not issue them"
            )
        return key

    @classmethod
    def from_file(cls, path: str | Path, env: Mapping[str, str] | None = None) -> KeyStore:
        """Load a keys file; PEM paths are relative to it, ``secret_env`` reads ``env`` (os.environ)."""
        path = Path(path)
        data = _read_auth_file(path, "keys file")
        env = os.environ if env is None else env
        where = str(path)
        for key in data:
            if key not in ("current", "key"):
                raise KeyStoreError(
                    f"{where}: {key} is not a known key{_hint(key, ('current', 'key'))} (known: current, key)"
                )
        raw_keys = data.get("key")
        if (
            not isinstance(raw_keys, list)
            or not raw_keys
            or not all(isinstance(k, dict) for k in raw_keys)
        ):
            raise KeyStoreError(f"{where}: defines no key (add [[key]] tables with kid and alg)")
        current = data.get("current")
        if current is not None and not isinstance(current, str):
            raise KeyStoreError(f"{where}: current must be a kid (a string)")
        keys = [_key_from_toml(where, path.parent, i, raw, env) for i, raw in enumerate(raw_keys)]
        return cls(keys, current, where)


def _key_from_toml(
    where: str, base: Path, index: int, raw: Mapping[str, Any], env: Mapping[str, str]
) -> Key:
    kid = raw.get("kid")
    if not isinstance(kid, str) or not kid:
        raise KeyStoreError(f"{where}: key #{index + 1}: kid is missing or not a string")
    scope = f"{where}: key {kid!r}"
    for name in raw:
        if name not in _KEY_KEYS:
            raise KeyStoreError(
                f"{scope}: {name} is not a known key{_hint(name, _KEY_KEYS)} (known: {', '.join(_KEY_KEYS)})"
            )
    alg = raw.get("alg")
    if alg not in ALGORITHMS:
        raise KeyStoreError(f"{scope}: alg {alg!r} is not one of {', '.join(ALGORITHMS)}")
    has_secret = "secret" in raw or "secret_env" in raw
    has_pem = "public_key_pem" in raw or "private_key_pem" in raw
    try:
        if alg == "HS256":
            if has_pem or not has_secret:
                raise KeyStoreError(f"key {kid!r}: HS256 takes secret or secret_env, not PEM files")
            return Key.hmac(kid, _secret(kid, raw, env))
        if has_secret or not has_pem:
            raise KeyStoreError(
                f"key {kid!r}: {alg} takes public_key_pem and/or private_key_pem, not a secret"
            )
        return Key.from_pem(
            kid,
            str(alg),
            public_pem=_read_pem(kid, base, raw.get("public_key_pem")),
            private_pem=_read_pem(kid, base, raw.get("private_key_pem")),
        )
    except KeyStoreError as exc:
        raise KeyStoreError(f"{where}: {exc}") from exc


def _secret(kid: str, raw: Mapping[str, Any], env: Mapping[str, str]) -> bytes:
    if "secret" in raw and "secret_env" in raw:
        raise KeyStoreError(f"key {kid!r}: give secret or secret_env, not both")
    if "secret_env" in raw:
        name = raw["secret_env"]
        if not isinstance(name, str) or name not in env:
            raise KeyStoreError(f"key {kid!r}: secret_env {name!r} is not set in the environment")
        return env[name].encode()
    secret = raw["secret"]
    if not isinstance(secret, str):
        raise KeyStoreError(f"key {kid!r}: secret must be a string")
    return secret.encode()


def _read_pem(kid: str, base: Path, value: object) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise KeyStoreError(f"key {kid!r}: PEM paths must be strings, not {value!r}")
    path = base / value
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyStoreError(f"key {kid!r}: cannot read {path}: {exc.strerror}") from exc


def _read_auth_file(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise KeyStoreError(f"{path}: cannot read {what}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise KeyStoreError(f"{path}: {what} is not valid TOML: {exc}") from exc


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
        data = _read_auth_file(path, "revocation list")
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
