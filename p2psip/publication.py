"""Event state publication (RFC 3903 PUBLISH), sans-IO: what a presence agent keeps of what devices say.

An :class:`EventStateCompositor` holds, per address of record, the documents devices PUBLISHed, each under
an entity tag (``SIP-ETag``) with an expiry. :meth:`EventStateCompositor.publish` decides a PUBLISH:

* initial (no ``SIP-If-Match``): a body is required (400 without); it is stored under a new entity tag,
  replacing what the same device (the same source address) published before;
* refresh (``SIP-If-Match``, no body): the same document lives on, under a new entity tag;
* modify (``SIP-If-Match`` and a body): the document is replaced, new entity tag;
* remove (``SIP-If-Match`` and ``Expires: 0``): gone;
* an unknown or expired entity tag: 412 Conditional Request Failed; an event package it does not keep:
  489 with ``Allow-Events``; an Expires below the minimum: 423 with ``Min-Expires``; a body of another type:
  415 with ``Accept``; a body the package's reader refuses (a malformed PIDF): 400.

Every 2xx carries the new ``SIP-ETag`` and the granted ``Expires``. :attr:`EventStateCompositor.deadline`
and :meth:`EventStateCompositor.expire` drop what was not refreshed (and say whose state changed).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack

from p2psip.errors import ParseError
from p2psip.message import Request
from p2psip.subscription import EventHeader, Reject

__all__ = ["EventStateCompositor", "PublishResult", "Published", "decode_state", "encode_state"]

MAX_STORED = 15 * 1024
"""Bytes of an AOR's published state kept in the DHT (a value holds 16 KiB): the newest that fit."""


@dataclass
class Published:
    """One device's published state: the body, its content type, entity tag and expiry."""

    etag: str
    body: bytes
    content_type: str
    expires_at: float
    source: str = ""
    """Where the PUBLISH came from (``host:port``): which registered device published it."""


@dataclass
class PublishResult:
    """A PUBLISH that succeeded: the granted expiry, the new entity tag (None once removed), and whether
    the AOR's published state changed (a refresh changes nothing a watcher sees)."""

    expires: int
    etag: str | None
    changed: bool
    headers: tuple[tuple[str, str], ...] = field(default=())


class EventStateCompositor:
    """The published state of many AORs for one event package (RFC 3903 §6).

    ``content_types`` are the body types accepted; ``reader(body)`` raises ParseError for a body the
    package cannot read (``p2psip.pidf.parse`` for presence)."""

    def __init__(
        self,
        package: str,
        content_types: tuple[str, ...],
        reader: Callable[[bytes], object],
        *,
        min_expires: int = 60,
        max_expires: int = 3600,
        default_expires: int = 3600,
        max_per_aor: int = 16,
    ) -> None:
        self.package = package
        self.content_types = content_types
        self.reader = reader
        self.min_expires = min_expires
        self.max_expires = max_expires
        self.default_expires = default_expires
        self.max_per_aor = max_per_aor
        """Documents one AOR may have at once (devices): a bound, so one user cannot fill the agent."""
        self.state: dict[str, dict[str, Published]] = {}

    def documents(self, aor: str, now: float) -> list[Published]:
        """The live published documents of ``aor``, oldest first."""
        return [p for p in self.state.get(aor, {}).values() if p.expires_at > now]

    def publish(self, aor: str, request: Request, now: float, source: str = "") -> PublishResult | Reject:
        """Decide a PUBLISH for ``aor`` (the canonical AOR of its Request-URI) that came from ``source``."""
        try:
            event = EventHeader.of(request)
            asked = request.expires
        except ParseError as exc:
            return Reject(400, f"Bad Request ({exc})")
        if event is None or event.package != self.package:
            return Reject(489, None, (("Allow-Events", self.package),))
        match = request.get("SIP-If-Match")
        expires = self.default_expires if asked is None else min(asked, self.max_expires)
        if 0 < expires < self.min_expires:
            return Reject(423, None, (("Min-Expires", str(self.min_expires)),))
        table = self.state.setdefault(aor, {})
        body = request.body
        if body:
            content_type = request.content_type or ""
            if content_type not in self.content_types:
                return Reject(415, None, (("Accept", ", ".join(self.content_types)),))
            try:
                self.reader(body)
            except ParseError as exc:
                return Reject(400, f"Bad Request ({exc})")
        else:
            content_type = ""
        if match is None:
            if not body or expires == 0:
                return Reject(400, "Bad Request (an initial PUBLISH needs a body and a lifetime)")
            if source:
                # one device, one state: a device that starts afresh (baresip 1.0 sends every status
                # change as an initial PUBLISH) replaces what it published before
                for tag in [tag for tag, p in table.items() if p.source == source]:
                    del table[tag]
            live = [tag for tag, p in table.items() if p.expires_at > now]
            if len(live) >= self.max_per_aor:
                return Reject(403, f"Forbidden (more than {self.max_per_aor} publications for one user)")
            etag = self._new_etag()
            table[etag] = Published(etag, body, content_type, now + expires, source)
            return PublishResult(expires, etag, True, (("SIP-ETag", etag), ("Expires", str(expires))))
        old = table.get(match.strip())
        if old is None or old.expires_at <= now:
            return Reject(412, "Conditional Request Failed")
        del table[old.etag]
        if expires == 0:
            if not table:
                self.state.pop(aor, None)
            return PublishResult(0, None, True, (("Expires", "0"),))
        etag = self._new_etag()
        changed = bool(body) and body != old.body
        table[etag] = Published(
            etag, body or old.body, content_type or old.content_type, now + expires, source or old.source
        )
        return PublishResult(expires, etag, changed, (("SIP-ETag", etag), ("Expires", str(expires))))

    @property
    def deadline(self) -> float | None:
        times = [p.expires_at for table in self.state.values() for p in table.values()]
        return min(times) if times else None

    def expire(self, now: float) -> list[str]:
        """Drop what ran out; returns the AORs whose published state changed."""
        changed = []
        for aor, table in list(self.state.items()):
            gone = [tag for tag, p in table.items() if p.expires_at <= now]
            for tag in gone:
                del table[tag]
            if gone:
                changed.append(aor)
            if not table:
                del self.state[aor]
        return changed

    def adopt(self, aor: str, items: list[Published], now: float) -> bool:
        """Take over state another agent published (read back from the DHT): the live ``items`` whose
        entity tags are not known here yet, within ``max_per_aor``. True when anything was added."""
        table = self.state.setdefault(aor, {})
        added = False
        for item in items:
            if item.expires_at <= now or item.etag in table or len(table) >= self.max_per_aor:
                continue
            try:
                self.reader(item.body)
            except ParseError:
                continue
            table[item.etag] = item
            added = True
        if not table:
            self.state.pop(aor, None)
        return added

    def drop_source(self, aor: str, source: str) -> bool:
        """Forget what the device at ``source`` published for ``aor`` (it unregistered: a phone that
        leaves takes its state along, whether or not it withdrew its publication). True if any."""
        table = self.state.get(aor, {})
        gone = [tag for tag, p in table.items() if p.source == source]
        for tag in gone:
            del table[tag]
        if not table:
            self.state.pop(aor, None)
        return bool(gone)

    def _new_etag(self) -> str:
        return secrets.token_hex(8)


def encode_state(items: list[Published], offset: float) -> bytes:
    """An AOR's published state as the value of its signed DHT entry: msgpack ``[[etag, body, content
    type, expiry (unix time), source], ...]``; ``offset`` turns the agent's clock into unix time. The
    newest documents that fit :data:`MAX_STORED`."""
    newest = sorted(items, key=lambda p: p.expires_at, reverse=True)
    rows = [[p.etag, p.body, p.content_type, p.expires_at + offset, p.source] for p in newest]
    while rows:
        packed = bytes(msgpack.packb(rows, use_bin_type=True))
        if len(packed) <= MAX_STORED:
            return packed
        rows.pop()
    return bytes(msgpack.packb([], use_bin_type=True))


def decode_state(value: bytes, offset: float) -> list[Published]:
    """The published state in a DHT value (:func:`encode_state`); ``offset`` turns unix time into the
    agent's clock. Malformed rows are skipped; an unreadable value is no state."""
    try:
        rows = msgpack.unpackb(value, raw=False)
    except Exception:
        return []
    out = []
    for row in rows if isinstance(rows, list) else []:
        if (
            isinstance(row, list)
            and len(row) == 5
            and isinstance(row[0], str)
            and isinstance(row[1], bytes)
            and isinstance(row[2], str)
            and isinstance(row[3], int | float)
            and isinstance(row[4], str)
        ):
            out.append(Published(row[0], row[1], row[2], float(row[3]) - offset, row[4]))
    return out
