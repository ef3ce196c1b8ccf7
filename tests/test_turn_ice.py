"""The TURN server (p2psip.turnserver) with a real TURN client and real ICE agents (aioice) on loopback:
relayed candidates, connectivity checks and nomination over the relay, data both ways, the quota refusal
(486) as the client sees it, and teardown."""

from __future__ import annotations

import asyncio
import time

import aioice
import pytest
from aioice import stun
from aioice.turn import create_turn_endpoint
from test_media_call import until

from p2psip.turn import TurnLimits, issue_credentials
from p2psip.turnserver import TurnServer

SECRET = b"turn-test-secret"


class Inbox(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, addr))


async def test_turn_client_relays_both_ways_and_quota_is_486() -> None:
    async with TurnServer(SECRET, limits=TurnLimits(per_user=1)) as server:
        loop = asyncio.get_running_loop()
        peer_transport, peer = await loop.create_datagram_endpoint(Inbox, local_addr=("127.0.0.1", 0))
        peer_addr = peer_transport.get_extra_info("sockname")
        username, password = issue_credentials(SECRET, "alice", time.time())
        transport, client = await create_turn_endpoint(Inbox, server.address, username, password)
        try:
            assert server.core.stats()["allocations"] == 1
            transport.sendto(b"rtp-out", peer_addr)  # binds a channel (a permission too), then ChannelData
            data, source = await asyncio.wait_for(peer.queue.get(), 5)
            assert data == b"rtp-out"
            assert source in server.core.by_relay
            peer_transport.sendto(b"rtp-back", source)
            data, _ = await asyncio.wait_for(client.queue.get(), 5)
            assert data == b"rtp-back"
            assert server.core.stats()["relayed_packets"] == 2

            # a second allocation for alice is beyond her quota: the client gets 486
            with pytest.raises(stun.TransactionFailed) as refused:
                await create_turn_endpoint(Inbox, server.address, username, password)
            assert refused.value.response.error_code == 486
            assert server.core.stats()["refused_quota"] == 1
        finally:
            transport.close()
            peer_transport.close()
        # deleting the allocation (Refresh LIFETIME=0, sent by close) frees the relay
        await until(lambda: server.core.stats()["allocations"] == 0, 5)


async def test_ice_agents_connect_over_relayed_candidates_only() -> None:
    async with TurnServer(SECRET) as server:
        agents = []
        for role, user in ((True, "ua"), (False, "alice")):
            username, password = issue_credentials(SECRET, user, time.time())
            agents.append(
                aioice.Connection(
                    ice_controlling=role,
                    turn_server=server.address,
                    turn_username=username,
                    turn_password=password,
                    use_ipv6=False,
                    transport_policy=aioice.TransportPolicy.RELAY,
                )
            )
        a, b = agents
        try:
            await asyncio.gather(a.gather_candidates(), b.gather_candidates())
            assert [c.type for c in a.local_candidates] == ["relay"]
            assert [c.type for c in b.local_candidates] == ["relay"]
            for x, y in ((a, b), (b, a)):
                for candidate in y.local_candidates:
                    await x.add_remote_candidate(candidate)
                await x.add_remote_candidate(None)
                x.remote_username, x.remote_password = y.local_username, y.local_password
            await asyncio.wait_for(asyncio.gather(a.connect(), b.connect()), 10)
            await a.send(b"tone-440")
            assert await asyncio.wait_for(b.recv(), 5) == b"tone-440"
            await b.send(b"tone-1000")
            assert await asyncio.wait_for(a.recv(), 5) == b"tone-1000"
            stats = server.core.stats()
            assert stats["allocations"] == 2 and stats["relayed_packets"] >= 2
            assert stats["dropped_unpermitted"] == 0
        finally:
            await asyncio.gather(a.close(), b.close())
