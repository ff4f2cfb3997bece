"""pytest plugin: a TCP proxy on loopback that tests can cut, pause and resume.

``tcp_proxy(target_host, target_port)`` returns a :class:`TcpProxy`.  Threads:
one acceptor, two pumps per connection.  ``cut()`` closes every live connection
(both sides) at once; ``refuse()`` makes new connections close immediately
(a network partition); ``allow()`` heals it.  ``cut_mid(...)`` arms a one-shot cut
inside a transfer: the next chunk of at least ``min_chunk`` bytes going one way on a
connection whose current HTTP request starts with a given prefix (``b"POST
/v1/journal"``: mid-upload; ``b"GET /v1/changes"`` going downstream: mid-download) is
forwarded only in part, then that connection is closed; the returned :class:`MidCut`
says when and where it happened.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

UPSTREAM = "upstream"
"""Client to server (requests, uploads)."""
DOWNSTREAM = "downstream"
"""Server to client (responses, downloads)."""
_METHODS = (b"GET ", b"POST ", b"PUT ", b"PATCH ", b"DELETE ", b"HEAD ", b"OPTIONS ")


@dataclass
class _Conn:
    """The client side of one proxied connection: the request line it sent last."""

    request: bytes = b""


@dataclass
class MidCut:
    """A one-shot cut inside a transfer (see the module docstring)."""

    direction: str
    request: bytes
    min_chunk: int
    rng: random.Random
    fired: threading.Event = field(default_factory=threading.Event)
    request_line: str = ""
    chunk_bytes: int = 0
    forwarded_bytes: int = 0
    at: float = 0.0

    def matches(self, direction: str, conn: _Conn, size: int) -> bool:
        return (
            direction == self.direction
            and conn.request.startswith(self.request)
            and size >= self.min_chunk
        )

    def describe(self) -> str:
        what = "upload" if self.direction == UPSTREAM else "download"
        return (
            f"cut mid-{what} of {self.request_line!r}: {self.forwarded_bytes} of a "
            f"{self.chunk_bytes}-byte chunk passed"
        )


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port: int = self._listener.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._refusing = False
        self._closed = False
        self._mid_cuts: list[MidCut] = []
        self.bytes_forwarded = 0
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._refusing:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            conn = _Conn()
            for a, b, direction in ((client, upstream, UPSTREAM), (upstream, client, DOWNSTREAM)):
                threading.Thread(
                    target=self._pump, args=(a, b, direction, conn), daemon=True
                ).start()

    def _take_cut(self, direction: str, conn: _Conn, size: int) -> MidCut | None:
        with self._lock:
            for cut in self._mid_cuts:
                if cut.matches(direction, conn, size):
                    self._mid_cuts.remove(cut)
                    return cut
        return None

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str, conn: _Conn) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if direction == UPSTREAM and data.startswith(_METHODS):
                    conn.request = data.split(b"\r\n", 1)[0]
                cut = self._take_cut(direction, conn, len(data)) if self._mid_cuts else None
                if cut is not None:
                    n = cut.rng.randint(1, len(data) - 1)
                    dst.sendall(data[:n])
                    cut.request_line = conn.request.decode("latin-1")
                    cut.chunk_bytes, cut.forwarded_bytes = len(data), n
                    cut.at = time.monotonic()
                    cut.fired.set()
                    break  # finally: both sockets of this connection closed
                dst.sendall(data)
                self.bytes_forwarded += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()

    def cut(self) -> None:
        """Close every live connection."""
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def refuse(self) -> None:
        """Partition: cut live connections and drop new ones until allow()."""
        self._refusing = True
        self.cut()

    def allow(self) -> None:
        self._refusing = False

    def cut_mid(
        self,
        direction: str,
        request: bytes,
        *,
        min_chunk: int = 2,
        rng: random.Random | None = None,
    ) -> MidCut:
        """Arm a one-shot cut inside the next matching transfer (module docstring)."""
        if min_chunk < 2:
            raise ValueError("min_chunk must be at least 2 bytes (a chunk is cut inside)")
        cut = MidCut(direction, request, min_chunk, rng or random.Random())
        with self._lock:
            self._mid_cuts.append(cut)
        return cut

    def disarm(self) -> list[MidCut]:
        """Drop the cuts armed that have not fired; returns them."""
        with self._lock:
            left, self._mid_cuts = self._mid_cuts, []
        return left

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        self.cut()


@pytest.fixture
def tcp_proxy() -> Iterator[Callable[[str, int], TcpProxy]]:
    proxies: list[TcpProxy] = []

    def make(host: str, port: int) -> TcpProxy:
        p = TcpProxy(host, port)
        proxies.append(p)
        return p

    yield make
    for p in proxies:
        p.close()
