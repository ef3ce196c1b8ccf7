"""sipp against two peers for the refusals of message-waiting indication (p2psip/mailbox.py): registered
as carol, sipp gets 404 for her own message-summary (no voicemail known for her) and 403 for jones's
(as herself, as an unvouched "jones", with a forged P-P2PSIP-Vouch, with an Event parameter). The
scenario counts as one successful sipp call only when every answer came with the checked status and
reason (scenarios/mwi_refusals.xml)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import free_port, require_tool
from interop.sipp import run_calls

from p2psip.mailbox import MailboxPolicy

from .helpers import DOMAIN, SCENARIOS, start_overlay, stop_overlay

pytestmark = pytest.mark.interop


async def test_sipp_mwi_refusals(tmp_path: Path) -> None:
    require_tool("sipp")
    peers = await start_overlay(2, tmp_path)
    try:
        for peer in peers:
            peer.mailboxes = MailboxPolicy({f"sip:jones@{DOMAIN}": f"sip:jones@voicemail.{DOMAIN}"})
        host, port = peers[1].sip_address()
        result = await asyncio.to_thread(
            run_calls,
            tmp_path,
            f"{host}:{port}",
            calls=1,
            rate=1,
            port=free_port(),
            scenario=SCENARIOS / "mwi_refusals.xml",
            service=DOMAIN,
            name="mwi",
            timeout=60,
        )
        assert result.successful == 1 and result.failed == 0, str(result)
        assert sum(p.counters["mwi_refused"] for p in peers) == 4
        assert sum(p.counters["mwi_retargeted"] for p in peers) == 0
    finally:
        await stop_overlay(peers)
