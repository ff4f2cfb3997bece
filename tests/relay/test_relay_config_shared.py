"""One relay config file, one registry: it serves `relay run` and `relay applier`."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc.pipeline import kafka_options
from cdc.settings import load_cdc_settings
from core.errors import ConfigError
from core.kafka_options import has_bootstrap_timeout
from core.settings_docs import generated_markers
from relay.settings import (
    DOCS_BLOCK,
    JOURNAL_DOCS_BLOCK,
    RELAY_REGISTRY,
    load_applier_settings,
    load_relay_settings,
    render_docs_block,
    render_example,
    render_journal_docs_block,
)
from tests.schemas import REPO


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


def test_the_applier_needs_the_captured_database_relay_run_does_not(tmp_path: Path) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text('[relay]\ntopic_prefix = "fsx"\n')
    assert load_relay_settings(cfg, {}).captured_dsn() is None
    with pytest.raises(ConfigError, match=r"relay\.toml: the applier needs the captured database"):
        load_applier_settings(cfg, {})
    env = {"FIELDSYNC_RELAY_SOURCE_DSN": "postgresql://u@127.0.0.1/app"}
    assert load_applier_settings(cfg, env).captured_dsn() == ("postgresql://u@127.0.0.1/app", None)


def test_both_processes_check_journal_keys_with_the_same_message(tmp_path: Path) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text('[journal]\ndsn = "postgresql://u@127.0.0.1/app"\nshards = 0\n')
    messages = set()
    for load in (load_relay_settings, load_applier_settings):
        with pytest.raises(ConfigError) as info:
            load(cfg, {})
        messages.add(str(info.value))
    assert messages == {f"{cfg}: journal.shards: 0 must be > 0"}


def test_an_entry_limit_kafka_cannot_take_is_refused(tmp_path: Path) -> None:
    """An entry goes to ``_journal`` as one Kafka record: a ``max_entry_bytes`` over 1 MiB let
    the relay accept entries its producer refused, answered 503 at every upload (the device
    uploaded the entry again for ever)."""
    cfg = tmp_path / "relay.toml"
    cfg.write_text("[journal]\nmax_entry_bytes = 2000000\n")
    with pytest.raises(ConfigError, match=r"journal\.max_entry_bytes: .*at most 1000000"):
        load_relay_settings(cfg, {})
    cfg.write_text("[journal]\nmax_entry_bytes = 1000000\n")
    assert load_relay_settings(cfg, {}).journal.max_entry_bytes == 1_000_000


@settings(max_examples=40, deadline=None)
@given(
    servers=st.lists(st.sampled_from(["a:1", "b.example:9092", "10.0.0.1:19092"]), min_size=1),
    timeout_s=st.floats(min_value=0.01, max_value=600),
    protocol=st.sampled_from(["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]),
    cafile=st.sampled_from(["", "/etc/ca.pem"]),
)
def test_relay_and_cdc_reach_kafka_with_the_same_client_options(
    servers: list[str], timeout_s: float, protocol: str, cafile: str
) -> None:
    shared = {
        "BOOTSTRAP_SERVERS": ", ".join(servers),
        "TIMEOUT_S": repr(timeout_s),
        "SECURITY_PROTOCOL": protocol,
        "SASL_USERNAME": "u",
        "SASL_PASSWORD": "p",
        "SSL_CAFILE": cafile,
    }
    relay = load_relay_settings(None, {f"FIELDSYNC_RELAY_KAFKA_{k}": v for k, v in shared.items()})
    cdc = load_cdc_settings(None, {f"FIELDSYNC_KAFKA_{k}": v for k, v in shared.items()})
    kw = relay.kafka_client_kwargs()
    assert kw == kafka_options(cdc).client_kwargs()
    assert kw["bootstrap_servers"] == servers
    if has_bootstrap_timeout():  # the first broker connection is bounded too, not 30 s
        assert kw["bootstrap_timeout_ms"] == int(timeout_s * 1000)


def _generated(doc: str, block: str) -> str:
    begin, end = generated_markers(block)
    return (REPO / "docs" / doc).read_text().split(begin)[1].split(end)[0].strip("\n") + "\n"


def test_generated_docs_are_up_to_date() -> None:
    hint = "run `python -m relay.settings write`"
    assert _generated("relay.md", DOCS_BLOCK) == render_docs_block(), hint
    assert _generated("journal.md", JOURNAL_DOCS_BLOCK) == render_journal_docs_block(), hint
    for section in RELAY_REGISTRY.sections.values():
        block = _generated(
            "journal.md" if section.name == "journal" else "relay.md",
            JOURNAL_DOCS_BLOCK if section.name == "journal" else DOCS_BLOCK,
        )
        for s in section.settings:
            assert RELAY_REGISTRY.env_var(section.name, s.name) in block


def test_example_toml_loads_to_the_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text(render_example())
    cfg.chmod(0o600)
    assert load_relay_settings(cfg, {}) == RELAY_REGISTRY.defaults()
