"""Shared parts of the peer interop tests: an overlay of in-process peers, and sipp runs that register
users from a CSV file and call them, with every child ended by PID (tests/interop's runners)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from interop.procs import ChildError
from interop.sipp import SippResult, run_calls
from peer_support import wait_until_settled

from overlay.localring import quick_node_config
from p2psip.config import HostPort, ListenSpec, PeerConfig
from p2psip.peer import Peer
from p2psip.ratelimit import UNLIMITED

SCENARIOS = Path(__file__).resolve().parent / "scenarios"
REGISTER = SCENARIOS / "register.xml"
UAC_USERS = SCENARIOS / "uac_users.xml"
DOMAIN = "p2p.example"
BARESIP_MODULES = "/usr/lib/baresip/modules"


def baresip_config(sip_listen: str, cons_port: int, *, apps: tuple[str, ...] = ()) -> str:
    """A headless baresip's config: PCMU, a 440 Hz source, no sound device, commands on UDP ``cons_port``.

    ``apps`` are extra application modules (``contact``, ``presence``, ``mwi``…) loaded after ``account``.
    One text for every baresip the peer interop tests start, so a setting changes in one place.
    """
    app_lines = "".join(f"module_app {name}.so\n" for name in ("account", *apps, "menu"))
    return (
        f"sip_listen {sip_listen}\n"
        "net_interface 127.0.0.1\n"
        "rtp_ports 40000-49999\n"  # off the fixed ports conftest.free_port hands out
        "audio_player aufile,/dev/null\n"
        "audio_source ausine,440\n"
        "audio_alert aufile,/dev/null\n"
        "ausrc_srate 48000\n"
        "ausrc_channels 2\n"
        f"module_path {BARESIP_MODULES}\n"
        "module g711.so\nmodule ausine.so\nmodule aufile.so\nmodule cons.so\n"
        f"cons_listen 127.0.0.1:{cons_port}\n" + app_lines
    )


async def start_overlay(
    count: int, data_root: Path, *, settle_timeout: float = 60.0, **settings: Any
) -> list[Peer]:
    """``count`` peers on loopback (UDP SIP, quick overlay maintenance), the ring settled; ``settings``
    are more PeerConfig fields on every peer (e.g. ``presence_allow``)."""
    peers: list[Peer] = []
    try:
        for i in range(count):
            config = PeerConfig(
                listen=[ListenSpec("udp", "127.0.0.1", 0)],
                overlay=HostPort("127.0.0.1", 0),
                join=HostPort(*peers[0].overlay_address) if peers else None,
                data_dir=data_root / f"peer{i}",
                cache_ttl=0.0,
                # sipp registers hundreds of AORs from one address: lift the bound on new AORs per source
                new_aors_per_source=UNLIMITED,
                new_aors_total=UNLIMITED,
                **settings,
            )
            peers.append(await Peer.start(config, node_config=quick_node_config()))
        await wait_until_settled(peers, timeout=settle_timeout)
    except BaseException:
        await stop_overlay(peers)
        raise
    return peers


async def stop_overlay(peers: list[Peer]) -> None:
    for peer in peers:
        if not peer._closed:
            await peer.close(leave=False)


def users_csv(path: Path, users: list[str], contact_hostport: str) -> Path:
    path.write_text("SEQUENTIAL\n" + "".join(f"{u};{DOMAIN};{contact_hostport}\n" for u in users))
    return path


async def sipp_register(
    workdir: Path, name: str, users: list[str], peer: Peer, contact_hostport: str, port: int
) -> SippResult:
    """Register ``users`` (contact user@contact_hostport) at ``peer`` with one sipp run."""
    csv = users_csv(workdir / f"{name}.csv", users, contact_hostport)
    host, sip_port = peer.sip_address()
    return await asyncio.to_thread(
        run_calls,
        workdir,
        f"{host}:{sip_port}",
        calls=len(users),
        rate=50,
        port=port,
        scenario=REGISTER,
        name=name,
        extra=["-inf", str(csv)],
        timeout=60,
    )


async def sipp_call_all(
    workdir: Path, name: str, users: list[str], peer: Peer, port: int, rate: float = 40
) -> SippResult:
    """Call sip:USER@p2p.example for every user through ``peer`` with one sipp UAC run."""
    csv = users_csv(workdir / f"{name}.csv", users, "unused")
    host, sip_port = peer.sip_address()
    try:
        return await asyncio.to_thread(
            run_calls,
            workdir,
            f"{host}:{sip_port}",
            calls=len(users),
            rate=rate,
            port=port,
            scenario=UAC_USERS,
            name=name,
            extra=["-inf", str(csv), "-key", "domain", DOMAIN],
            timeout=len(users) / rate + 60,
        )
    except ChildError as exc:  # pragma: no cover - reported by the assertion in the test
        raise AssertionError(str(exc)) from None
