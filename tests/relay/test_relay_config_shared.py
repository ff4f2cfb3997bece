"""One relay config file serves `relay run` and `relay applier`."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConfigError
from relay.settings import load_relay_settings
from relay.upstream.applier_settings import load_applier_settings


def test_journal_section_is_accepted_by_relay_run_and_read_by_the_applier(tmp_path: Path) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text(
        '[relay]\ntopic_prefix = "fsx"\n[journal]\ndsn = "postgresql://u@127.0.0.1/app"\n'
    )
    assert load_relay_settings(cfg, {}).relay.topic_prefix == "fsx"
    assert load_applier_settings(cfg, {}).journal.dsn == "postgresql://u@127.0.0.1/app"


def test_other_unknown_sections_are_still_rejected(tmp_path: Path) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text("[relay]\n[jornal]\n")
    with pytest.raises(ConfigError, match="jornal"):
        load_relay_settings(cfg, {})
