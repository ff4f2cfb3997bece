"""Changes responses prepared whole: the body rendered and, when the client takes gzip,
compressed before the request that will carry it comes in.

A device catching up asks for page after page; between two requests it inflates and
parses the page it got.  The relay uses that time: the next page is read ahead
(relay/downstream/api_sync.py, :class:`~relay.downstream.api_sync.Prefetcher`) and made
here into the exact bytes of its response (:func:`prepare_changes`): the changes message
(relay/downstream/api_messages.py) serialized, and gzip-compressed with ISA-L's deflate
(``isal``: the same gzip format as zlib's, several times less CPU than zlib's level 1 for
a slightly smaller output).  The response (:meth:`PreparedChanges.response`) then carries
``Content-Encoding: gzip`` itself, so the app's gzip middleware passes it through
unchanged; a body below ``gzip_min_bytes`` or for a client that does not accept gzip is
sent as it is, as the middleware would have.

What a device receives does not change: the same JSON, compressed or not by the same
rules (``Accept-Encoding`` naming ``gzip``, at least ``gzip_min_bytes``); only the
compressor's output bytes differ, and any gzip reader inflates them to the same body.

Concurrency model: :func:`prepare_changes` runs on the event loop; a body of
:data:`THREAD_MIN_BYTES` or more is compressed in a worker thread (ISA-L releases the GIL),
so the loop goes on serving other requests meanwhile.  Everything else is pure.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Final

from fastapi.responses import Response
from isal import isal_zlib

from relay.downstream.api_messages import changes_message, dumps
from relay.downstream.bucket_store import OpsPage

THREAD_MIN_BYTES: Final = 128 * 1024
"""Bodies at least this large are compressed in a worker thread (as Starlette's gzip
middleware does for the responses it compresses)."""
_GZIP_WBITS: Final = 16 + isal_zlib.MAX_WBITS
"""A gzip header and trailer around the deflate stream."""


@dataclasses.dataclass(frozen=True, slots=True)
class PreparedChanges:
    """A changes response ready to send: what the handler needs of its page (how many
    ops, whether more wait, the cursors and epochs the next page is read from), the
    message's ``cursor``, and the body (``gzipped``: gzip-compressed).  The page's ops
    are not kept: a prepared page read ahead holds only its body."""

    op_count: int
    has_more: bool
    cursors: Mapping[str, int]
    epochs: Mapping[str, int]
    cursor: str
    body: bytes
    gzipped: bool

    def response(self) -> Response:
        """The HTTP response; a gzipped body names its encoding (``Vary`` as the gzip
        middleware sets it), so the middleware leaves it as it is."""
        headers = {"Content-Encoding": "gzip", "Vary": "Accept-Encoding"} if self.gzipped else {}
        return Response(self.body, media_type="application/json", headers=headers)


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether a request's ``Accept-Encoding`` takes gzip (the gzip middleware's test)."""
    return "gzip" in accept_encoding


def gzip_level(level: int) -> int:
    """ISA-L's level for a zlib-style ``level`` (1..9): ISA-L has levels 0..3."""
    return max(0, min(level, isal_zlib.ISAL_BEST_COMPRESSION))


def gzip_bytes(body: bytes, level: int) -> bytes:
    """``body`` as one gzip member (ISA-L deflate at :func:`gzip_level` of ``level``)."""
    compressor = isal_zlib.compressobj(gzip_level(level), isal_zlib.DEFLATED, _GZIP_WBITS)
    return compressor.compress(body) + compressor.flush()


async def prepare_changes(
    page: OpsPage, dropped: Sequence[str], gzip: bool, min_bytes: int, level: int
) -> PreparedChanges:
    """The response of ``page`` (and ``dropped``): gzip-compressed when ``gzip`` and the
    body has at least ``min_bytes``, at zlib-style ``level``."""
    message = changes_message(page, dropped)
    body = dumps(message)
    zipped = gzip and len(body) >= min_bytes
    if zipped and len(body) >= THREAD_MIN_BYTES:
        body = await asyncio.to_thread(gzip_bytes, body, level)
    elif zipped:
        body = gzip_bytes(body, level)
    return PreparedChanges(
        page.op_count,
        page.has_more,
        dict(page.cursors),
        dict(page.epochs),
        str(message["cursor"]),
        body,
        zipped,
    )
