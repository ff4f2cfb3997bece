"""Errors of the device agent, each with the CLI exit code it maps to (docs/device-agent.md).

::

    DeviceAgentError (1)
    ├── StateError (2)            the database is not initialized / is not usable as is
    ├── RelayUnreachable (3)      network down, relay not answering: the agent works offline
    │   └── WebSocketUnavailable (3)  the upgrade was refused (a proxy without WebSockets):
    │                                 ``sync --watch`` long-polls instead
    ├── AuthFailed (4)            the relay refused the token
    │   ├── TokenExpired (4)      get a new token
    │   └── TokenRevoked (4)      this device was revoked: get a new token
    ├── SchemaBlocked (5)         the server's schema changed and cannot be followed
    │   ├── MigrationWaits (5)    only for local edits to be synced (their outcomes):
    │   │                         each sync goes on with them; ``sync --watch`` waits
    │   └── KeyMismatch (5)       the relay sent a row named by another key than the
    │                             table's (its key changed; the relay has not caught up)
    ├── VerifyFailed (6)          checksums differ from the relay's
    ├── EncryptionError (7)       key missing or wrong, SQLCipher not available
    └── RelayRefused (1)          any other error answer of the relay (code, message)
"""

from __future__ import annotations


class DeviceAgentError(Exception):
    exit_code = 1


class StateError(DeviceAgentError):
    exit_code = 2


class RelayUnreachable(DeviceAgentError):
    exit_code = 3


class WebSocketUnavailable(RelayUnreachable):
    """The WebSocket upgrade got an HTTP answer that is not the relay's authentication error
    (e.g. 403/404/426 from a proxy that does not pass WebSockets)."""


class AuthFailed(DeviceAgentError):
    exit_code = 4


class TokenExpired(AuthFailed):
    pass


class TokenRevoked(AuthFailed):
    pass


class SchemaBlocked(DeviceAgentError):
    exit_code = 5


class MigrationWaits(SchemaBlocked):
    """The migration waits only for local edits of a table to be synced (a column removed
    while edits of the table are open): each sync uploads them and reads their outcomes,
    and the migration goes on once every one has its outcome, without anyone's action."""


class KeyMismatch(SchemaBlocked):
    """The relay sent a row of a table named by other key columns than the table's key in
    the relay's schema: the table's key changed on the server and the relay's schema or its
    rows do not follow yet (``table``: the relay's table name)."""

    def __init__(self, message: str, table: str) -> None:
        super().__init__(message)
        self.table = table


class VerifyFailed(DeviceAgentError):
    exit_code = 6


class EncryptionError(DeviceAgentError):
    exit_code = 7


class RelayRefused(DeviceAgentError):
    """The relay answered with an error (``code``, ``status``)."""

    def __init__(self, message: str, code: str = "", status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
