"""Mixed abuse of one peer for 10 minutes (issue 17): does its live state return to baseline afterwards?

One command, loopback only, bounded rates (see tests/abuse.py for the five kinds of abuse)::

    python3 bench/abuse.py                 # 600 s
    python3 bench/abuse.py --seconds 60    # what tests/test_abuse_soak.py runs

It prints what each attacker sent and got back, the peer's defence counters, the live state before the
abuse, at its end and once it settled, and the allocations of the peer's own code (tracemalloc) before,
at the end and after. Exit status 0 when the state came back to baseline and the legitimate user was still
callable, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from abuse import BOB, Rates, abuse, live_state, quiet, settle, start_target, traced_kib  # noqa: E402
from peer_phone import Phone  # noqa: E402


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


async def run(seconds: float, rates: Rates) -> int:
    tracemalloc.start(1)
    with tempfile.TemporaryDirectory(prefix="p2psip-abuse-") as tmp:
        peer = await start_target(Path(tmp) / "peer")
        bob = await Phone.open("bob")
        caller = await Phone.open("carol", host="127.0.0.10")
        try:
            assert (await bob.register(peer.sip_address("udp"), expires=3600)).status == 200
            assert (await caller.call(BOB, peer.sip_address("udp"), timeout=10)).answered
            baseline = await quiet(peer)
            kib_before = traced_kib(peer)
            print(f"abusing one peer for {seconds:g} s ({rates}) ...", flush=True)
            started = time.monotonic()
            tally = await abuse(peer, seconds, rates)
            elapsed = time.monotonic() - started
            at_end = live_state(peer)
            kib_end = traced_kib()  # memo tables still full: the peak the bounded tables reach
            counters = peer.status()["counters"]
            settled, took = await settle(peer, baseline, timeout=60)
            kib_after = traced_kib(peer)
            callable_after = (await caller.call(BOB, peer.sip_address("udp"), timeout=10)).answered
        finally:
            bob.close()
            caller.close()
            await peer.close(leave=False)
            tracemalloc.stop()

    print(f"\nattackers ({elapsed:.0f} s)")
    rows = [("kind", "sent", "what came back")]
    answers = dict(tally.answers)
    rows.append(("fuzz datagrams", str(tally.sent["fuzz"]), f"{answers.pop('fuzz', 0)} answers"))
    rows.append(("slowloris connections", str(tally.sent["slowloris connections"]),
                 f"{answers.pop('slowloris cut', 0)} cut by the peer"))  # fmt: skip
    rows.append(("REGISTER flood", str(tally.sent["register flood"]), "(not read)"))
    digests = ", ".join(f"{k.split()[-1]}: {v}" for k, v in sorted(answers.items()) if k.startswith("wrong"))
    rows.append(("wrong digests", str(tally.sent["wrong digests"]), digests))
    rows.append(("user scan INVITEs", str(tally.sent["scan"]), "(not read)"))
    print(table(rows))

    print("\npeer defences")
    names = [
        ("sip_parse_errors", "malformed messages"),
        ("sip_bad_request_answers", "answered 400/513"),
        ("sip_handler_errors", "core exceptions answered 400/500"),
        ("sip_slow_closed", "slow connections cut (message deadline)"),
        ("sip_connections_refused", "connections refused (caps)"),
        ("peer_new_aors_refused", "new AORs refused (rate)"),
        ("peer_user_keys_removed", "user keys swept"),
        ("peer_auth_failures", "digest failures"),
        ("peer_auth_delayed", "digest answers delayed"),
        ("peer_scans_refused", "scan requests refused (503)"),
        ("peer_not_found", "404s"),
        ("peer_takeovers_refused", "takeovers refused"),
    ]
    print(table([("counter", "value")] + [(label, str(counters.get(key, 0))) for key, label in names]))

    print("\nlive state")
    rows = [("", "baseline", "abuse end", f"settled ({took:.1f} s)")]
    rows += [(k, str(baseline[k]), str(at_end[k]), str(settled[k])) for k in baseline]
    rows.append(
        ("traced KiB (p2psip, overlay)", str(kib_before), f"{kib_end} (memo tables full)", str(kib_after))
    )
    print(table(rows))
    ok = settled == baseline and callable_after
    print(f"\nback to baseline: {'yes' if settled == baseline else 'NO'}; "
          f"bob callable after: {'yes' if callable_after else 'NO'}")  # fmt: skip
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="how long the abuse lasts (default 600)")
    parser.add_argument("--fuzz", type=float, default=Rates.fuzz, help="fuzz datagrams per second")
    parser.add_argument("--slow", type=int, default=Rates.slow, help="slowloris connections at once")
    parser.add_argument("--register", type=float, default=Rates.register, help="new-AOR REGISTERs per second")
    parser.add_argument("--guessers", type=int, default=Rates.guessers, help="wrong-digest guessers")
    parser.add_argument("--scan", type=float, default=Rates.scan, help="user-scan INVITEs per second")
    args = parser.parse_args()
    rates = Rates(args.fuzz, args.slow, args.register, args.guessers, args.scan)
    return asyncio.run(run(args.seconds, rates))


if __name__ == "__main__":
    sys.exit(main())
