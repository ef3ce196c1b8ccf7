"""A client peer's link to its attach peer (RELOAD's client model, docs/nat.md): sans-IO, ``now`` passed in.

A node that other peers cannot reach (overlay.reach decided "client") takes no ring responsibility: it
never enters a routing table. It keeps one overlay flow to a full peer, its *attach peer* (first the
bootstrap that answered its probe), with ``attach`` keep-alives, and does its puts and gets through it
(``relay_store``/``relay_fetch``: the attach peer performs the store or read; entries stay signed by their
writer, so replicas check them as always). Each ``attach`` answer carries the attach peer's successors: the
fallbacks to re-attach to when the attach peer stops answering.

The keep-alive interval is below the 30 s Linux conntrack keeps an unanswered UDP mapping (docs/nat.md), so
the NAT mapping toward the attach peer stays open and the attach peer can answer through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Endpoint = tuple[str, int]

KEEPALIVE_INTERVAL = 15.0
"""Seconds between two ``attach`` keep-alives (a NAT's idle UDP mapping lasts 30 s or more)."""
MISSES_BEFORE_DEAD = 3
"""Unanswered keep-alives in a row after which the attach peer counts as gone."""
MAX_FALLBACKS = 8


@dataclass(slots=True)
class AttachState:
    """Which full peer this client peer is attached to, when to send the next keep-alive, and where to
    go when the attach peer dies."""

    peer: Endpoint
    interval: float = KEEPALIVE_INTERVAL
    misses_before_dead: int = MISSES_BEFORE_DEAD
    fallbacks: list[Endpoint] = field(default_factory=list)
    seen: Endpoint | None = None
    """The address the attach peer sees this client at (its NAT's outer address toward it)."""
    service: Endpoint | None = None
    """The attach peer's application address (``service`` in its answer: for p2psip its SIP address, where
    the client peer keeps its SIP flow); None until an answer names one."""
    last_answer: float | None = None
    next_due: float = 0.0
    misses: int = 0
    reattached: int = 0

    def due(self, now: float) -> bool:
        """Whether a keep-alive should go out now."""
        return now >= self.next_due

    def sent(self, now: float) -> None:
        self.next_due = now + self.interval

    def answered(
        self, now: float, seen: Endpoint | None, successors: list[Endpoint], service: Endpoint | None = None
    ) -> None:
        """The attach peer answered an ``attach``: alive; remember its successors as fallbacks and the
        application address it named (a new attach peer's replaces the old one's)."""
        self.last_answer = now
        self.misses = 0
        if seen is not None:
            self.seen = seen
        self.service = service if service is not None and service[1] else None
        fresh = [ep for ep in successors if ep != self.peer]
        if fresh:
            self.fallbacks = fresh[:MAX_FALLBACKS]

    def missed(self, now: float) -> Endpoint | None:
        """A keep-alive went unanswered. Returns the fallback to attach to next once the attach peer
        counts as dead (it moves to the end of the fallbacks: it may come back), else None."""
        self.misses += 1
        if self.misses < self.misses_before_dead:
            return None
        return self.gone(now)

    def gone(self, now: float) -> Endpoint | None:
        """The attach peer failed a relayed request: move to the next fallback at once (None: none known)."""
        if not self.fallbacks:
            return None
        dead, self.peer = self.peer, self.fallbacks.pop(0)
        self.service = None  # the new attach peer names its own
        if dead not in self.fallbacks and len(self.fallbacks) < MAX_FALLBACKS:
            self.fallbacks.append(dead)
        self.misses = 0
        self.reattached += 1
        self.next_due = now  # greet the new attach peer at once
        return self.peer

    def as_dict(self) -> dict[str, object]:
        return {
            "peer": f"{self.peer[0]}:{self.peer[1]}",
            "seen": f"{self.seen[0]}:{self.seen[1]}" if self.seen else None,
            "service": f"{self.service[0]}:{self.service[1]}" if self.service else None,
            "fallbacks": [f"{h}:{p}" for h, p in self.fallbacks],
            "reattached": self.reattached,
        }
