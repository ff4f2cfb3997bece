"""Minimal sd_notify(3) client, without dependencies.

Protocol: under a ``Type=notify`` unit, systemd passes ``NOTIFY_SOCKET``, the
address of an ``AF_UNIX`` ``SOCK_DGRAM`` socket: a filesystem path
(``/run/systemd/notify``) or, when it starts with ``@``, a name in the abstract
namespace (sent with a leading NUL byte).  The service sends datagrams of
newline-separated ``KEY=value`` assignments:

* ``READY=1``: start-up finished (systemd then considers the unit started);
* ``STATUS=...``: one line of free text shown by ``systemctl status``;
* ``WATCHDOG=1``: keep-alive; with ``WatchdogSec=`` systemd sets ``WATCHDOG_USEC``
  (and ``WATCHDOG_PID``, the process meant to ping) and kills and restarts a
  service that stays silent longer;
* ``STOPPING=1`` / ``RELOADING=1``: shutdown / reload began (``RELOADING``
  carries ``MONOTONIC_USEC``, which newer systemd versions require);
* ``EXTEND_TIMEOUT_USEC=...``: ask for more time to start or stop.

With ``NotifyAccess=main`` only the main process may send.  When
``NOTIFY_SOCKET`` is unset (not under systemd) every call is a no-op that
returns False.  A failed send is logged, never raised: notification must not
crash the daemon.

Concurrency: a :class:`Notifier` may be used from several threads (for
example a watchdog thread beside the main loop); the socket is created once
under a lock and each message is a single ``sendto``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

__all__ = ["Notifier", "notify_address", "watchdog_interval"]


def notify_address(value: str | None) -> bytes | None:
    """The socket address of a ``NOTIFY_SOCKET`` value, or None if unset or unsupported.

    ``/path`` is a filesystem socket, ``@name`` an abstract one (``b"\\0name"``).
    Other forms (``vsock:``, relative paths) are not supported and give None.
    """
    if not value:
        return None
    if value.startswith("/"):
        return os.fsencode(value)
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    log.warning(
        "NOTIFY_SOCKET=%r is not a supported address; systemd notifications disabled", value
    )
    return None


def watchdog_interval(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC``, or None.

    None when the watchdog is off, the value is invalid, or ``WATCHDOG_PID`` is
    set and names another process than *pid* (default: this process).
    """
    env = os.environ if environ is None else environ
    usec_text = env.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    pid_text = env.get("WATCHDOG_PID")
    if pid_text:
        try:
            meant_for = int(pid_text)
        except ValueError:
            log.warning("ignoring invalid WATCHDOG_PID=%r", pid_text)
            return None
        if meant_for != (os.getpid() if pid is None else pid):
            return None
    try:
        usec = int(usec_text)
    except ValueError:
        log.warning("ignoring invalid WATCHDOG_USEC=%r", usec_text)
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


def _one_line(text: str) -> str:
    """One line without NUL bytes: systemd splits on newlines and drops a message with a NUL."""
    return " ".join(text.replace("\0", " ").splitlines())


class Notifier:
    """Sends sd_notify messages to *address* (see :func:`notify_address`); None disables it."""

    def __init__(self, address: bytes | None, *, watchdog_s: float | None = None) -> None:
        self.address = address
        self._watchdog_s = watchdog_s
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._failing = False

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, unset_environment: bool = False
    ) -> Notifier:
        """A notifier for ``NOTIFY_SOCKET`` and the watchdog settings of *environ* (default os.environ).

        With *unset_environment*, remove ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and
        ``WATCHDOG_PID`` from ``os.environ`` so child processes do not inherit them.
        """
        env = os.environ if environ is None else environ
        notifier = cls(notify_address(env.get("NOTIFY_SOCKET")), watchdog_s=watchdog_interval(env))
        if unset_environment:
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(name, None)
        return notifier

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notification socket."""
        return self.address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half the timeout), or None if no watchdog."""
        return self._watchdog_s if self.enabled else None

    # -- messages ------------------------------------------------------------

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *self._status(status))

    def status(self, text: str) -> bool:
        return self.notify(*self._status(text))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *self._status(status))

    def reloading(self, status: str | None = None) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *self._status(status))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask systemd for *seconds* more to finish starting or stopping."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}")

    @staticmethod
    def _status(text: str | None) -> tuple[str, ...]:
        return () if text is None else (f"STATUS={_one_line(text)}",)

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` *assignments* as one datagram; True if it was sent.

        Never raises for a send failure: it is logged (once per run of
        failures, then at debug level) and False is returned.
        """
        if self.address is None or not assignments:
            return False
        for item in assignments:
            if "=" not in item or "\n" in item or "\0" in item:
                raise ValueError(f"not a single-line KEY=value assignment: {item!r}")
        # "replace": a lone surrogate in a status text must not raise.
        payload = "\n".join(assignments).encode("utf-8", "replace")
        try:
            self._socket().sendto(payload, self.address)
        except OSError as exc:
            level = logging.DEBUG if self._failing else logging.WARNING
            self._failing = True
            log.log(level, "sd_notify to %r failed (%s): %s", self.address, assignments[0], exc)
            return False
        if self._failing:
            log.info("sd_notify to %r works again", self.address)
            self._failing = False
        return True

    def _socket(self) -> socket.socket:
        with self._lock:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            return self._sock

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
