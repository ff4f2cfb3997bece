"""Checks shared by the log tests: the JSON line shape and the absence of planted secrets."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

REQUIRED = ("time", "level", "logger", "message", "component")
LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


def json_lines(text: str, component: str) -> list[dict[str, Any]]:
    """Every non-empty line of *text* as a JSON object with the required keys, the time in
    ISO 8601 UTC and *component*; fails naming the first line that is not."""
    out: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise AssertionError(f"line {number} is not JSON ({exc}): {line!r}") from None
        assert isinstance(obj, dict), f"line {number}: {line!r}"
        missing = [k for k in REQUIRED if k not in obj]
        assert not missing, f"line {number} lacks {missing}: {line!r}"
        assert list(obj)[:5] == list(REQUIRED), f"line {number}: key order {list(obj)}"
        assert obj["time"].endswith("Z"), obj["time"]
        stamp = datetime.fromisoformat(obj["time"].replace("Z", "+00:00"))
        assert stamp.utcoffset() is not None and stamp.tzinfo is not None
        assert stamp.astimezone(UTC) == stamp
        assert obj["level"] in LEVELS, obj["level"]
        assert obj["component"] == component, f"line {number}: {line!r}"
        assert isinstance(obj["message"], str) and isinstance(obj["logger"], str)
        out.append(obj)
    return out


def assert_no_secrets(text: str, secrets: Iterable[str]) -> None:
    """None of *secrets* appears in *text* (nor its JSON-escaped form)."""
    for secret in secrets:
        escaped = json.dumps(secret)[1:-1]
        assert secret not in text and escaped not in text, f"secret {secret[:6]}… in the log"
