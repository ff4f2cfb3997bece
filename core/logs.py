"""Logging set-up shared by every fieldsync process.

One format for every component: ``time level logger: message`` on standard error.
kafka-python's own loggers are silenced (their connection chatter repeats what our
errors already say, with the broker named).
"""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str) -> None:
    """Configure the root logger at ``level`` (a name such as ``"INFO"``)."""
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
