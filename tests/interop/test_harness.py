"""The harness itself against known-good peers: sipp UAC → Kamailio → sipp UAS, and the lossy relay.

If these fail, the interop failures of our own stack mean nothing; so they run first and assert the
counts sipp reports.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import free_port

from .kamailio import Kamailio, stateful_config, stateless_config
from .relay import LossyRelay
from .sipp import run_calls, uas

pytestmark = pytest.mark.interop


@pytest.mark.parametrize("transport", ["u1", "t1"])
def test_sipp_through_kamailio_stateful(
    sipp_tool: str, kamailio_tool: str, workdir: Path, transport: str
) -> None:
    kport, uport, cport = free_port(), free_port(), free_port()
    with (
        Kamailio(stateful_config("127.0.0.1", kport), workdir, kport),
        uas(workdir, uport, transport=transport),
    ):
        result = run_calls(
            workdir,
            f"127.0.0.1:{uport}",
            calls=200,
            rate=100,
            port=cport,
            proxy=f"127.0.0.1:{kport}",
            transport=transport,
            timeout=60,
        )
    assert (result.successful, result.failed) == (200, 0), str(result)


def test_sipp_through_kamailio_stateless(sipp_tool: str, kamailio_tool: str, workdir: Path) -> None:
    kport, uport, cport = free_port(), free_port(), free_port()
    with Kamailio(stateless_config("127.0.0.1", kport), workdir, kport), uas(workdir, uport, scenario=None):
        result = run_calls(
            workdir,
            f"127.0.0.1:{uport}",
            calls=100,
            rate=100,
            port=cport,
            proxy=f"127.0.0.1:{kport}",
            scenario=None,
            timeout=60,
        )
    assert (result.successful, result.failed) == (100, 0), str(result)


def test_relay_drops_are_seeded_and_bounded() -> None:
    packets = [b"INVITE sip:x@h SIP/2.0\r\nCall-ID: %d\r\n\r\n" % i for i in range(200)]

    def verdicts(seed: int) -> list[bool]:
        relay = LossyRelay(("127.0.0.1", 9), loss=0.3, seed=seed, max_drops_per_packet=2)
        return [relay.decide("up", p) for p in packets for _ in range(4)]

    first, again, other = verdicts(7), verdicts(7), verdicts(8)
    assert first == again
    assert first != other
    assert 0.1 < sum(first) / len(first) < 0.4
    # no packet is lost more than twice, so the 3rd/4th copy of a twice-lost packet always passes
    for i in range(len(packets)):
        copies = first[4 * i : 4 * i + 4]
        assert sum(copies) <= 2


async def test_relay_carries_both_ways_with_loss() -> None:
    """20 datagrams to an echo server through a 30 % lossy relay, each resent every 20 ms until echoed
    (as SIP retransmits): all come back, and some were really lost on the way."""
    loop = asyncio.get_running_loop()

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            self.transport.sendto(data, addr)  # type: ignore[attr-defined]

    class Client(asyncio.DatagramProtocol):
        def __init__(self) -> None:
            self.got: asyncio.Queue[bytes] = asyncio.Queue()

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            self.got.put_nowait(data)

    echo, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    try:
        async with LossyRelay(echo.get_extra_info("sockname"), loss=0.3, seed=3) as relay:
            client_tr, client = await loop.create_datagram_endpoint(Client, local_addr=("127.0.0.1", 0))
            try:
                echoed = []
                for i in range(20):
                    data = b"OPTIONS sip:echo SIP/2.0\r\nCSeq: %d OPTIONS\r\n\r\n" % i
                    async with asyncio.timeout(10):
                        while True:
                            client_tr.sendto(data, relay.address)
                            try:
                                echoed.append(await asyncio.wait_for(client.got.get(), 0.02))
                                break
                            except TimeoutError:
                                continue
                while not client.got.empty():
                    echoed.append(client.got.get_nowait())
            finally:
                client_tr.close()
    finally:
        echo.close()
    assert set(echoed) == {b"OPTIONS sip:echo SIP/2.0\r\nCSeq: %d OPTIONS\r\n\r\n" % i for i in range(20)}
    assert relay.stats.dropped > 0
    assert any(line.startswith("down") for line in relay.stats.dropped_lines)
