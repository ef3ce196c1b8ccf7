"""TURN credentials a home peer hands to the UAs it serves, in the 200 to their REGISTER.

The header (a private extension, hence ``P-``)::

    P-P2PSIP-TURN: <turn:HOST:PORT?transport=udp>;username="EXPIRY:USER";password="...";expires=SECONDS

names the peer's TURN server (RFC 7065 URI) and a time-limited long-term credential
(:func:`p2psip.turn.issue_credentials`); ``expires`` is how long the credential stays valid from the
response on. A UA keeps the newest grant of its registration and uses it for the relayed candidate of
each call's ICE (:func:`p2psip.callaudio.ice_by_default`); every re-REGISTER brings a fresh one. Who gets
one, and why only a digest-authenticated registration does: docs/nat.md, docs/security.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2psip.address import format_hostport, split_hostport
from p2psip.errors import P2PSIPError
from p2psip.uri import Address

__all__ = ["TURN_HEADER", "TurnGrant"]

TURN_HEADER = "P-P2PSIP-TURN"


@dataclass(frozen=True)
class TurnGrant:
    """A TURN server and the credential to use it until ``until`` (wall-clock seconds)."""

    host: str
    port: int
    username: str
    password: str
    until: float

    def header(self, now: float) -> str:
        """The header value, with ``expires`` counted from ``now``."""
        uri = f"turn:{format_hostport(self.host, self.port)}?transport=udp"
        expires = max(0, int(self.until - now))
        return f'<{uri}>;username="{self.username}";password="{self.password}";expires={expires}'

    @classmethod
    def parse(cls, value: str, now: float) -> TurnGrant | None:
        """The grant in a header value, or None when it is malformed (ignored: no relayed candidate)."""
        try:
            address = Address(value)
            text = str(address.uri)
            if not text.startswith("turn:"):
                return None
            hostport, _, query = text[5:].partition("?")
            if query and query != "transport=udp":
                return None
            host, port = split_hostport(hostport, "TURN server", default_port=3478, numeric=True)
            params = address.params
            username = (params.get("username") or "").strip('"')
            password = (params.get("password") or "").strip('"')
            expires = params.get("expires") or ""
        except (P2PSIPError, ValueError):
            return None
        if not username or not password or not expires.isdigit() or port is None or port == 0:
            return None
        return cls(host, port, username, password, now + int(expires))
