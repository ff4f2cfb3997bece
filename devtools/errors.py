"""Exceptions raised by the devtools package (embedded services, demo, ``fieldsync up``).

::

    core.errors.FieldsyncError
    └── DevtoolsError
        └── ServiceError     an embedded PostgreSQL or broker failed to start (shows its log)

Library and subprocess failures are converted at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations

from core.errors import FieldsyncError


class DevtoolsError(FieldsyncError):
    """Base class of every error raised by the devtools package."""


class ServiceError(DevtoolsError):
    """A local service (embedded PostgreSQL, broker) failed to start; the message shows the
    tail of its log."""
