"""One bucket engine in a process of its own, for the crash tests (killed with SIGKILL).

    python -m tests.relay.downstream.engine_proc STORE_DSN BOOTSTRAP PREFIX RULES CATALOG_DSN \
        SHARES SHARE

``SHARE`` is a share number or ``any``.  Runs :meth:`BucketEngine.run` until SIGTERM.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any

from relay.downstream.bucket_engine import BucketEngine
from relay.downstream.pg_bucket_store import PgBucketStore
from relay.downstream.rules_parser import load_rules
from relay.downstream.table_infos import table_infos_from_catalog


def main(argv: list[str]) -> int:
    store_dsn, bootstrap, prefix, rules_path, catalog_dsn, shares, share = argv
    logging.basicConfig(level=logging.WARNING)
    rules = load_rules(rules_path, table_infos_from_catalog(catalog_dsn))
    store = PgBucketStore(store_dsn)
    engine = BucketEngine(
        store,
        rules,
        kafka={"bootstrap_servers": bootstrap},
        prefix=prefix,
        batch_max_events=7,
        standby_retry_s=0.2,
        topic_refresh_s=0.5,
        shares=int(shares),
        share=None if share == "any" else int(share),
    )

    def stop(_sig: int, _frame: Any) -> None:
        engine.request_stop()

    signal.signal(signal.SIGTERM, stop)
    try:
        engine.run()
    finally:
        engine.close()
        store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
