"""Exceptions raised by the relay package.

Every error names the thing at fault (file, rule, key path, key id, device).
Library exceptions (PyJWT, cryptography, tomllib) are converted at the boundary
with ``raise ... from exc``.

Authentication errors carry the HTTP status and a stable machine code; the HTTP
layer renders them with :meth:`AuthError.to_dict` as the one JSON error shape
``{"error": {"code": ..., "message": ..., "status": ...}}``.

::

    core.errors.FieldsyncError
    ├── core.errors.ConfigError        a configuration file or option is invalid
    │   ├── RulesError             rules file invalid: every problem names file, rule, key path
    │   ├── KeyStoreError          keys/revocation file invalid, key unusable for what is asked
    │   ├── ConflictsError         conflicts (merge policies) file invalid: file, table, key
    │   └── StoreRulesMismatch     the rules place rows unlike those the bucket store was built with
    └── RelayError
        ├── RowError                   a row lacks a column the rules need (caller must send full rows)
        ├── StoreError                 bucket store failed (connection, schema newer than the code)
        │   └── LeadershipLost         the writer connection, and with it the engine's lock, was lost
        ├── EngineError                bucket engine cannot go on (undecodable event, missing schema)
        ├── UploadError      (400)     bad_upload: a journal upload as a whole is unusable
        │   └── BatchTooLarge (413)    batch_too_large: more entries or bytes than allowed
        ├── JournalStoreError          the store database cannot hold the journal tables right now
        ├── BrokerUnavailable          the Kafka brokers cannot be read (names them)
        ├── MetricsUnavailable         a relay's metrics endpoint cannot be read (names its URL)
        ├── ApplierError               the applier cannot go on (database, schema, Kafka)
        │   ├── ConflictNotFound       no kept conflict has this id
        │   └── ResolveError           a resolution is invalid (unknown choice, foreign columns)
        │       └── ResolveForbidden (403) forbidden_row / _column / _move: beyond the device's rights
        └── AuthError        (401)     request not authenticated; .status, .code, to_dict()
            ├── TokenMissing           token_missing        no Authorization header
            ├── TokenMalformed         token_malformed      not "Bearer <jwt>", undecodable, claim missing
            ├── TokenAlgorithmRefused  token_alg_refused    alg "none", or alg differs from the key's
            ├── TokenUnknownKey        token_unknown_key    no kid, or kid not in the key store
            ├── TokenBadSignature      token_bad_signature  signature does not verify
            ├── TokenExpired           token_expired        exp passed (beyond the leeway)
            ├── TokenNotYetValid       token_not_yet_valid  nbf / iat in the future
            ├── TokenWrongAudience     token_wrong_audience aud does not name this relay
            ├── TokenWrongIssuer       token_wrong_issuer   iss is not the expected issuer
            └── ForbiddenError (403)   forbidden            authenticated, but not allowed
                ├── DeviceRevoked      token_revoked        the device (or this token's age) is revoked
                └── NotOwnDevice       forbidden_device     acting on another device's resources
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from core.errors import ConfigError, FieldsyncError

__all__ = ["ConfigError"]


class RelayError(FieldsyncError):
    """Base class of every error raised by the relay package."""


@dataclass(frozen=True)
class RulesProblem:
    """One problem found in a rules file.

    ``rule`` is ``"bucket 'name'"`` (or ``"bucket #3"`` when the name itself is
    missing) followed by the table when the problem is inside one; empty for
    top-level problems.  ``key`` is the key path inside that scope
    (``filters[0].op``).
    """

    file: str
    rule: str
    key: str
    message: str

    def __str__(self) -> str:
        scope = f"{self.file}: {self.rule}: " if self.rule else f"{self.file}: "
        return f"{scope}{self.key} {self.message}" if self.key else f"{scope}{self.message}"


class RulesError(ConfigError):
    """The rules file is invalid.  ``problems`` lists every problem found, in file order."""

    def __init__(self, problems: Sequence[RulesProblem]) -> None:
        if not problems:
            raise ValueError("RulesError needs at least one problem")
        self.problems: tuple[RulesProblem, ...] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class StoreRulesMismatch(ConfigError):
    """The rules file places rows differently from the rules the bucket store was built
    with (relay/downstream/rules_placement.py).  ``changes`` lists each difference, one
    line each, naming the bucket rule, the table and the key."""

    def __init__(self, message: str, changes: Sequence[str]) -> None:
        self.changes: tuple[str, ...] = tuple(changes)
        super().__init__(message)


class KeyStoreError(ConfigError):
    """A keys or revocation file is invalid, or a key cannot do what is asked (e.g. sign)."""


class RowError(RelayError):
    """A row handed to the rules lacks a column that a rule needs to place it."""


class AuthError(RelayError):
    """Authentication failed: HTTP 401.  Subclasses fix ``code`` (stable, machine-readable)."""

    status: ClassVar[int] = 401
    code: ClassVar[str] = "unauthorized"

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)

    def to_dict(self) -> dict[str, dict[str, str | int]]:
        """The relay's one JSON error shape."""
        return {"error": {"code": self.code, "message": self.message, "status": self.status}}

    def headers(self) -> dict[str, str]:
        """HTTP headers to send with the error (RFC 6750 ``WWW-Authenticate`` on 401)."""
        if self.status != 401:
            return {}
        if self.code == TokenMissing.code:
            return {"WWW-Authenticate": 'Bearer realm="fieldsync"'}
        return {"WWW-Authenticate": 'Bearer realm="fieldsync", error="invalid_token"'}


class TokenMissing(AuthError):
    code = "token_missing"


class TokenMalformed(AuthError):
    code = "token_malformed"


class TokenAlgorithmRefused(AuthError):
    code = "token_alg_refused"


class TokenUnknownKey(AuthError):
    code = "token_unknown_key"


class TokenBadSignature(AuthError):
    code = "token_bad_signature"


class TokenExpired(AuthError):
    code = "token_expired"


class TokenNotYetValid(AuthError):
    code = "token_not_yet_valid"


class TokenWrongAudience(AuthError):
    code = "token_wrong_audience"


class TokenWrongIssuer(AuthError):
    code = "token_wrong_issuer"


class ForbiddenError(AuthError):
    """The caller is authenticated but not allowed: HTTP 403."""

    status = 403
    code = "forbidden"


class DeviceRevoked(ForbiddenError):
    code = "token_revoked"


class NotOwnDevice(ForbiddenError):
    code = "forbidden_device"


class StoreError(RelayError):
    """The bucket store failed (connection lost, schema newer than this code, bad input)."""


class LeadershipLost(StoreError):
    """The writer connection (and with it the engine's leadership lock) was lost."""


class EngineError(RelayError):
    """The bucket engine cannot go on (an event it cannot decode, a schema that never came)."""


class SourceUnreadable(RelayError):
    """The captured database cannot give the rows of a table the bucket engine asked it
    for (the table or a column is not there now, a value does not convert); the message
    names the table."""


class UploadError(RelayError):
    """A journal upload as a whole is unusable (HTTP 400): not a list of entries, a
    seq missing or out of order.  ``code`` is stable."""

    code = "bad_upload"
    status = 400


class BatchTooLarge(UploadError):
    """An upload holds more entries than allowed (HTTP 413): split it."""

    code = "batch_too_large"
    status = 413


class JournalStoreError(RelayError):
    """The relay's store database cannot be used for the journal tables right now."""


class BrokerUnavailable(RelayError):
    """The Kafka brokers cannot be read (unreachable, or a request failed); names them."""


class MetricsUnavailable(RelayError):
    """A relay's metrics endpoint (``GET /metrics``) cannot be read; names its URL."""


class ApplierError(RelayError):
    """The applier cannot go on (database unreachable, schema changed, Kafka down)."""


class ConflictNotFound(ApplierError):
    """No kept conflict has this id."""


class ResolveError(ApplierError):
    """A resolution is invalid (unknown choice, values for columns not in conflict)."""


class ResolveForbidden(ResolveError):
    """A device's resolution would write what its rules do not let it write (HTTP 403);
    ``code`` is the journal rejection reason: ``forbidden_row``, ``forbidden_column`` or
    ``forbidden_move``."""

    status = 403

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ConflictsError(ConfigError):
    """The conflicts file is invalid; ``problems`` lists every problem (file, table, key)."""

    def __init__(self, problems: Sequence[RulesProblem]) -> None:
        if not problems:
            raise ValueError("ConflictsError needs at least one problem")
        self.problems: tuple[RulesProblem, ...] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))
