"""core.logs, core.log_context, core.redaction: the two log formats, context fields and
secret masking (pure units; the processes are checked in tests/cdc/test_cdc_logs.py and
tests/relay/test_relay_logs.py)."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc.settings import load_cdc_settings
from core.errors import ConfigError
from core.log_context import (
    CONTEXT_FIELDS,
    bind_log_context,
    current_log_context,
    log_context,
    set_process_log_context,
)
from core.logs import TEXT_FORMAT, make_handler
from core.redaction import (
    MASK,
    RedactingFilter,
    clear_hidden_secrets,
    hide_secrets,
    redact_text,
)
from relay.settings import load_relay_settings
from tests.core.log_support import assert_no_secrets, json_lines

# the format every process wrote before log_format existed; the text format keeps it
OLD_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@pytest.fixture(autouse=True)
def _clean_state() -> Iterator[None]:
    set_process_log_context()
    clear_hidden_secrets()
    yield
    set_process_log_context()
    clear_hidden_secrets()


class Captured:
    """A logger of its own writing through :func:`make_handler` into a string."""

    def __init__(self, fmt: str, component: str | None = "cdc") -> None:
        self.stream = io.StringIO()
        self.logger = logging.getLogger(f"fieldsync.test.{fmt}.{id(self)}")
        self.logger.propagate = False
        self.logger.setLevel(logging.DEBUG)
        self.handler = make_handler(fmt, component, stream=self.stream)
        self.logger.addHandler(self.handler)

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def close(self) -> None:
        self.logger.removeHandler(self.handler)


@pytest.fixture
def json_log() -> Iterator[Captured]:
    c = Captured("json")
    yield c
    c.close()


@pytest.fixture
def text_log() -> Iterator[Captured]:
    c = Captured("text")
    yield c
    c.close()


# ---------------------------------------------------------------------------- JSON shape


def test_json_lines_have_the_required_keys_and_context_only_when_set(json_log: Captured) -> None:
    log = json_log.logger
    log.info("plain %d", 1)
    with log_context(slot="fs_slot", table="public.orders"):
        log.warning("with table")
        with log_context(position="0/16B3748", table="public.parts"):
            log.error("inner")
        log.info("table back")
    log.debug("after")
    lines = json_lines(json_log.text, "cdc")
    assert [line["message"] for line in lines] == [
        "plain 1",
        "with table",
        "inner",
        "table back",
        "after",
    ]
    assert [line["level"] for line in lines] == ["INFO", "WARNING", "ERROR", "INFO", "DEBUG"]
    assert {line["logger"] for line in lines} == {log.name}
    context = [{k: line[k] for k in CONTEXT_FIELDS if k in line} for line in lines]
    assert context == [
        {},
        {"slot": "fs_slot", "table": "public.orders"},
        {"slot": "fs_slot", "table": "public.parts", "position": "0/16B3748"},
        {"slot": "fs_slot", "table": "public.orders"},
        {},
    ]
    assert all("exception" not in line for line in lines)


def test_json_exception_text_and_extra_context(json_log: Captured) -> None:
    try:
        raise RuntimeError("the broker went away")
    except RuntimeError:
        with log_context(table="public.a"):
            json_log.logger.exception("commit failed", extra={"table": "public.b"})
    (line,) = json_lines(json_log.text, "cdc")
    assert line["message"] == "commit failed"
    assert (
        "Traceback" in line["exception"]
        and "RuntimeError: the broker went away" in (line["exception"])
    )
    assert line["table"] == "public.b"  # the call's own extra wins over the context


def test_json_process_context_applies_in_every_thread(json_log: Captured) -> None:
    set_process_log_context(slot="fs_main")
    with log_context(device="tab-1"):
        thread = threading.Thread(target=lambda: json_log.logger.info("from a thread"))
        thread.start()
        thread.join()
        json_log.logger.info("from main")
    by_message = {line["message"]: line for line in json_lines(json_log.text, "cdc")}
    assert by_message["from a thread"]["slot"] == "fs_main"
    assert "device" not in by_message["from a thread"]  # a new thread has its own context
    assert by_message["from main"]["device"] == "tab-1"


def test_component_is_the_one_given() -> None:
    for component in ("cdc", "relay", "applier"):
        c = Captured("json", component)
        try:
            c.logger.info("x")
            assert json_lines(c.text, component)[0]["component"] == component
        finally:
            c.close()


def test_bound_context_stays_in_its_task(json_log: Captured) -> None:
    async def request(device: str, started: asyncio.Event, other: asyncio.Event) -> None:
        with log_context(request_id=f"req-{device}"):
            bind_log_context(device=device)
            started.set()
            await other.wait()
            json_log.logger.info("served %s", device)

    async def main() -> None:
        a, b = asyncio.Event(), asyncio.Event()
        await asyncio.gather(request("tab-1", a, b), request("tab-2", b, a))
        json_log.logger.info("outside")

    asyncio.run(main())
    lines = {line["message"]: line for line in json_lines(json_log.text, "cdc")}
    assert lines["served tab-1"]["device"] == "tab-1"
    assert lines["served tab-1"]["request_id"] == "req-tab-1"
    assert lines["served tab-2"]["device"] == "tab-2"
    assert lines["served tab-2"]["request_id"] == "req-tab-2"
    assert "device" not in lines["outside"] and "request_id" not in lines["outside"]
    assert current_log_context() == {}


def test_unknown_context_fields_are_refused() -> None:
    with pytest.raises(ValueError, match="tabel"), log_context(tabel="x"):
        pass
    with pytest.raises(ValueError, match="devcie"):
        bind_log_context(devcie="x")


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="xml"):
        make_handler("xml", "cdc")


# ---------------------------------------------------------------------------- text format


def test_text_format_is_unchanged(text_log: Captured) -> None:
    assert TEXT_FORMAT == OLD_TEXT_FORMAT
    reference = io.StringIO()
    plain = logging.StreamHandler(reference)
    plain.setFormatter(logging.Formatter(OLD_TEXT_FORMAT))
    text_log.logger.addHandler(plain)
    try:
        with log_context(device="tab-1", request_id="abc"):
            text_log.logger.info("served %s in %d ms", "/v1/changes", 12)
        try:
            raise KeyError("k")
        except KeyError:
            text_log.logger.exception("failed")
    finally:
        text_log.logger.removeHandler(plain)
    assert text_log.text == reference.getvalue()
    first = text_log.text.splitlines()[0]
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO fieldsync\.test\.text\.\d+: "
        r"served /v1/changes in 12 ms",
        first,
    ), first
    assert "tab-1" not in text_log.text  # context fields are for JSON only


# ---------------------------------------------------------------------------- secrets

SECRET = st.text(alphabet="abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789", min_size=8)


@settings(max_examples=60, deadline=None)
@given(secret=SECRET)
def test_secrets_are_masked_by_their_shape(secret: str) -> None:
    planted = "Zq" + secret  # no ordinary word of the surrounding text contains it
    cases = [
        f"connecting to postgresql://fieldsync:{planted}@db.example:5432/app failed",
        f"dsn host=db port=5432 user=u password={planted} dbname=app",
        f"dsn host=db password='{planted} x' dbname=app",
        f"< authorization: Bearer {planted}",
        f'"GET /v1/stream?cursor=abc&token={planted} HTTP/1.1" 401',
        f"Authorization: Basic {planted}==",
        f"got eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ0YWIifQ.{planted} in a message",
    ]
    for text in cases:
        masked = redact_text(text)
        assert planted not in masked, (text, masked)
        assert MASK in masked
        assert redact_text(masked) == masked  # idempotent


def test_ordinary_text_is_left_alone() -> None:
    for text in (
        "bearer token missing",
        "a basic check of the tokens table",
        "slot fieldsync confirmed at 0/16B3748",
        "re-snapshot of public.orders done: 12 row(s)",
    ):
        assert redact_text(text) == text


def test_registered_secrets_are_masked_wherever_they_appear(json_log: Captured) -> None:
    hide_secrets(["Kx9-hmac-secret-of-the-relay-keys-file", None, "ab", b"\xff\xfe"])
    hide_secrets([b"Pg-password-from-settings"])
    json_log.logger.error(
        "odd error: %s / %s / ab",
        "Kx9-hmac-secret-of-the-relay-keys-file",
        "Pg-password-from-settings",
    )
    (line,) = json_lines(json_log.text, "cdc")
    assert_no_secrets(
        json_log.text, ["Kx9-hmac-secret-of-the-relay-keys-file", "Pg-password-from-settings"]
    )
    assert line["message"] == "odd error: *** / *** / ab"  # too short to be matched literally


def test_exception_text_and_extras_are_masked(json_log: Captured, text_log: Captured) -> None:
    for captured in (json_log, text_log):
        try:
            raise ConnectionError("postgresql://u:Hunter2Hunter2@db/app refused")
        except ConnectionError:
            captured.logger.exception(
                "connect failed", extra={"table": "postgresql://u:Hunter2Hunter2@db/x"}
            )
        assert_no_secrets(captured.text, ["Hunter2Hunter2"])
        assert "postgresql://u:***@db/app refused" in captured.text


def test_a_record_is_masked_for_every_handler() -> None:
    """The filter changes the record itself, so other handlers (pytest's) see it masked."""
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s" %d', ("1.2.3.4", "/x?token=s3cr3tvalue", 200), None
    )  # fmt: skip
    assert RedactingFilter().filter(record)
    assert record.getMessage() == '1.2.3.4 - "/x?token=***" 200'


# ---------------------------------------------------------------------------- settings


def test_the_settings_name_their_secrets() -> None:
    """What the settings line hides is what every log line hides (hide_secrets)."""
    cdc = load_cdc_settings(
        None,
        {
            "FIELDSYNC_POSTGRES_DSN": "host=db user=u password=kv-Secret-1 dbname=app",
            "FIELDSYNC_POSTGRES_PASSWORD": "pg-Secret-2",
            "FIELDSYNC_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "FIELDSYNC_KAFKA_SASL_USERNAME": "cdc",
            "FIELDSYNC_KAFKA_SASL_PASSWORD": "sasl-Secret-3",
        },
    )
    assert sorted(cdc.secrets()) == ["kv-Secret-1", "pg-Secret-2", "sasl-Secret-3"]
    relay = load_relay_settings(
        None,
        {
            "FIELDSYNC_RELAY_STORE_DSN": "postgresql://relay:uri%40Secret-4@db/store",
            "FIELDSYNC_RELAY_STORE_PASSWORD": "store-Secret-5",
            "FIELDSYNC_JOURNAL_DSN": "postgresql://applier@db/app?password=q-Secret-6",
        },
    )
    assert sorted(relay.secrets()) == ["q-Secret-6", "store-Secret-5", "uri%40Secret-4"]
    assert load_cdc_settings(None, {}).secrets() == []


@pytest.mark.parametrize("value", ["text", "json"])
def test_log_format_is_read_from_file_and_environment(tmp_path: Path, value: str) -> None:
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'[cdc]\nlog_format = "{value}"\n')
    assert load_cdc_settings(cfg, {}).cdc.log_format == value
    assert load_cdc_settings(None, {"FIELDSYNC_CDC_LOG_FORMAT": value}).cdc.log_format == value
    cfg.write_text(f'[relay]\nlog_format = "{value}"\n')
    assert load_relay_settings(cfg, {}).relay.log_format == value
    env = {"FIELDSYNC_RELAY_LOG_FORMAT": value}
    assert load_relay_settings(None, env).relay.log_format == value
    assert load_cdc_settings(None, {}).cdc.log_format == "text"
    assert load_relay_settings(None, {}).relay.log_format == "text"


@pytest.mark.parametrize(
    ("section", "loader"), [("cdc", load_cdc_settings), ("relay", load_relay_settings)]
)
def test_a_wrong_log_format_names_the_key_with_a_hint(
    tmp_path: Path, section: str, loader: Callable[..., object]
) -> None:
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'[{section}]\nlog_format = "jsn"\n')
    with pytest.raises(ConfigError) as info:
        loader(cfg, {})
    message = str(info.value)
    assert f"{section}.log_format" in message and str(cfg) in message
    assert '"text", "json"' in message and 'did you mean "json"?' in message
    env = {f"FIELDSYNC_{section.upper()}_LOG_FORMAT": "XML"}
    with pytest.raises(ConfigError) as info:
        loader(None, env)
    assert f"FIELDSYNC_{section.upper()}_LOG_FORMAT" in str(info.value)
    assert f"{section}.log_format" in str(info.value)
