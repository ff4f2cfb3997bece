"""Token claims that both the token check (:mod:`relay.auth`) and the bucket rules
(:mod:`relay.downstream.rules`) name: the JWT registered claims, and which of them is the
device id.  A rule may select buckets by any claim but the registered ones, ``sub`` excepted."""

from __future__ import annotations

from typing import Final

REGISTERED_CLAIMS: Final = frozenset({"iss", "sub", "aud", "exp", "nbf", "iat", "jti"})
"""JWT registered claims; of these only ``sub`` (the device id) may select buckets."""
DEVICE_CLAIM: Final = "sub"
