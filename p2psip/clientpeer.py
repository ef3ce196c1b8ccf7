"""A client peer's SIP flow to its attach peer (docs/nat.md, Client peers): sans-IO, ``now`` passed in.

A peer that others cannot reach (behind a NAT without port forwarding) joins the overlay as a *client
peer*: the overlay keeps a link to a full peer, its attach peer (``overlay.attach``). On the SIP side the
client peer is an **edge proxy** for its own phones (in RFC 5626's sense) and keeps one SIP flow to its
attach peer, made and kept the RFC 5626 way:

- It sends the attach peer a REGISTER for its own *client AOR* (``sip:<node id hex>@client-peer.invalid``,
  a name under the reserved ``.invalid`` domain, never stored in the DHT), with ``+sip.instance``,
  ``reg-id=1`` and ``Supported: path, outbound``. The attach peer takes it only from the host of a client
  peer attached to it in the overlay, binds the flow it came over and answers ``200`` with ``Path`` (its own
  entry ``<sip:TOKEN@attach;lr;ob>``, the flow token naming that flow), ``Service-Route`` (the same URI:
  RFC 3608, the route for the client's outgoing requests), ``Require: outbound`` and ``Flow-Timer``. That
  is how the client learns its flow token: the registrar echoes the Path (RFC 3327 §5.3).
- It keeps the flow alive with STUN binding requests at 80 % of the Flow-Timer (RFC 5626 §4.4.1); an
  unanswered one, or an answer showing another reflexive address than the REGISTER's (the NAT gave a new
  mapping), makes it register again, as does a new attach peer (the overlay moved to a fallback).
- Its phones' bindings are stored with Path ``[attach peer's entry, the client peer's own entry]`` (the
  attach peer's first: requests come through it over the flow), signed by the client peer's user key and
  stored through the attach peer (``relay_store``). Their requests go out through the Service-Route.

:class:`ClientLink` is the state of that flow; the peer (``p2psip.peer``) does the sending.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

Endpoint = tuple[str, int]

CLIENT_DOMAIN = "client-peer.invalid"
"""Domain of a client peer's own AOR at its attach peer (RFC 6761: ``.invalid`` is never a real name)."""
_CLIENT_USER = re.compile(r"[0-9a-f]{32}\Z")

REGISTER_EXPIRES = 600
"""Seconds a client peer's REGISTER at its attach peer lasts (refreshed at half of it)."""
RETRY_AFTER = 2.0
"""Seconds before a failed client REGISTER is tried again (doubling up to :data:`MAX_RETRY`)."""
MAX_RETRY = 30.0
KEEPALIVE_SHARE = 0.8
"""Keep-alives go at this share of the Flow-Timer (RFC 5626 §4.4.1: 80-100 %)."""


def client_aor(node_id: int) -> str:
    """A client peer's own AOR at its attach peer."""
    return f"sip:{node_id:032x}@{CLIENT_DOMAIN}"


def client_node_of(aor: str) -> int | None:
    """The NodeId a client AOR names (canonical form), or None when ``aor`` is not a client AOR."""
    user, _, host = aor.removeprefix("sip:").partition("@")
    if host != CLIENT_DOMAIN or not _CLIENT_USER.match(user):
        return None
    return int(user, 16)


def client_instance(node_id: int) -> str:
    """The ``+sip.instance`` of a client peer: a UUID made from its NodeId (stable across restarts)."""
    return f"<urn:uuid:{uuid.UUID(int=node_id % (1 << 128))}>"


REGISTER = "register"
KEEPALIVE = "keepalive"


@dataclass(slots=True)
class ClientLink:
    """The client peer's SIP flow to its attach peer: when to (re-)REGISTER and to send a keep-alive.

    Feed it what happened (:meth:`attached`, :meth:`registered`, :meth:`failed`, :meth:`keepalive_answered`,
    :meth:`keepalive_missed`); :meth:`due` says what to send now."""

    attach: Endpoint | None = None
    """The attach peer's overlay address (which full peer this is)."""
    service: Endpoint | None = None
    """Its SIP address (named in its ``attach`` answers), where the flow goes."""
    path: str | None = None
    """The attach peer's Path entry for our flow (``<sip:TOKEN@host:port;lr;ob>``), from its 200."""
    flow_timer: int = 120
    mapped: Endpoint | None = None
    """Our reflexive SIP address as the attach peer saw the REGISTER (its Via ``received``/``rport``)."""
    registering: bool = False
    next_register: float = 0.0
    next_keepalive: float | None = None
    retry: float = RETRY_AFTER
    registrations: int = 0
    moves: int = 0
    """Times the flow went to another attach peer (the overlay re-attached)."""
    problem: str | None = None
    """Why the last REGISTER failed (shown by ``p2psip status`` until one succeeds)."""

    @property
    def ready(self) -> bool:
        """Registered: phones' bindings can be stored with our Path."""
        return self.path is not None

    def attached(self, attach: Endpoint, service: Endpoint | None, now: float) -> bool:
        """What the overlay says now: attached to ``attach``, whose SIP address is ``service``. Returns True
        when that changed: the flow must be made again (and the phones' bindings get the new Path)."""
        if (attach, service) == (self.attach, self.service):
            return False
        moved = self.attach is not None and attach != self.attach
        self.attach, self.service = attach, service
        self.path = None
        self.mapped = None
        self.next_keepalive = None
        self.registering = False
        self.next_register = now
        self.retry = RETRY_AFTER
        if moved:
            self.moves += 1
        return True

    def due(self, now: float) -> list[str]:
        """What to send now: :data:`REGISTER` (then :meth:`sending`), :data:`KEEPALIVE`, or nothing."""
        if self.service is None or self.registering:
            return []
        if now >= self.next_register:
            return [REGISTER]
        if self.next_keepalive is not None and now >= self.next_keepalive:
            self.next_keepalive = None  # one in flight: answered or missed brings the next
            return [KEEPALIVE]
        return []

    def next_check(self, now: float) -> float:
        """When :meth:`due` may next have something (a bound for the adapter's sleep)."""
        times = [self.next_register]
        if self.next_keepalive is not None:
            times.append(self.next_keepalive)
        return max(now, min(times))

    def sending(self, now: float) -> None:
        """A REGISTER went out; no other until it is answered or failed."""
        self.registering = True

    def registered(
        self, now: float, path: str, *, flow_timer: int | None, expires: int, mapped: Endpoint | None
    ) -> bool:
        """The attach peer answered 200: our Path entry, its Flow-Timer, how long the registration lasts
        and our reflexive address. Returns True when the Path changed (the phones' bindings must be
        stored again with it)."""
        changed = path != self.path
        self.path = path
        self.registering = False
        self.problem = None
        self.registrations += 1
        self.retry = RETRY_AFTER
        if flow_timer is not None and flow_timer > 0:
            self.flow_timer = flow_timer
        self.mapped = mapped
        self.next_register = now + max(1.0, expires / 2)
        self.next_keepalive = now + self.flow_timer * KEEPALIVE_SHARE
        return changed

    def failed(self, now: float, why: str) -> None:
        """The REGISTER was refused or not answered: try again later (the Path already known stays: the
        flow may still work)."""
        self.registering = False
        self.problem = why
        self.next_register = now + self.retry
        self.retry = min(MAX_RETRY, self.retry * 2)

    def keepalive_answered(self, now: float, mapped: Endpoint | None) -> None:
        """A keep-alive's answer: the flow is alive, unless our reflexive address changed (a new NAT
        mapping the attach peer does not know: register again at once, RFC 5626 §4.4.1)."""
        if mapped is not None and self.mapped is not None and mapped != self.mapped:
            old, new = f"{self.mapped[0]}:{self.mapped[1]}", f"{mapped[0]}:{mapped[1]}"
            self.problem = f"the NAT mapping changed ({old} -> {new})"
            self.next_register = now
            return
        self.next_keepalive = now + self.flow_timer * KEEPALIVE_SHARE

    def keepalive_missed(self, now: float) -> None:
        """No answer to a keep-alive: the flow failed (§4.4): register again at once."""
        self.problem = "no answer to a STUN keep-alive"
        self.next_register = now

    def as_dict(self) -> dict[str, object]:
        return {
            "attach": f"{self.attach[0]}:{self.attach[1]}" if self.attach else None,
            "sip": f"{self.service[0]}:{self.service[1]}" if self.service else None,
            "path": self.path,
            "flow_timer": self.flow_timer,
            "registrations": self.registrations,
            "moves": self.moves,
            "problem": self.problem,
        }
