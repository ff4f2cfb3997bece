"""The relay's token keys: the key store the authenticator verifies with and tokens are
issued with (relay/auth.py).

Key store (TOML): ``[[key]]`` entries with ``kid``, ``alg`` (HS256, RS256 or EdDSA) and
either ``secret``/``secret_env`` (HS256) or ``public_key_pem`` / ``private_key_pem``
(paths to PEM files, relative to the keys file).  Several keys can be live at once:
rotation adds a key, issues with it, and removes the old one once its tokens have expired.
``current`` names the key tokens are issued with by default.  Every key is checked when
loaded: an HS256 secret of at least :data:`MIN_HMAC_SECRET_BYTES` bytes that does not look
like a PEM or SSH key, an RSA key of at least :data:`MIN_RSA_BITS` bits, an Ed25519 or
Ed448 key for EdDSA, a public half that matches its private half.  Every problem is a
:class:`relay.errors.KeyStoreError` naming the file and the key.

Concurrency: :class:`Key` and :class:`KeyStore` are immutable after construction and can
be shared between threads.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519, rsa

from core.settings_checks import close_match_hint
from relay.config_file import read_toml_file
from relay.errors import KeyStoreError

ALGORITHMS: Final[tuple[str, ...]] = ("HS256", "RS256", "EdDSA")
MIN_HMAC_SECRET_BYTES: Final = 32
MIN_RSA_BITS: Final = 2048
_KEY_KEYS: Final = ("kid", "alg", "secret", "secret_env", "public_key_pem", "private_key_pem")


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
                f"{source}: current {current!r} is not a kid of this file{close_match_hint(current, by_kid)}"
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
                f"{self.source}: no key with kid {kid!r}{close_match_hint(kid, self._keys)} (kids: {', '.join(self.kids) or 'none'})"
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
        data = read_toml_file(path, "keys file", KeyStoreError)
        env = os.environ if env is None else env
        where = str(path)
        for key in data:
            if key not in ("current", "key"):
                raise KeyStoreError(
                    f"{where}: {key} is not a known key{close_match_hint(key, ('current', 'key'))} (known: current, key)"
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
                f"{scope}: {name} is not a known key{close_match_hint(name, _KEY_KEYS)} (known: {', '.join(_KEY_KEYS)})"
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
