"""Optional encryption at rest: the device database as a SQLCipher file.

SQLCipher (the ``sqlcipher3-binary`` wheel: SQLite with AES-256 page encryption)
encrypts every page of the database file, its WAL and its journal; nothing of a row is
readable without the key.  The key never lives in the database file.  Where it comes
from, in this order (:func:`find_key`):

1. the environment variable :data:`KEY_ENV` (``DEVICE_AGENT_DB_KEY``);
2. a key file: ``--key-file PATH`` or the environment variable :data:`KEY_FILE_ENV`
   (``DEVICE_AGENT_DB_KEY_FILE``); the file must not be readable by group or others;
3. the OS keyring (``keyring``: Secret Service, macOS Keychain, Windows Credential
   Locker), service :data:`KEYRING_SERVICE`, user name = the database's absolute path.

A database is recognised as encrypted when its first 16 bytes are not SQLite's header
(:func:`is_encrypted`).  Apps that write the database directly must then open it with
SQLCipher and the same key (``PRAGMA key``); the journal triggers work the same.

Thread-safety: the functions are pure apart from reading the environment, the key
file and the keyring.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path
from typing import Any, Final, cast

from device_agent.errors import EncryptionError

KEY_ENV: Final = "DEVICE_AGENT_DB_KEY"
KEY_FILE_ENV: Final = "DEVICE_AGENT_DB_KEY_FILE"
KEYRING_SERVICE: Final = "fieldsync-device-agent"
SQLITE_HEADER: Final = b"SQLite format 3\x00"


def available() -> bool:
    """Whether SQLCipher can be used here."""
    try:
        import sqlcipher3  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return False
    return True


def is_encrypted(path: str | Path) -> bool:
    """True for an existing, non-empty file that does not start with SQLite's header."""
    p = Path(path)
    if not p.exists() or p.stat().st_size == 0:
        return False
    with p.open("rb") as fh:
        return fh.read(16) != SQLITE_HEADER


def read_key_file(path: str | Path) -> str:
    p = Path(path)
    try:
        mode = p.stat().st_mode
        text = p.read_text().strip()
    except OSError as exc:
        raise EncryptionError(f"cannot read the key file {p}: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise EncryptionError(f"the key file {p} is readable by other users; chmod 600 {p}")
    if not text:
        raise EncryptionError(f"the key file {p} is empty")
    return text


def keyring_key(db_path: str | Path) -> str | None:
    try:
        import keyring
        from keyring.errors import KeyringError
    except ImportError:
        return None
    try:
        value = keyring.get_password(KEYRING_SERVICE, str(Path(db_path).resolve()))
    except (KeyringError, RuntimeError):
        return None
    return value


def store_in_keyring(db_path: str | Path, key: str) -> None:
    try:
        import keyring
        from keyring.errors import KeyringError
    except ImportError as exc:
        raise EncryptionError("the keyring package is not installed") from exc
    try:
        keyring.set_password(KEYRING_SERVICE, str(Path(db_path).resolve()), key)
    except (KeyringError, RuntimeError) as exc:
        raise EncryptionError(f"the OS keyring refused the key: {exc}") from exc


def find_key(
    db_path: str | Path, key_file: str | Path | None = None, env: dict[str, str] | None = None
) -> str | None:
    """The database key from the environment, a key file or the keyring; None if none."""
    environ = os.environ if env is None else env
    if environ.get(KEY_ENV):
        return environ[KEY_ENV]
    chosen = key_file or environ.get(KEY_FILE_ENV)
    if chosen:
        return read_key_file(chosen)
    return keyring_key(db_path)


def connect_encrypted(path: str, key: str) -> sqlite3.Connection:
    """Open (or create) a SQLCipher database with ``key``; :class:`EncryptionError` if the
    key is wrong or SQLCipher is missing."""
    try:
        import sqlcipher3
    except ImportError as exc:
        raise EncryptionError(
            "this database is encrypted (or encryption was asked for) but SQLCipher is not "
            "installed: pip install sqlcipher3-binary"
        ) from exc
    conn: Any = sqlcipher3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(key_pragma(key))
    try:
        conn.execute("select count(*) from sqlite_master").fetchone()
    except sqlcipher3.DatabaseError as exc:
        conn.close()
        raise EncryptionError(
            f"cannot open {path}: the encryption key is wrong (or the file is not a database)"
        ) from exc
    return cast(sqlite3.Connection, conn)


def key_pragma(key: str) -> str:
    """The ``PRAGMA key`` statement an app runs to open the database with ``key``."""
    return "pragma key = '" + key.replace("'", "''") + "'"
