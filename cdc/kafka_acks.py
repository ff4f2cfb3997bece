"""The Kafka sink's records refused: a record over the producer's ``max_request_size`` on
the path without bulk batches (:func:`send_one`), and the acknowledgements of a
transaction's records (:func:`acknowledgement_error`): a batch the broker refused as too
large is a :class:`RecordTooLarge` (it would be refused at every try, never skipped), any
other failure a :class:`SinkUnavailable` (retried).

Concurrency: called from the sink's thread and its committer thread, one at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from cdc.errors import RecordTooLarge, SinkError, SinkUnavailable
from cdc.resume_position import ResumePosition

__all__ = ["acknowledgement_error", "send_one", "too_large_refusal"]

Headers = Sequence[tuple[str, bytes]]


def too_large_refusal(exc: BaseException | None) -> bool:
    """Whether the broker refused a batch as too large (MESSAGE_TOO_LARGE,
    RECORD_LIST_TOO_LARGE): the same batch would be refused again, so it is not retried."""
    from kafka.errors import MessageSizeTooLargeError, RecordListTooLargeError

    return isinstance(exc, (MessageSizeTooLargeError, RecordListTooLargeError))


def send_one(
    producer: Any,
    topic: str,
    key: bytes | None,
    value: bytes | None,
    headers: Headers,
    too_large: Callable[..., RecordTooLarge],
) -> Any:
    """``producer.send`` of one record (the path without bulk batches); a record over the
    producer's ``max_request_size`` is a :class:`RecordTooLarge` naming its row, not an
    unreachable broker retried for ever."""
    from kafka.errors import MessageSizeTooLargeError

    try:
        return producer.send(topic, key=key, value=value, headers=list(headers))
    except MessageSizeTooLargeError as exc:
        size = len(key or b"") + len(value or b"") + sum(len(h) + len(v) for h, v in headers)
        raise too_large(topic, key, value, headers, size) from exc


def acknowledgement_error(
    futures: Sequence[Any], position: ResumePosition, timeout_s: float, limit: int
) -> SinkError | None:
    """The error of the first record of ``futures`` not acknowledged (SinkUnavailable), or
    refused by the broker as too large (RecordTooLarge: it would be refused again)."""
    for future in futures:
        if not future.is_done:
            return SinkUnavailable(
                f"records of the Kafka transaction ending at {position} were not "
                f"acknowledged within {timeout_s:g}s"
            )
        if future.failed() and too_large_refusal(future.exception):
            return RecordTooLarge(
                f"the broker refused records of the Kafka transaction ending at {position} "
                f"as too large ({future.exception}): raise the broker's message.max.bytes or "
                f"the topics' max.message.bytes to kafka.max_message_bytes "
                f"({limit}), or lower that"
            )
        if future.failed():
            return SinkUnavailable(
                f"records of the Kafka transaction ending at {position} were "
                f"refused: {future.exception}"
            )
    return None
