"""Tests of core.settings_registry (generic) and cdc.settings (the cdc daemon's settings)."""

from __future__ import annotations

import dataclasses
import logging
import os
import string
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc.settings import (
    CDC_REGISTRY,
    DOCS_BLOCK,
    CdcSettings,
    load_cdc_settings,
    render_docs_block,
    render_example,
)
from core.errors import ConfigError
from core.settings_checks import redact_dsn
from core.settings_docs import generated_markers, replace_generated_block
from core.settings_registry import Registry, Section, Setting
from core.settings_types import toml_literal
from tests.schemas import CONFIG, REPO


def write(tmp_path: Path, text: str, name: str = "cdc.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o600)
    return path


def load_text(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> CdcSettings:
    return load_cdc_settings(write(tmp_path, text), environ or {})


def config_error(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, environ)
    return str(info.value)


# ---------------------------------------------------------------------------
# Defaults and typed access
# ---------------------------------------------------------------------------


def test_defaults_match_the_contract() -> None:
    s = load_cdc_settings(None, {})
    assert dataclasses.asdict(s.postgres) == {
        "dsn": "postgresql://postgres@127.0.0.1:5432/postgres",
        "password": None,
        "slot": "fieldsync",
        "publication": "fieldsync",
        "tables": [],
        "snapshot": "initial",
        "proto_version": 0,
        "streaming": True,
        "status_interval_s": 10.0,
        "heartbeat_interval_s": 30.0,
        "signal_table": "fieldsync.cdc_signals",
    }
    assert dataclasses.asdict(s.kafka) == {
        "bootstrap_servers": "127.0.0.1:9092",
        "topic_prefix": "fieldsync",
        "transactional_id": "",
        "topic_partitions": 1,
        "max_message_bytes": 8388608,
        "compression": "gzip",
        "batch_max_events": 5000,
        "batch_max_ms": 50,
        "timeout_s": 30.0,
        "security_protocol": "PLAINTEXT",
        "sasl_mechanism": "PLAIN",
        "sasl_username": None,
        "sasl_password": None,
        "ssl_cafile": None,
    }
    assert dataclasses.asdict(s.cdc) == {
        "spill_dir": "",
        "log_level": "INFO",
        "log_format": "text",
        "retry_backoff_initial_s": 0.5,
        "retry_backoff_max_s": 30.0,
        "state_dir": "",
        "resnapshot_on_ddl": True,
        "resnapshot_chunk_rows": 1024,
        "ddl_check_interval_s": 10.0,
        "metrics_listen": "127.0.0.1:9187",
        "slot_check_interval_s": 10.0,
        "slot_wal_warn_share": 0.8,
    }
    assert s == CDC_REGISTRY.defaults()


def test_file_values_are_typed(tmp_path: Path) -> None:
    s = load_text(
        tmp_path,
        """
        [postgres]
        dsn = "host=db port=5433 dbname=app user=cdc"
        slot = "orders_1"
        tables = ["public.orders", "sites"]
        snapshot = "never"
        proto_version = 4
        streaming = false
        status_interval_s = 2          # an integer is accepted for a number
        heartbeat_interval_s = 0

        [kafka]
        bootstrap_servers = "k1:9092,k2:9092"
        compression = "none"
        batch_max_ms = 0
        security_protocol = "SASL_SSL"
        sasl_mechanism = "SCRAM-SHA-512"
        sasl_username = "cdc"
        sasl_password = "pw"

        [cdc]
        log_level = "DEBUG"
        """,
    )
    assert s.postgres.dsn == "host=db port=5433 dbname=app user=cdc"
    assert s.postgres.tables == ["public.orders", "sites"]
    assert (s.postgres.snapshot, s.postgres.proto_version, s.postgres.streaming) == (
        "never",
        4,
        False,
    )
    assert s.postgres.status_interval_s == 2.0 and isinstance(s.postgres.status_interval_s, float)
    assert s.postgres.heartbeat_interval_s == 0.0
    assert (s.kafka.compression, s.kafka.batch_max_ms, s.kafka.sasl_password) == ("none", 0, "pw")
    assert s.cdc.log_level == "DEBUG"
    assert s.postgres.password is None  # untouched settings keep their defaults


def test_settings_are_frozen() -> None:
    s = load_cdc_settings(None, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.postgres.slot = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.kafka = s.kafka  # type: ignore[misc]


def test_list_defaults_are_not_shared_between_loads() -> None:
    first = load_cdc_settings(None, {})
    first.postgres.tables.append("public.x")
    assert load_cdc_settings(None, {}).postgres.tables == []


def test_effective_transactional_id() -> None:
    assert load_cdc_settings(None, {}).effective_transactional_id == "fieldsync-cdc-fieldsync"
    s = load_cdc_settings(None, {"FIELDSYNC_KAFKA_TRANSACTIONAL_ID": "mine"})
    assert s.effective_transactional_id == "mine"


# ---------------------------------------------------------------------------
# Unknown sections and keys
# ---------------------------------------------------------------------------


def test_unknown_section_names_file_and_suggests(tmp_path: Path) -> None:
    message = config_error(tmp_path, "[kafak]\nbootstrap_servers = 'x:1'\n")
    assert str(tmp_path / "cdc.toml") in message
    assert "unknown section [kafak]" in message
    assert "did you mean [kafka]?" in message


def test_unknown_key_names_file_and_suggests(tmp_path: Path) -> None:
    message = config_error(tmp_path, "[kafka]\nbootstrap_server = 'x:1'\n")
    assert str(tmp_path / "cdc.toml") in message
    assert "kafka.bootstrap_server" in message
    assert "did you mean kafka.bootstrap_servers?" in message


def test_key_in_the_wrong_section_says_where_it_belongs(tmp_path: Path) -> None:
    message = config_error(tmp_path, "[kafka]\nslot = 'x'\n")
    assert "unknown setting kafka.slot" in message
    assert "belongs in [postgres]" in message


def test_top_level_key_is_rejected(tmp_path: Path) -> None:
    message = config_error(tmp_path, "dsn = 'postgresql://h/db'\n")
    assert "top-level key 'dsn'" in message
    assert "[postgres]" in message


def test_nested_table_is_an_unknown_key(tmp_path: Path) -> None:
    message = config_error(tmp_path, "[postgres.extra]\nx = 1\n")
    assert "unknown setting postgres.extra" in message


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    message = config_error(tmp_path, "postgres = 'x'\n")
    assert "[postgres] must be a table" in message


@settings(max_examples=50, deadline=None)
@given(key=st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=20))
def test_any_unknown_key_is_named(tmp_path_factory: pytest.TempPathFactory, key: str) -> None:
    if CDC_REGISTRY.sections["postgres"].get(key) is not None:
        return
    path = write(tmp_path_factory.mktemp("cfg"), f"[postgres]\n{key} = 1\n")
    with pytest.raises(ConfigError) as info:
        load_cdc_settings(path, {})
    assert f"postgres.{key}" in str(info.value)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------
# Wrong types, choices, validation
# ---------------------------------------------------------------------------


def test_wrong_type_names_file_key_expected_and_given(tmp_path: Path) -> None:
    message = config_error(tmp_path, "[postgres]\nstatus_interval_s = 'ten'\n")
    assert str(tmp_path / "cdc.toml") in message
    assert "postgres.status_interval_s" in message
    assert "expected number" in message
    assert 'got string "ten"' in message


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("proto_version = true", "expected integer, got boolean true"),
        ("proto_version = 1.5", "expected integer, got float 1.5"),
        ("streaming = 1", "expected boolean, got integer 1"),
        ("streaming = 'yes'", 'expected boolean, got string "yes"'),
        ("tables = 'public.orders'", "expected list of strings, got string"),
        ("tables = ['a', 1]", "expected list of strings, got array"),
        ("slot = 7", "expected string, got integer 7"),
        ("status_interval_s = true", "expected number, got boolean"),
        ("status_interval_s = inf", "must be a finite number"),
        ("status_interval_s = nan", "must be a finite number"),
    ],
)
def test_wrong_types_are_rejected(tmp_path: Path, line: str, expected: str) -> None:
    message = config_error(tmp_path, f"[postgres]\n{line}\n")
    assert expected in message
    assert f"postgres.{line.split()[0]}" in message


def test_value_outside_choices_lists_them(tmp_path: Path) -> None:
    message = config_error(tmp_path, "[kafka]\ncompression = 'zstd'\n")
    assert "kafka.compression" in message
    assert '"none", "gzip"' in message
    assert "'zstd'" in message


def test_choice_in_wrong_case_gets_a_hint(tmp_path: Path) -> None:
    message = config_error(tmp_path, "[cdc]\nlog_level = 'info'\n")
    assert 'did you mean "INFO"?' in message


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[postgres]\nslot = 'Fieldsync'", "postgres.slot", "not a valid replication slot name"),
        ("[postgres]\nslot = ''", "postgres.slot", "not a valid replication slot name"),
        (f"[postgres]\nslot = '{'a' * 64}'", "postgres.slot", "not a valid replication slot name"),
        ("[postgres]\nslot = 'bad-slot'", "postgres.slot", "not a valid replication slot name"),
        ("[postgres]\npublication = ''", "postgres.publication", "must not be empty"),
        (f"[postgres]\npublication = '{'p' * 64}'", "postgres.publication", "longer than 63 bytes"),
        ("[postgres]\ntables = ['a.b.c']", "postgres.tables", "'a.b.c'"),
        ("[postgres]\ntables = ['public.']", "postgres.tables", "'public.'"),
        ("[postgres]\ntables = ['t', 't']", "postgres.tables", "twice"),
        ("[postgres]\nproto_version = 5", "postgres.proto_version", "1..4"),
        ("[postgres]\nproto_version = -1", "postgres.proto_version", "1..4"),
        ("[postgres]\nstatus_interval_s = 0", "postgres.status_interval_s", "must be > 0"),
        ("[postgres]\nheartbeat_interval_s = -1", "postgres.heartbeat_interval_s", "must be >= 0"),
        ("[postgres]\nsnapshot = 'always'", "postgres.snapshot", '"initial", "never"'),
        ("[kafka]\nbatch_max_events = 0", "kafka.batch_max_events", "must be > 0"),
        ("[kafka]\nbatch_max_ms = -5", "kafka.batch_max_ms", "must be >= 0"),
        ("[kafka]\ntimeout_s = 0.0", "kafka.timeout_s", "must be > 0"),
        ("[kafka]\nbootstrap_servers = ''", "kafka.bootstrap_servers", "host:port"),
        ("[kafka]\nbootstrap_servers = 'a:1,,b:2'", "kafka.bootstrap_servers", "host:port"),
        ("[kafka]\ntopic_prefix = ''", "kafka.topic_prefix", "topic characters"),
        ("[kafka]\ntopic_prefix = 'my topics'", "kafka.topic_prefix", "topic characters"),
        ("[kafka]\ntopic_prefix = 'fs.'", "kafka.topic_prefix", "'.'"),
        ("[kafka]\ntopic_prefix = '__fs'", "kafka.topic_prefix", "'__'"),
        (f"[kafka]\ntopic_prefix = '{'t' * 122}'", "kafka.topic_prefix", "longer than 121"),
        ("[kafka]\nsecurity_protocol = 'TLS'", "kafka.security_protocol", '"SASL_SSL"'),
        ("[kafka]\nsasl_mechanism = 'GSSAPI'", "kafka.sasl_mechanism", '"SCRAM-SHA-256"'),
        ("[cdc]\nretry_backoff_initial_s = 0", "cdc.retry_backoff_initial_s", "must be > 0"),
        ("[cdc]\nretry_backoff_initial_s = 60", "cdc.retry_backoff_max_s", "must not exceed"),
        ("[cdc]\nmetrics_listen = '9187'", "cdc.metrics_listen", "not host:port"),
        ("[cdc]\nslot_check_interval_s = 0", "cdc.slot_check_interval_s", "must be > 0"),
        ("[cdc]\nslot_wal_warn_share = 0", "cdc.slot_wal_warn_share", "above 0 and at most 1"),
        ("[cdc]\nslot_wal_warn_share = 1.5", "cdc.slot_wal_warn_share", "above 0 and at most 1"),
    ],
)
def test_invalid_values_are_rejected(tmp_path: Path, text: str, key: str, reason: str) -> None:
    message = config_error(tmp_path, text + "\n")
    assert key in message
    assert reason in message
    assert str(tmp_path / "cdc.toml") in message


def test_valid_edge_values_are_accepted(tmp_path: Path) -> None:
    s = load_text(
        tmp_path,
        f"""
        [postgres]
        slot = "{"a" * 63}"
        proto_version = 1
        [kafka]
        topic_prefix = "{"t" * 121}"
        bootstrap_servers = "[::1]:9092, k2:9093"
        [cdc]
        retry_backoff_initial_s = 30
        """,
    )
    assert len(s.postgres.slot) == 63
    assert len(s.kafka.topic_prefix) == 121
    assert s.cdc.retry_backoff_initial_s == s.cdc.retry_backoff_max_s


def test_sasl_needs_credentials(tmp_path: Path) -> None:
    message = config_error(tmp_path, "[kafka]\nsecurity_protocol = 'SASL_PLAINTEXT'\n")
    assert "kafka.sasl_username and kafka.sasl_password" in message
    env = {"FIELDSYNC_KAFKA_SASL_USERNAME": "u", "FIELDSYNC_KAFKA_SASL_PASSWORD": "p"}
    s = load_text(tmp_path, "[kafka]\nsecurity_protocol = 'SASL_PLAINTEXT'\n", env)
    assert (s.kafka.sasl_username, s.kafka.sasl_password) == ("u", "p")


def test_invalid_dsn_is_rejected_without_showing_it(tmp_path: Path) -> None:
    message = config_error(tmp_path, "[postgres]\ndsn = 'cdc:hunter2@db/app'\n")
    assert "postgres.dsn" in message
    assert "not a libpq connection string" in message
    assert "hunter2" not in message


# ---------------------------------------------------------------------------
# Secrets
# ---------------------------------------------------------------------------

# Upper case after a "Z", so that a secret can never be a word of the message itself.
secret_text = st.text(alphabet=string.ascii_uppercase + string.digits, min_size=8, max_size=30).map(
    "Z".__add__
)


@settings(max_examples=40, deadline=None)
@given(secret=secret_text, key=st.sampled_from(["postgres.password", "kafka.sasl_password"]))
def test_wrong_type_of_secret_is_never_echoed(
    tmp_path_factory: pytest.TempPathFactory, secret: str, key: str
) -> None:
    section, name = key.split(".")
    path = write(tmp_path_factory.mktemp("cfg"), f'[{section}]\n{name} = ["{secret}"]\n')
    with pytest.raises(ConfigError) as info:
        load_cdc_settings(path, {})
    message = str(info.value)
    assert key in message and "expected string" in message
    assert secret not in message


@settings(max_examples=60, deadline=None)
@given(
    user=st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=8),
    secret=secret_text,
)
def test_redact_dsn_masks_passwords(user: str, secret: str) -> None:
    for dsn in (
        f"postgresql://{user}:{secret}@db.example:5432/app",
        f"postgres://{user}:{secret}@h1:5432,h2:5433/app?sslmode=require",
        f"postgresql://{user}@db/app?password={secret}&sslmode=require",
        f"host=db user={user} password={secret} dbname=app",
        f"host=db user={user} password = '{secret} x' dbname=app",
    ):
        redacted = redact_dsn(dsn)
        assert secret not in redacted, dsn
        assert "***" in redacted
        assert user in redacted


def test_redact_dsn_keeps_dsn_without_password() -> None:
    dsn = "postgresql://postgres@127.0.0.1:5432/postgres"
    assert redact_dsn(dsn) == dsn
    assert redact_dsn("postgresql://host:5432/db") == "postgresql://host:5432/db"
    assert redact_dsn("not a dsn with hunter2") == "***"


def test_redacted_masks_secrets() -> None:
    s = load_cdc_settings(
        None,
        {
            "FIELDSYNC_POSTGRES_PASSWORD": "pg-secret",
            "FIELDSYNC_POSTGRES_DSN": "postgresql://cdc:dsn-secret@db/app",
            "FIELDSYNC_KAFKA_SASL_USERNAME": "cdc",
        },
    )
    red = s.redacted()
    assert red["postgres"]["password"] == "***"
    assert red["postgres"]["dsn"] == "postgresql://cdc:***@db/app"
    assert red["kafka"]["sasl_password"] is None  # unset stays visible as unset
    assert red["kafka"]["sasl_username"] == "cdc"
    assert red["kafka"]["batch_max_events"] == 5000
    assert "secret" not in repr(red)
    assert set(red) == {"postgres", "kafka", "cdc"}


def test_world_readable_file_with_secret_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, "[postgres]\npassword = 'pw-in-file'\n")
    caplog.set_level(logging.WARNING, logger="core.settings_registry")
    load_cdc_settings(path, {})
    assert not caplog.records
    path.chmod(0o644)
    load_cdc_settings(path, {})
    assert any("postgres.password" in r.getMessage() for r in caplog.records)
    assert all("pw-in-file" not in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------


def test_environment_overrides_file(tmp_path: Path) -> None:
    s = load_text(
        tmp_path,
        "[kafka]\nbootstrap_servers = 'file:9092'\nbatch_max_events = 10\n",
        {
            "FIELDSYNC_KAFKA_BOOTSTRAP_SERVERS": "env1:9092,env2:9092",
            "FIELDSYNC_POSTGRES_PASSWORD": "pw",
            "FIELDSYNC_POSTGRES_TABLES": " public.orders, ,sites ",
            "FIELDSYNC_POSTGRES_PROTO_VERSION": "2",
            "FIELDSYNC_POSTGRES_STATUS_INTERVAL_S": "2.5",
            "FIELDSYNC_CDC_LOG_LEVEL": "WARNING",
        },
    )
    assert s.kafka.bootstrap_servers == "env1:9092,env2:9092"
    assert s.kafka.batch_max_events == 10  # from the file
    assert s.postgres.password == "pw"
    assert s.postgres.tables == ["public.orders", "sites"]
    assert s.postgres.proto_version == 2
    assert s.postgres.status_interval_s == 2.5
    assert s.cdc.log_level == "WARNING"


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("TRUE", True), ("1", True), ("yes", True), (" Yes ", True),
     ("false", False), ("False", False), ("0", False), ("no", False), ("NO", False)],
)  # fmt: skip
def test_environment_booleans(text: str, value: bool) -> None:
    assert (
        load_cdc_settings(None, {"FIELDSYNC_POSTGRES_STREAMING": text}).postgres.streaming is value
    )


@pytest.mark.parametrize(
    ("var", "text", "expected"),
    [
        ("FIELDSYNC_POSTGRES_STREAMING", "maybe", "expected boolean, got 'maybe'"),
        ("FIELDSYNC_POSTGRES_PROTO_VERSION", "two", "expected integer, got 'two'"),
        ("FIELDSYNC_POSTGRES_PROTO_VERSION", "", "expected integer, got ''"),
        ("FIELDSYNC_POSTGRES_PROTO_VERSION", "9", "1..4"),
        ("FIELDSYNC_KAFKA_TIMEOUT_S", "inf", "finite"),
        ("FIELDSYNC_KAFKA_COMPRESSION", "lz4", '"none", "gzip"'),
        ("FIELDSYNC_POSTGRES_SLOT", "Bad Slot", "replication slot name"),
    ],
)
def test_environment_errors_name_the_variable(var: str, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_cdc_settings(None, {var: text})
    message = str(info.value)
    assert f"environment variable {var}" in message
    assert expected in message


def test_environment_secret_errors_hide_the_value() -> None:
    with pytest.raises(ConfigError) as info:
        load_cdc_settings(None, {"FIELDSYNC_POSTGRES_DSN": "user:hunter2@db"})
    assert "FIELDSYNC_POSTGRES_DSN" in str(info.value)
    assert "hunter2" not in str(info.value)


def test_empty_environment_value_unsets_optional_settings() -> None:
    s = load_cdc_settings(
        None, {"FIELDSYNC_KAFKA_SSL_CAFILE": "", "FIELDSYNC_POSTGRES_PASSWORD": "  "}
    )
    assert s.kafka.ssl_cafile is None and s.postgres.password is None
    assert load_cdc_settings(None, {"FIELDSYNC_CDC_SPILL_DIR": ""}).cdc.spill_dir == ""
    assert load_cdc_settings(None, {"FIELDSYNC_POSTGRES_TABLES": ""}).postgres.tables == []


def test_unknown_variable_of_known_section_warns(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="core.settings_registry")
    s = load_cdc_settings(
        None,
        {
            "FIELDSYNC_POSTGRES_TABLZ": "x",
            "FIELDSYNC_RELAY_LISTEN": "0.0.0.0:8080",  # another component's section: silent
            "FIELDSYNC_POSTGRES_SLOT": "s1",
            "PATH": "/usr/bin",
        },
    )
    assert s.postgres.slot == "s1"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1, messages
    assert "FIELDSYNC_POSTGRES_TABLZ" in messages[0]
    assert "FIELDSYNC_POSTGRES_TABLES" in messages[0]


def test_os_environ_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIELDSYNC_POSTGRES_SLOT", "from_os_environ")
    assert load_cdc_settings(None).postgres.slot == "from_os_environ"


def test_error_after_environment_mentions_it() -> None:
    with pytest.raises(ConfigError) as info:
        load_cdc_settings(None, {"FIELDSYNC_CDC_RETRY_BACKOFF_MAX_S": "0.1"})
    assert "FIELDSYNC_CDC_RETRY_BACKOFF_MAX_S" in str(info.value)
    assert "cdc.retry_backoff_initial_s" in str(info.value)


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="configuration file not found") as info:
        load_cdc_settings(tmp_path / "nope.toml", {})
    assert "nope.toml" in str(info.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_cdc_settings(tmp_path, {})


def test_invalid_toml_names_file_and_line(tmp_path: Path) -> None:
    message = config_error(tmp_path, "[postgres]\nslot = \n")
    assert str(tmp_path / "cdc.toml") in message
    assert "invalid TOML" in message and "line 2" in message


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "cdc.toml"
    path.write_bytes(b"[postgres]\nslot = '\xff'\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_cdc_settings(path, {})


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "")
    path.chmod(0)
    if os.geteuid() == 0:
        # root reads any file: make the open itself fail as it does for other users
        real_open = Path.open

        def denied(self: Path, *args: Any, **kwargs: Any) -> Any:
            if self == path:
                raise PermissionError(13, "Permission denied", str(self))
            return real_open(self, *args, **kwargs)

        monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(ConfigError, match="permission denied"):
        load_cdc_settings(path, {})


# ---------------------------------------------------------------------------
# Generated artefacts
# ---------------------------------------------------------------------------


def test_docs_are_up_to_date() -> None:
    doc = (REPO / "docs" / "configuration.md").read_text()
    expected = replace_generated_block(doc, DOCS_BLOCK, render_docs_block())
    assert doc == expected, "docs/configuration.md is stale: run `python -m cdc.settings write`"
    begin, end = generated_markers(DOCS_BLOCK)
    block = doc.split(begin)[1].split(end)[0]
    for section in CDC_REGISTRY.sections.values():
        for s in section.settings:
            assert f"`{s.name}`" in block
            assert CDC_REGISTRY.env_var(section.name, s.name) in block


def test_example_toml_is_up_to_date_and_loads_to_the_defaults() -> None:
    path = CONFIG / "cdc.example.toml"
    assert path.read_text() == render_example(), "run `python -m cdc.settings write`"
    assert load_cdc_settings(path, {}) == load_cdc_settings(None, {})
    data = tomllib.loads(path.read_text())
    for section in CDC_REGISTRY.sections.values():
        written = set(data[section.name])
        expected = {s.name for s in section.settings if not (s.optional or s.secret)}
        assert written == expected
        for s in section.settings:
            assert f"{s.name} = " in path.read_text()  # optional ones appear commented out


def test_markdown_escapes_pipes_and_marks_secrets() -> None:
    registry = _tiny_registry(help_text="a | b")
    table = registry_markdown(registry)
    assert "a \\| b" in table
    assert "**Secret**" in table


def test_replace_generated_block_needs_markers() -> None:
    with pytest.raises(ValueError, match="no generated block"):
        replace_generated_block("no markers here", "x", "content")
    begin, end = generated_markers("x")
    out = replace_generated_block(f"a\n{begin}\nold\n{end}\nb\n", "x", "new")
    assert out == f"a\n{begin}\n\nnew\n\n{end}\nb\n"


# ---------------------------------------------------------------------------
# The generic registry
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Tiny:
    path: Path
    token: str | None
    level: int


@dataclasses.dataclass(frozen=True)
class _TinySettings:
    agent: _Tiny


def _tiny_registry(help_text: str = "Where.") -> Registry[_TinySettings]:
    return Registry(
        "tiny",
        _TinySettings,
        [
            Section(
                "agent",
                _Tiny,
                (
                    Setting("path", Path, Path("/var/lib/x"), help_text),
                    Setting("token", str, None, "Token.", secret=True, env="TINY_TOKEN"),
                    Setting("level", int, 1, "Level.", choices=(1, 2, 3)),
                ),
            )
        ],
    )


def registry_markdown(registry: Registry[Any]) -> str:
    from core.settings_docs import render_markdown

    return render_markdown(registry)


def test_parser_types_and_env_aliases() -> None:
    registry = _tiny_registry()
    assert registry.defaults().agent.path == Path("/var/lib/x")
    loaded = registry.load_data(
        {"agent": {"path": "/tmp/y", "level": 3}}, source="t.toml", environ={"TINY_TOKEN": "tok"}
    )
    assert loaded.agent == _Tiny(Path("/tmp/y"), "tok", 3)
    both = {"TINY_TOKEN": "alias", "FIELDSYNC_AGENT_TOKEN": "canonical"}
    assert registry.load_data({}, source="t", environ=both).agent.token == "canonical"
    with pytest.raises(ConfigError, match=r"agent\.level: 4 is not one of: 1, 2, 3"):
        registry.load_data({"agent": {"level": 4}}, source="t", environ={})


def test_a_loader_check_runs_after_the_registry_and_names_the_source() -> None:
    registry = _tiny_registry()

    def needs_token(loaded: _TinySettings) -> None:
        if loaded.agent.token is None:
            raise ValueError("this process needs agent.token")

    with pytest.raises(ConfigError) as info:
        registry.load_data({"agent": {"level": 2}}, source="t.toml", environ={}, check=needs_token)
    assert str(info.value) == "t.toml: this process needs agent.token"
    loaded = registry.load_data({}, source="t", environ={"TINY_TOKEN": "x"}, check=needs_token)
    assert loaded.agent.token == "x"
    assert registry.load_data({}, source="t", environ={}).agent.token is None  # no check


def test_model_must_match_settings() -> None:
    @dataclasses.dataclass(frozen=True)
    class Wrong:
        path: str  # the setting is a Path
        token: str | None
        level: int

    with pytest.raises(TypeError, match="annotated"):
        Section(
            "agent",
            Wrong,
            (
                Setting("path", Path, Path("/"), "h"),
                Setting("token", str, None, "h"),
                Setting("level", int, 1, "h"),
            ),
        )
    with pytest.raises(TypeError, match="do not match"):
        Section("agent", _Tiny, (Setting("path", Path, Path("/"), "h"),))

    @dataclasses.dataclass
    class NotFrozen:
        level: int

    with pytest.raises(TypeError, match="frozen dataclass"):
        Section("agent", NotFrozen, (Setting("level", int, 1, "h"),))


def test_bad_definitions_fail_at_import_time() -> None:
    with pytest.raises(ValueError, match="default 'zstd' is not one of"):
        Setting("compression", str, "zstd", "h", choices=("none", "gzip"))
    with pytest.raises(ValueError, match="must match"):
        Setting("Bad-Name", str, "", "h")
    with pytest.raises(TypeError, match="unsupported setting type"):
        Setting("x", 3, 3, "h")


@settings(max_examples=200, deadline=None)
@given(
    value=st.one_of(
        st.text(alphabet=st.characters(blacklist_categories=["Cs"])),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.booleans(),
        st.lists(st.text(alphabet=st.characters(blacklist_categories=["Cs"])), max_size=4),
    )
)
def test_toml_literal_round_trips(value: Any) -> None:
    parsed = tomllib.loads(f"x = {toml_literal(value)}\n")["x"]
    assert parsed == value
    assert type(parsed) is type(value)


def test_closest_match_prefers_a_close_spelling_then_a_case_variant() -> None:
    from core.settings_checks import close_match_hint, closest_match

    assert closest_match("metrcs_listen", ["metrics_listen", "log_level"]) == "metrics_listen"
    assert closest_match("LOG", ["log", "dsn"]) == "log"
    assert closest_match("zzz", ["log", "dsn"]) is None
    assert close_match_hint("LOG", ["log", "dsn"]) == " (did you mean 'log'?)"
    assert close_match_hint("zzz", ["log"]) == ""
