"""core.kafka_options: the one builder of kafka-python connection options."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError

from core.kafka_options import client_config, has_bootstrap_timeout, is_kafka_error, within_timeout

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
hosts = st.from_regex(r"[a-z][a-z0-9.-]{0,20}:[1-9][0-9]{0,4}", fullmatch=True)


@settings(max_examples=60, deadline=None)
@given(
    servers=st.lists(hosts, min_size=1, max_size=4),
    spaces=st.sampled_from(["", " ", "  "]),
    timeout_s=st.floats(min_value=0.001, max_value=3600),
    protocol=st.sampled_from(PROTOCOLS),
    cafile=st.none() | st.just("/etc/ca.pem"),
)
def test_client_config_carries_every_setting(
    servers: list[str], spaces: str, timeout_s: float, protocol: str, cafile: str | None
) -> None:
    text = ("," + spaces).join(servers)
    kw = client_config(
        text,
        timeout_s=timeout_s,
        security_protocol=protocol,
        sasl_mechanism="SCRAM-SHA-256",
        sasl_username="u",
        sasl_password="p",
        ssl_cafile=cafile,
    )
    assert kw["bootstrap_servers"] == servers
    assert kw["security_protocol"] == protocol
    assert kw["request_timeout_ms"] == int(timeout_s * 1000)
    # kafka-python 3 waits 30 s for a first broker unless told: the same timeout bounds it
    assert kw.get("bootstrap_timeout_ms") == (
        int(timeout_s * 1000) if has_bootstrap_timeout() else None
    )
    sasl = {
        "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "u",
        "sasl_plain_password": "p",
    }
    if protocol.startswith("SASL_"):
        assert {k: kw[k] for k in sasl} == sasl
    else:
        assert not sasl.keys() & kw.keys()
    assert kw.get("ssl_cafile") == cafile


def test_every_option_is_known_to_every_client() -> None:
    kw = client_config(
        "h:1",
        timeout_s=1,
        security_protocol="SASL_SSL",
        sasl_username="u",
        sasl_password="p",
        ssl_cafile="/ca.pem",
    )
    for cls in (KafkaProducer, KafkaConsumer, KafkaAdminClient):
        assert set(kw) <= set(cls.DEFAULT_CONFIG), cls.__name__


def test_kafka_errors_are_told_from_others() -> None:
    assert is_kafka_error(KafkaError("x"))
    assert is_kafka_error(KafkaConnectionError())
    assert is_kafka_error(KafkaTimeoutError())
    assert not is_kafka_error(OSError("connection refused"))
    assert not is_kafka_error(ValueError("x"))


@settings(max_examples=60, deadline=None)
@given(
    configured_s=st.floats(min_value=0.5, max_value=600),
    bound_s=st.floats(min_value=0.001, max_value=600),
)
def test_within_timeout_never_waits_longer_than_its_bound(
    configured_s: float, bound_s: float
) -> None:
    kw = client_config("k:9092", timeout_s=configured_s)
    bounded = within_timeout(kw, bound_s)
    limit = max(1000, int(bound_s * 1000))
    assert bounded["request_timeout_ms"] == min(int(configured_s * 1000), limit)
    assert bounded["bootstrap_servers"] == ["k:9092"]
    assert kw["request_timeout_ms"] == int(configured_s * 1000)  # the caller's dict is not changed
    if has_bootstrap_timeout():
        assert bounded["bootstrap_timeout_ms"] == min(int(configured_s * 1000), limit)
    else:
        assert "bootstrap_timeout_ms" not in bounded
