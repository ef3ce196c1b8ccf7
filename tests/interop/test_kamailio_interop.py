"""Kamailio and our proxy in one path: Kamailio, with a static route for a domain, sends the calls for that
domain through our stateful proxy to a sipp UAS. Both proxies record-route, so ACK and BYE traverse both
with a two-entry route set."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import free_port

from .kamailio import DomainRoute, Kamailio, registrar_config
from .ourproxy import OurProxy
from .sipp import UAC_DOMAIN, run_calls, uas

pytestmark = pytest.mark.interop


def test_kamailio_routes_a_domain_through_our_proxy(
    sipp_tool: str, kamailio_tool: str, workdir: Path
) -> None:
    kport, uport, cport = free_port(), free_port(), free_port()
    with OurProxy(workdir) as proxy, uas(workdir, uport) as callee:
        host, port = proxy.addresses["udp"]
        config = registrar_config(
            "127.0.0.1",
            kport,
            realm="kam.example",
            users={},
            domain_routes={"p2p.example": DomainRoute(next_hop=(host, port), target=("127.0.0.1", uport))},
        )
        with Kamailio(config, workdir, kport) as kamailio:
            result = run_calls(
                workdir,
                f"127.0.0.1:{kport}",
                calls=50,
                rate=25,
                port=cport,
                scenario=UAC_DOMAIN,
                service="bob",
                extra=["-key", "domain", "p2p.example"],
                timeout=60,
            )
            log = kamailio.log_tail()
        assert callee.proc is not None
    assert (result.successful, result.failed) == (50, 0), (
        f"{result}\nkamailio:\n{log}\nproxy:\n{proxy.output()}"
    )
    stats = proxy.final_stats()
    assert stats.get("forwarded_requests", 0) >= 100, f"the calls did not pass through our proxy: {stats}"
