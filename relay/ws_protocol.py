"""The relay's WebSocket protocol for uvicorn: permessage-deflate with a small footprint.

uvicorn's own (``websockets-sansio``) keeps, per connection, a zlib compressor with a
4 KiB window and ``memLevel`` 5 and a decompressor with a 4 KiB window for as long as the
connection lives (context takeover): about 40 KiB of every idle stream's memory, most of
a stream's cost.  :class:`CompactWebSocketProtocol` negotiates permessage-deflate with
:data:`WINDOW_BITS` and :data:`MEM_LEVEL` instead, and no context takeover on either
side, so an idle stream holds no zlib state at all: each message is compressed on its
own (the device API's messages are self-contained JSON; a page of ops compresses about as
well on its own) and each client message is inflated on its own.  A client that does not
offer permessage-deflate gets plain frames, as before.

A message shorter than :data:`MIN_COMPRESS_BYTES` (the HTTP API's default
``gzip_min_bytes``) is sent as a plain frame even when deflate was negotiated (RFC 7692
lets a sender leave any message uncompressed: RSV1 unset): a changes message of a few
ops is a few hundred bytes, which deflate shrinks by a few dozen while setting up its
compressor costs more than the rest of the send; a fan-out sends one such message to
every device at once.

Runs on the event loop like every uvicorn protocol; only the extension factory differs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Final

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.extensions.base import Extension
from websockets.extensions.permessage_deflate import (
    PerMessageDeflate,
    ServerPerMessageDeflateFactory,
)
from websockets.frames import CTRL_OPCODES, Frame, Opcode
from websockets.server import ServerProtocol
from websockets.typing import ExtensionParameter

WINDOW_BITS: Final = 12
"""LZ77 window of each message's compressor (and the client's), 4 KiB."""
MEM_LEVEL: Final = 5
"""zlib's memLevel of the per-message compressor."""
MIN_COMPRESS_BYTES: Final = 1024
"""Shorter messages go out uncompressed (as the HTTP API's default ``gzip_min_bytes``)."""


class SmallPlainDeflate(PerMessageDeflate):
    """permessage-deflate that sends a message shorter than :data:`MIN_COMPRESS_BYTES`
    (whole, in one frame) uncompressed; everything else as :class:`PerMessageDeflate`."""

    def encode(self, frame: Frame) -> Frame:
        if (
            frame.fin
            and frame.opcode is not Opcode.CONT
            and frame.opcode not in CTRL_OPCODES
            and len(frame.data) < MIN_COMPRESS_BYTES
        ):
            return frame
        return super().encode(frame)


class SmallPlainDeflateFactory(ServerPerMessageDeflateFactory):
    """Negotiates like :class:`ServerPerMessageDeflateFactory`; the extension it returns
    is a :class:`SmallPlainDeflate` with the negotiated parameters."""

    def process_request_params(
        self, params: Sequence[ExtensionParameter], accepted_extensions: Sequence[Extension]
    ) -> tuple[list[ExtensionParameter], PerMessageDeflate]:
        answer, ext = super().process_request_params(params, accepted_extensions)
        return answer, SmallPlainDeflate(
            ext.remote_no_context_takeover,
            ext.local_no_context_takeover,
            ext.remote_max_window_bits,
            ext.local_max_window_bits,
            ext.compress_settings,
        )


class CompactWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, deflate without context takeover."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.config.ws_per_message_deflate:
            self.conn = ServerProtocol(
                extensions=[
                    SmallPlainDeflateFactory(
                        server_no_context_takeover=True,
                        client_no_context_takeover=True,
                        server_max_window_bits=WINDOW_BITS,
                        client_max_window_bits=WINDOW_BITS,
                        compress_settings={"memLevel": MEM_LEVEL},
                        require_client_max_window_bits=False,
                    )
                ],
                max_size=self.config.ws_max_size,
                logger=logging.getLogger("uvicorn.error"),
            )
