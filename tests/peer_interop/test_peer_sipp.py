"""sipp through the overlay: 200 registrations spread over 10 peers, then sipp calls every AOR through a
peer at which none registered (all calls complete); and churn: 20 peers and 200 AORs, 2 adjacent peers
crash, every AOR is still callable after one stabilization period."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import free_port, require_tool
from interop.sipp import uas
from peer_support import wait_until_settled

from p2psip.peer import Peer

from .helpers import DOMAIN, sipp_call_all, sipp_register, start_overlay, stop_overlay

AORS = 200


async def register_spread(workdir: Path, peers: list[Peer], users: list[str], contact: str) -> None:
    """Register the users round-robin over ``peers``: one sipp REGISTER run per peer, in parallel."""
    shares = {i: users[i :: len(peers)] for i in range(len(peers))}
    runs = [
        sipp_register(workdir, f"reg{i}", share, peers[i], contact, free_port())
        for i, share in shares.items()
        if share
    ]
    results = await asyncio.gather(*runs)
    for result in results:
        assert result.failed == 0 and result.successful > 0, str(result)
    assert sum(r.successful for r in results) == len(users)


@pytest.mark.interop
@pytest.mark.slow
async def test_sipp_200_registrations_over_10_peers_then_calls_through_an_eleventh(tmp_path: Path) -> None:
    require_tool("sipp")
    peers = await start_overlay(11, tmp_path)
    try:
        uas_port = free_port()
        with uas(tmp_path, uas_port, name="uas"):
            users = [f"user{i:03d}" for i in range(AORS)]
            await register_spread(tmp_path, peers[:10], users, f"127.0.0.1:{uas_port}")
            # every AOR is in the DHT, readable through the peer nobody registered at
            for user in users[:: AORS // 10]:
                assert await peers[10].fetch_bindings(f"sip:{user}@{DOMAIN}")
            result = await sipp_call_all(tmp_path, "calls", users, peers[10], free_port())
        assert result.successful == AORS and result.failed == 0, str(result)
        assert peers[10].counters["routed"] >= AORS
        assert peers[10].counters["registers"] == 0
    finally:
        await stop_overlay(peers)


@pytest.mark.interop
@pytest.mark.slow
async def test_churn_two_adjacent_peers_crash_all_aors_still_callable(tmp_path: Path) -> None:
    require_tool("sipp")
    peers = await start_overlay(20, tmp_path)
    try:
        uas_port = free_port()
        with uas(tmp_path, uas_port, name="uas"):
            users = [f"user{i:03d}" for i in range(AORS)]
            phone_peers = peers[:4]  # the peers the "phones" (sipp) use
            await register_spread(tmp_path, phone_peers, users, f"127.0.0.1:{uas_port}")
            ring = sorted(peers, key=lambda p: p.node.node_id)

            def primaries(pair: tuple[Peer, Peer]) -> list[str]:
                return [u for u in users if any(p.holds(f"sip:{u}@{DOMAIN}")[1] for p in pair)]

            # the two ring-adjacent peers that no phone uses and that are primary for the most AORs (node
            # ids are random: the first such pair may own a sliver of the ring and no AOR at all)
            pairs = [
                (ring[i], ring[(i + 1) % len(ring)])
                for i in range(len(ring))
                if ring[i] not in phone_peers and ring[(i + 1) % len(ring)] not in phone_peers
            ]
            a, b = max(pairs, key=lambda pair: len(primaries(pair)))
            lost_primaries = primaries((a, b))
            assert lost_primaries, "the crashed peers should be primary for some AORs"
            await a.close(leave=False)  # crash: no hand-off
            await b.close(leave=False)
            survivors = [p for p in peers if p not in (a, b)]
            # one stabilization period: the ring repairs itself (bounded wait on the repaired state)
            await wait_until_settled(survivors, timeout=30)
            result = await sipp_call_all(tmp_path, "calls", users, phone_peers[0], free_port())
        assert result.successful == AORS and result.failed == 0, str(result)
    finally:
        await stop_overlay(peers)
