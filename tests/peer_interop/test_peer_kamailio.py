"""`--route DOMAIN=HOST:PORT` to a real Kamailio: a call for sip:+15551234@kam.example goes from our phone
through the peer (no DHT lookup) to Kamailio, which routes the domain to a sipp UAS; ACK and BYE follow
both Record-Routes back through the peer and Kamailio."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import free_port, require_tool
from interop.kamailio import DomainRoute, Kamailio, registrar_config
from interop.sipp import uas
from peer_phone import Phone

from p2psip.config import HostPort

from .helpers import start_overlay, stop_overlay


@pytest.mark.interop
async def test_static_route_to_kamailio(tmp_path: Path) -> None:
    require_tool("kamailio")
    require_tool("sipp")
    kam_port, uas_port = free_port(), free_port()
    config = registrar_config(
        "127.0.0.1",
        kam_port,
        realm="kam.example",
        users={"gw": "unused"},
        domain_routes={"kam.example": DomainRoute(("127.0.0.1", uas_port))},
        challenge_invites=False,
        transports=("udp",),
    )
    kamailio = Kamailio(config, tmp_path, kam_port, transports=("udp",))
    kamailio.check()
    peers = await start_overlay(2, tmp_path)
    phone = await Phone.open("alice")
    try:
        peer = peers[1]
        peer.config.routes["kam.example"] = HostPort("127.0.0.1", kam_port)
        with kamailio, uas(tmp_path, uas_port, name="uas"):
            result = await phone.call("sip:+15551234@kam.example", peer.sip_address(), timeout=20)
            assert result.answered, (result.statuses, kamailio.log_tail())
            assert result.bye_status == 200
            final = result.final
            assert final is not None and len(final.get_all("Record-Route")) >= 2  # the peer and Kamailio
        assert peer.counters["lookups"] == 0  # a static route never touches the DHT
    finally:
        phone.close()
        await stop_overlay(peers)
