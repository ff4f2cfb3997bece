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

Runs on the event loop like every uvicorn protocol; only the extension factory differs.
"""

from __future__ import annotations

import logging
from typing import Any, Final

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.server import ServerProtocol

WINDOW_BITS: Final = 12
"""LZ77 window of each message's compressor (and the client's), 4 KiB."""
MEM_LEVEL: Final = 5
"""zlib's memLevel of the per-message compressor."""


class CompactWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, deflate without context takeover."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.config.ws_per_message_deflate:
            self.conn = ServerProtocol(
                extensions=[
                    ServerPerMessageDeflateFactory(
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
