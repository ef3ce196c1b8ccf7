"""What a presence agent tells a watcher, sans-IO: the composed document of an AOR and who may see it.

* :func:`compose` makes one PIDF document for an AOR from what the agent knows: every registered device
  (a binding) is an ``open`` tuple (registered = reachable), unless that device PUBLISHed a document of
  its own, which then speaks for it (a phone set to "offline" is closed although registered); every
  published document adds its tuples, notes and activities. Any open tuple makes the whole AOR open
  (:attr:`p2psip.pidf.Presence.basic`).
* :class:`WatcherPolicy` decides a SUBSCRIBE: a From header proves nothing, so a watcher counts as who it
  says only when ``vouched`` (its own home peer asserted it). An identified watcher is allowed when the
  presentity has no allow list or lists it; everyone else is *politely blocked*: the subscription is
  accepted and sees :func:`polite_block` ("closed"), so presence does not tell strangers who is online,
  nor that they are refused (RFC 3856 §5.1.2's polite blocking).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from p2psip import pidf

__all__ = ["Decision", "WatcherPolicy", "compose", "polite_block"]


class Decision(enum.Enum):
    ALLOW = "allow"
    POLITE_BLOCK = "polite-block"
    REJECT = "reject"


@dataclass
class WatcherPolicy:
    """Per presentity (canonical AOR): the watchers it allows (canonical AORs; ``"*"`` for every
    identified watcher) and the ones it refuses outright (they get a terminated ``rejected``)."""

    allow: Mapping[str, frozenset[str]] = field(default_factory=dict)
    deny: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def decide(self, presentity: str, watcher: str, *, vouched: bool) -> Decision:
        if watcher in self.deny.get(presentity, frozenset()):
            return Decision.REJECT
        if not vouched:
            return Decision.POLITE_BLOCK
        if watcher == presentity:
            return Decision.ALLOW  # a user's own devices see each other
        allowed = self.allow.get(presentity)
        if allowed is None or "*" in allowed or watcher in allowed:
            return Decision.ALLOW
        return Decision.POLITE_BLOCK


def compose(aor: str, registered: Iterable[str], published: Iterable[pidf.Presence] = ()) -> pidf.Presence:
    """The AOR's document: an open tuple per registered contact, then the published documents' tuples,
    notes and activities (:func:`p2psip.pidf.merge`); no device at all: one closed tuple."""
    devices = [
        pidf.Presence(aor, [pidf.PresenceTuple(f"reg{n}", "open", contact)])
        for n, contact in enumerate(registered)
    ]
    docs = devices + list(published)
    if not docs:
        return polite_block(aor)
    return pidf.merge(aor, docs)


def polite_block(aor: str) -> pidf.Presence:
    """What a blocked watcher sees: closed, nothing else."""
    return pidf.Presence(aor, [pidf.PresenceTuple("t", "closed")])
