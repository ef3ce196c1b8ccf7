"""sipp UAC → our stateful proxy (the shipped ``p2psip proxy`` command) → sipp UAS: 1,000 calls, none
failed, over UDP and over TCP. The UAC honours Record-Route, so ACK and BYE come back through the proxy
with its Route header (loose routing, §16.12); the UAS echoes Record-Route."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import free_port

from .ourproxy import OurProxy
from .sipp import run_calls, uas

pytestmark = [pytest.mark.interop, pytest.mark.slow]


@pytest.mark.parametrize(("transport", "kind"), [("u1", "udp"), ("t1", "tcp")])
def test_thousand_calls_through_our_stateful_proxy(
    sipp_tool: str, workdir: Path, transport: str, kind: str
) -> None:
    uport, cport = free_port(), free_port()
    with OurProxy(workdir) as proxy, uas(workdir, uport, transport=transport):
        result = run_calls(
            workdir,
            f"127.0.0.1:{uport}",
            calls=1000,
            rate=200,
            port=cport,
            proxy=proxy.address(kind),
            transport=transport,
            timeout=90,
        )
    assert (result.successful, result.failed) == (1000, 0), f"{result}\nproxy output:\n{proxy.output()}"
    stats = proxy.final_stats()
    # every INVITE and BYE went through a transaction of the proxy; ACKs for 2xx statelessly
    assert stats.get("forwarded_requests", 0) >= 2000, stats


def test_thousand_calls_with_sipp_builtin_scenarios(sipp_tool: str, workdir: Path) -> None:
    """The unmodified ``-sn uac`` / ``-sn uas``: the UAS does not copy Record-Route, so the UAC sends ACK
    and BYE without Route, to the proxy (``-rsa``) and by Request-URI; the proxy must still carry them."""
    uport, cport = free_port(), free_port()
    with OurProxy(workdir) as proxy, uas(workdir, uport, scenario=None):
        result = run_calls(
            workdir,
            f"127.0.0.1:{uport}",
            calls=1000,
            rate=200,
            port=cport,
            proxy=proxy.address("udp"),
            scenario=None,
            timeout=90,
        )
    assert (result.successful, result.failed) == (1000, 0), f"{result}\nproxy output:\n{proxy.output()}"
    assert proxy.final_stats().get("forwarded_requests", 0) >= 2000


def test_calls_through_our_stateless_proxy(sipp_tool: str, workdir: Path) -> None:
    uport, cport = free_port(), free_port()
    with OurProxy(workdir, stateless=True) as proxy, uas(workdir, uport, scenario=None):
        result = run_calls(
            workdir,
            f"127.0.0.1:{uport}",
            calls=200,
            rate=100,
            port=cport,
            proxy=proxy.address("udp"),
            scenario=None,
            timeout=60,
        )
    assert (result.successful, result.failed) == (200, 0), f"{result}\nproxy output:\n{proxy.output()}"


def test_calls_through_our_proxy_over_ipv6(sipp_tool: str, workdir: Path) -> None:
    """The same path on ::1: IPv6 references in Via, Record-Route, Contact and the Request-URI."""
    uport, cport = free_port("::1"), free_port("::1")
    with OurProxy(workdir, ["udp:[::1]:0"]) as proxy, uas(workdir, uport, host="::1"):
        result = run_calls(
            workdir,
            f"[::1]:{uport}",
            calls=100,
            rate=50,
            port=cport,
            host="::1",
            proxy=proxy.address("udp"),
            timeout=60,
        )
    assert (result.successful, result.failed) == (100, 0), f"{result}\nproxy output:\n{proxy.output()}"
    assert proxy.final_stats().get("forwarded_requests", 0) >= 200
