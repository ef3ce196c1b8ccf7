"""bench/proxy_path.py keeps measuring what it says: sipp's call through the real Stack and Proxy (every
datagram the proxy sends is the one the scenario expects next, every transaction ends with its timers)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import proxy_path


async def test_the_replayed_calls_go_through_and_every_transaction_ends() -> None:
    # run() asserts each hop of each call (INVITE out to the UAS, 180 and 200 back to the UAC, ACK and
    # BYE by Record-Route, the BYE's 200 back) and that no transaction is left after the timers ran
    us = await proxy_path.run(calls=20, rounds=2)
    assert 0 < us < 1_000_000


def test_bad_arguments_exit_2() -> None:
    assert proxy_path.main(["--calls", "0"]) == 2
