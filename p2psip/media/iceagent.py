"""The one place that touches ``aioice``'s private attributes: every use of them is a function here.

Why they are touched at all: aioice (0.10 to 0.13) has no public way to gather host candidates on one
chosen address (its gathering takes every interface), to read the selected pair, to send to a far end that
does no ICE (a remote candidate that must not start checks), or to hand a restarted agent the sockets and
TURN allocation of the old one (RFC 8445 §9 lets a restart keep its candidates). Its public API covers the
rest (``gather_candidates``, ``add_remote_candidate``, ``connect``, ``sendto``, ``recvfrom``,
``set_selected_pair``, ``close``).

Why one module: an aioice release that renames these internals breaks exactly the functions below, and
:func:`check` (run by tests/test_iceagent.py against the installed aioice) says which name went missing,
instead of a call failing half-way. pyproject pins aioice to the range this was read against
(``TESTED``); widen it only after that test passes on the new release.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

import aioice
from aioice.candidate import Candidate

__all__ = ["TESTED", "MediaAgent", "add_default_remote", "check", "hand_over", "selected_pair"]

TESTED = (">=0.10", "<0.14")
"""The aioice versions this module was read against (the same bounds as in pyproject.toml)."""

_INTERNALS = (
    "_components",
    "_local_candidates",
    "_local_candidates_start",
    "_local_candidates_end",
    "_nominated",
    "_protocols",
    "_remote_candidates",
    "_transport_policy",
)


class MediaAgent(aioice.Connection):
    """aioice's agent, gathering host candidates on one address: the address the SIP stack uses toward
    the far end (aioice's own gathering takes every interface but loopback), for each of its components
(``components=2``: a second one for RTCP toward a far end without rtcp-mux)."""

    def __init__(self, address: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.media_address = address

    async def gather_candidates(self) -> None:
        if self._local_candidates_start:
            return
        self._local_candidates_start = True
        relay_only = self._transport_policy == aioice.TransportPolicy.RELAY
        addresses = [] if relay_only else [self.media_address]
        for component in sorted(self._components):  # 1 (RTP, and RTCP with rtcp-mux); 2: RTCP without
            self._local_candidates += await self.get_component_candidates(component, addresses=addresses)
        self._local_candidates_end = True


def selected_pair(agent: aioice.Connection, component: int = 1) -> tuple[Candidate, Candidate] | None:
    """The (local, remote) candidates of the pair nominated for ``component``, or None."""
    pair = agent._nominated.get(component)
    if pair is None:
        return None
    return pair.local_candidate, pair.remote_candidate


def add_default_remote(agent: aioice.Connection, remote: Candidate) -> None:
    """Know ``remote`` (a far end without ICE: its ``c=``/``m=``) without starting checks toward it, so
    that ``set_selected_pair`` can pick it (``add_remote_candidate`` would start checks)."""
    agent._remote_candidates.append(remote)


def hand_over(old: MediaAgent, new: MediaAgent) -> None:
    """Give ``new`` (an ICE restart's agent) the candidates and sockets of ``old``, TURN allocation
    included; ``old`` keeps none, so closing it closes nothing ``new`` uses."""
    new._local_candidates = list(old.local_candidates)
    new._local_candidates_start = new._local_candidates_end = True
    new._protocols, old._protocols = old._protocols, []
    for protocol in new._protocols:
        protocol.receiver = new


def check() -> list[str]:
    """What of the above the installed aioice lacks (empty: all there), and whether its version is in
    :data:`TESTED`. For the test that fails clearly when an aioice release moves its internals."""
    problems = []
    version = metadata.version("aioice")
    if not _in_range(version):
        problems.append(f"aioice {version} is outside the tested range {','.join(TESTED)}")
    agent = aioice.Connection(ice_controlling=True)
    for name in _INTERNALS:
        if not hasattr(agent, name):
            problems.append(f"aioice.Connection has no {name}")
    for name in ("get_component_candidates", "set_selected_pair"):
        if not callable(getattr(agent, name, None)):
            problems.append(f"aioice.Connection has no method {name}")
    return problems


def _in_range(version: str) -> bool:
    def parts(text: str) -> tuple[int, ...]:
        return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())

    low, high = (parts(bound.lstrip("<>=")) for bound in TESTED)
    return low <= parts(version) < high
