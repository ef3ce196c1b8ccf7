"""Who may change an AOR's registrations at its home peer, and what guessing costs. Sans-IO.

The overlay's first-claim policy protects an AOR only at *other* peers: the home peer signs with the user
key it keeps for the AOR, for any REGISTER it accepts. So the home peer decides, before it signs:

- **Accounts** (``p2psip user add``, or ``[users]`` in the config): a REGISTER must authenticate (digest).
- **Trust on first use** (no account, ``require_auth = false``): the first REGISTER that writes a binding
  *claims* the AOR for its device: its ``+sip.instance`` (RFC 5626) and its flow (the transport and source
  it came from). Later REGISTERs for that AOR must carry that instance or come over that flow. The claim
  lasts as long as the bindings written through this peer (:attr:`Claim.until`); after that the AOR is
  free again and the peer forgets the claim and its user key (nothing is left behind).
- ``require_auth = true`` (closed deployments): only accounts may register; every REGISTER for any AOR is
  challenged the same way (401), so answers do not tell which users exist.

Instance ids are what prove a device here, so the registrar never echoes one to anybody but its owner,
and a query (REGISTER without Contact) lists contacts only to the owner.

Guessing a password costs time: :class:`FailureThrottle` delays the answers to a (source, AOR) pair that
failed digest more than a few times, doubling the delay with every failure, up to a ceiling. It is keyed by
source *and* AOR, so the owner authenticating from elsewhere is never slowed, let alone locked out.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, fields

from p2psip.address import bracket

__all__ = ["Claim", "FailureThrottle", "flow_of", "may_register", "owns"]


def flow_of(transport: str, host: str, port: int) -> str:
    """The flow a REGISTER came over, as a claim records it: a UDP flow is the source address and port;
    a stream flow (TCP/TLS/WS) the source address only, since every new connection has a new port."""
    transport = transport.lower()
    shown = bracket(host)
    return f"{transport}:{shown}:{port}" if transport == "udp" else f"{transport}:{shown}"


@dataclass
class Claim:
    """What the home peer remembers of an AOR it registers (kept beside the user key)."""

    aor: str
    instance: str | None = None
    """The ``+sip.instance`` of the device that claimed the AOR (None: that device sent none)."""
    flow: str | None = None
    """:func:`flow_of` the claiming REGISTER."""
    until: float = 0.0
    """Wall-clock time the last binding written through this peer expires."""
    explicit: bool = False
    """An account made with ``p2psip user add``: it needs digest, and is never forgotten by the sweep."""
    username: str = ""
    password: str = ""
    created: float = 0.0

    def alive(self, now: float) -> bool:
        return self.explicit or self.until > now

    def to_json(self) -> str:
        # the fields by name (not dataclasses.asdict, whose deep copy was most of a claim save's CPU)
        return json.dumps({name: getattr(self, name) for name in _CLAIM_FIELDS}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Claim:
        """Raises ValueError for anything that is not a claim written by :meth:`to_json`."""
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("aor"), str):
            raise ValueError("not a claim record")
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        claim = cls(**known)
        if not isinstance(claim.until, int | float) or not isinstance(claim.explicit, bool):
            raise ValueError("bad claim record")
        return claim


_CLAIM_FIELDS = tuple(f.name for f in fields(Claim))


def owns(claim: Claim | None, *, instances: Iterable[str], flow: str, now: float) -> bool:
    """Whether a request with these contact instances, arriving over ``flow``, comes from the device that
    claimed the AOR (no live claim: nobody owns it, so nobody is the owner either)."""
    if claim is None or not claim.alive(now) or claim.explicit:
        return False
    if claim.instance is not None and claim.instance in set(instances):
        return True
    return claim.flow is not None and claim.flow == flow


def may_register(claim: Claim | None, *, instances: Iterable[str], flow: str, now: float) -> bool:
    """Trust on first use: an AOR nobody claims (or whose claim ran out) is free; a claimed one only to its
    owner's device (:func:`owns`). Accounts (explicit claims) always need digest: never True here."""
    if claim is None or not claim.alive(now):
        return True
    return owns(claim, instances=instances, flow=flow, now=now)


class FailureThrottle:
    """Growing delays for digest failures per (source, AOR); a bounded table (LRU).

    ``free`` failures cost nothing (a user mistyping); each further one doubles the delay, starting at
    ``base`` seconds, up to ``ceiling``. A success from that source clears its record. Entries idle for
    ``forget_after`` seconds are dropped, and the table never holds more than ``max_keys`` pairs.
    """

    def __init__(
        self,
        *,
        free: int = 3,
        base: float = 0.5,
        ceiling: float = 30.0,
        forget_after: float = 900.0,
        max_keys: int = 4096,
    ) -> None:
        self.free = free
        self.base = base
        self.ceiling = ceiling
        self.forget_after = forget_after
        self.max_keys = max_keys
        self._failures: OrderedDict[tuple[str, str], tuple[int, float]] = OrderedDict()
        self.failures = 0
        self.delayed = 0

    def __len__(self) -> int:
        return len(self._failures)

    def delay(self, source: str, aor: str, now: float) -> float:
        """Seconds to wait before answering this (source, AOR) pair's next attempt."""
        record = self._failures.get((source, aor))
        if record is None:
            return 0.0
        count, last = record
        if now - last > self.forget_after:
            del self._failures[(source, aor)]
            return 0.0
        if count < self.free:
            return 0.0
        self.delayed += 1
        return float(min(self.ceiling, self.base * 2 ** (count - self.free)))

    def failed(self, source: str, aor: str, now: float) -> int:
        """Record a failure; returns how many this pair has had."""
        key = (source, aor)
        count = self._failures.pop(key, (0, now))[0] + 1
        self._failures[key] = (count, now)
        self.failures += 1
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)
        return count

    def succeeded(self, source: str, aor: str) -> None:
        self._failures.pop((source, aor), None)

    def expire(self, now: float) -> None:
        """Drop records idle for ``forget_after`` seconds (so an abuse that stopped leaves nothing)."""
        while self._failures:
            key, (_count, last) = next(iter(self._failures.items()))
            if now - last <= self.forget_after:
                break
            del self._failures[key]
