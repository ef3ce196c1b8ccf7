"""Reachability of a joining node: which address the ring sees it at, and whether others reach it there.

Sans-IO decisions for the ``probe``/``reach`` exchange (overlay.wire ``REACH_MESSAGES``), driven by
overlay.node:

1. The joining node sends ``probe`` to its bootstrap, with the endpoint it means to advertise
   (``--advertise``) or none (then the address the bootstrap sees, ``seen``, is the one probed: the node
   learns its reflexive address this way).
2. The bootstrap checks the target is on the host the probe came from (:func:`probe_allowed`: nobody can use
   the ring to aim pings at a third party), picks *another* member (:func:`pick_prober`: a NAT that lets the
   bootstrap's own answers in says nothing about strangers), and sends it ``reach``.
3. That member pings the target expecting the joiner's NodeId; ``reachable`` is whether it answered.
4. The joiner decides (:func:`decide`): answered, or nobody to ask (a ring of one), or an old bootstrap that
   does not know ``probe``: a full peer at that address; not answered: unreachable, which makes it a client
   peer (RELOAD's model) or, where client peers are not available, a clear refusal to join.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from overlay.chord import NodeRef

Endpoint = tuple[str, int]
WILDCARDS = frozenset({"0.0.0.0", "::", ""})


@dataclass(frozen=True, slots=True)
class Reachability:
    """What a node found out when it joined; shown by ``p2psip status`` (``reach`` in the node's stats)."""

    mode: Literal["full", "client"]
    reason: str
    endpoint: Endpoint
    """The overlay address other nodes use for this one (advertised, learned or bound)."""
    seen: Endpoint | None = None
    probed_by: Endpoint | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "reason": self.reason,
            "endpoint": f"{self.endpoint[0]}:{self.endpoint[1]}",
            "seen": f"{self.seen[0]}:{self.seen[1]}" if self.seen else None,
            "probed_by": f"{self.probed_by[0]}:{self.probed_by[1]}" if self.probed_by else None,
        }


def probe_allowed(target: Endpoint, observed: Endpoint) -> bool:
    """A probe may only aim at the host it came from (the port may differ: a forwarded port)."""
    return target[0] == observed[0] and 0 < target[1] < 65536


def pick_prober(candidates: Iterable[NodeRef], me: int, joiner: int, target: Endpoint) -> NodeRef | None:
    """The first known member that is neither the bootstrap, nor the joiner, nor at the target address."""
    for node in candidates:
        if node.id not in (me, joiner) and node.ep != target:
            return node
    return None


def decide(bound: Endpoint, advertise: Endpoint | None, reply: Mapping[str, Any] | None) -> Reachability:
    """The outcome of a probe. ``reply`` is the ``ok`` body of the bootstrap's answer, None when it gave
    none (an older bootstrap, or no answer in time)."""
    if reply is None:
        if advertise is None and bound[0] in WILDCARDS:
            return Reachability("client", "the bootstrap did not answer the probe: address unknown", bound)
        return Reachability("full", "not probed: the bootstrap did not answer the probe", advertise or bound)
    seen = reply.get("seen")
    by = reply.get("by")
    probed_by = by.ep if isinstance(by, NodeRef) else None
    endpoint = advertise or seen or bound
    learned = "advertised" if advertise else "learned from the bootstrap"
    reachable = reply.get("reachable")
    if reachable is None:
        return Reachability("full", f"{learned}; no other peer to probe it yet", endpoint, seen, probed_by)
    if reachable:
        return Reachability("full", f"{learned}; reachable: another peer's probe was answered", endpoint,
                            seen, probed_by)  # fmt: skip
    return Reachability("client", f"{learned}; unreachable: another peer's probe went unanswered", endpoint,
                        seen, probed_by)  # fmt: skip
