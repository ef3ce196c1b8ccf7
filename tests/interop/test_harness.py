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
from .relay import LossyRelay, rewrite_contacts
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


def test_relay_rewrites_contacts_of_sip_messages_only() -> None:
    invite = (
        b"INVITE sip:bob@10.0.0.2:5070 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;rport\r\n"
        b'Contact: "Al, sip:x" <sip:alice@10.0.0.1:5060;transport=udp>;expires=60, <sips:[::1]:5061>\r\n'
        b"m: sip:10.0.0.1\r\nContent-Length: 20\r\n\r\nContact: sip:a@10.0.0.1"
    )
    rewritten = rewrite_contacts(invite, ("127.0.0.1", 4000))
    assert rewritten == (
        b"INVITE sip:bob@10.0.0.2:5070 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;rport\r\n"
        b'Contact: "Al, sip:x" <sip:alice@127.0.0.1:4000;transport=udp>;expires=60, '
        b"<sips:127.0.0.1:4000>\r\nm: sip:127.0.0.1:4000\r\nContent-Length: 20\r\n\r\n"
        b"Contact: sip:a@10.0.0.1"  # the body is left alone
    )
    assert rewrite_contacts(b"\x80\x00Contact: sip:a@10.0.0.1", ("127.0.0.1", 4000)).endswith(b"10.0.0.1")


async def test_relay_with_rewritten_contacts_carries_in_dialog_requests_both_ways() -> None:
    """With ``rewrite_contact`` each side sees the other's Contact at the relay: a request sent to the
    Contact a response named reaches the target through the relay, and one the target sends to the
    client's Contact reaches the client through it."""
    loop = asyncio.get_running_loop()

    class Endpoint(asyncio.DatagramProtocol):
        def __init__(self) -> None:
            self.got: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            self.got.put_nowait((data, addr))

    def contact_of(data: bytes) -> tuple[str, int]:
        line = next(line for line in data.split(b"\r\n") if line.startswith(b"Contact:"))
        host, port = line.split(b"<sip:", 1)[1].split(b">", 1)[0].rsplit(b":", 1)
        return host.decode(), int(port)

    def message(first: str, endpoint: asyncio.DatagramTransport) -> bytes:
        host, port = endpoint.get_extra_info("sockname")[:2]
        return f"{first}\r\nCall-ID: c1\r\nContact: <sip:{host}:{port}>\r\n\r\n".encode()

    target_tr, target = await loop.create_datagram_endpoint(Endpoint, local_addr=("127.0.0.1", 0))
    client_tr, client = await loop.create_datagram_endpoint(Endpoint, local_addr=("127.0.0.1", 0))
    try:
        async with LossyRelay(target_tr.get_extra_info("sockname"), rewrite_contact=True) as relay:
            client_tr.sendto(message("INVITE sip:t SIP/2.0", client_tr), relay.address)
            invite, back = await asyncio.wait_for(target.got.get(), 5)
            assert contact_of(invite) == back  # the client's Contact is the relay's back socket
            target_tr.sendto(message("SIP/2.0 200 OK", target_tr), back)
            ok, _ = await asyncio.wait_for(client.got.get(), 5)
            assert contact_of(ok) == relay.address  # the target's Contact is the relay's front
            client_tr.sendto(b"BYE sip:t SIP/2.0\r\nCall-ID: c1\r\n\r\n", contact_of(ok))
            bye, source = await asyncio.wait_for(target.got.get(), 5)
            assert bye.startswith(b"BYE ") and source == back
            target_tr.sendto(b"NOTIFY sip:c SIP/2.0\r\nCall-ID: c1\r\n\r\n", contact_of(invite))
            notify, source = await asyncio.wait_for(client.got.get(), 5)
            assert notify.startswith(b"NOTIFY ") and source == relay.address
    finally:
        client_tr.close()
        target_tr.close()
    assert relay.stats.forwarded_lines == [
        "up INVITE sip:t SIP/2.0 [c1]",
        "down SIP/2.0 200 OK [c1]",
        "up BYE sip:t SIP/2.0 [c1]",
        "down NOTIFY sip:c SIP/2.0 [c1]",
    ]
