"""A device for the pipeline tests, in the test's process: the agent (``Agent``, fast
retries) and an app's plain sqlite3 connection on one database, registered with the
relay of a running :func:`tests.pipeline.pipeline_stack.services`; and the rules that
give every device all rows of some tables.

:meth:`LocalDevice.sync_until` syncs until a state holds (never for a duration)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

from device_agent.client import RelayClient, RetryPolicy
from device_agent.sync import Agent, init_database
from relay.auth import issue_token
from relay.auth_keys import KeyStore

FAST = RetryPolicy(attempts=8, initial_s=0.05, max_s=0.5)


def all_rows_rules(tables: Sequence[str]) -> str:
    """Rules of one global bucket holding every row and column of ``tables``."""
    return '[[bucket]]\nname = "all"\n' + "".join(
        f'[[bucket.table]]\ntable = "{t}"\n' for t in tables
    )


class LocalDevice:
    """Device ``name`` (no claims) with its database in ``tmp_path``."""

    wait_s = 1.0
    """How long each sync's long-poll may wait for news."""

    def __init__(self, url: str, keys: KeyStore, tmp_path: Path, name: str = "dev-1") -> None:
        self.name = name
        self.db = str(tmp_path / f"{name}.db")
        token = issue_token(keys, None, name, {}, 3600)
        init_database(self.db, url, token, client=RelayClient(url, token, retry=FAST))
        self.agent = Agent(self.db, retry=FAST)
        self.app = sqlite3.connect(self.db, isolation_level=None, timeout=30)

    def close(self) -> None:
        self.app.close()
        self.agent.close()

    def sync(self) -> None:
        """One sync round (subclasses may take an expected error)."""
        self.agent.sync_once(wait_s=self.wait_s)

    def sync_until(self, done: Callable[[], bool], what: str, rounds: int = 300) -> None:
        for _ in range(rounds):
            self.sync()
            if done():
                return
        raise AssertionError(f"{self.name}: no {what} after {rounds} syncs")
