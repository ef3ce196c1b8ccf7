"""``p2psip register`` and ``p2psip call``: one REGISTER, or one call, through a peer."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable
from typing import Any

from p2psip.cli.common import check_sip_uri, fail, local_ip_toward, parse_via, print_table
from p2psip.cli.phone import _Phone


async def _register(args: argparse.Namespace, via: tuple[str, int]) -> dict[str, Any]:
    phone = await _Phone.open(args.uri, host=local_ip_toward(via[0]))
    try:
        response = await phone.register(
            via, contact=args.contact, expires=args.expires, password=args.password, timeout=args.timeout
        )
    finally:
        await phone.close()
    return {
        "aor": args.uri,
        "via": f"{via[0]}:{via[1]}",
        "status": response.status,
        "reason": response.reason,
        "contacts": [
            {"contact": str(c.uri), "expires": c.expires}
            for c in (response.contacts if response.status == 200 else [])
        ],
    }


def _cmd_register(args: argparse.Namespace) -> int:
    from p2psip.errors import ConfigError, P2PSIPError

    try:
        via = parse_via(args.via)
        check_sip_uri(args.uri, "register")
        if args.contact is not None:
            from p2psip.uri import Address

            Address(args.contact)
        if args.expires < 0:
            raise ConfigError("--expires must be 0 or more seconds")
    except P2PSIPError as exc:
        return fail(str(exc), 2)
    try:
        result = asyncio.run(_register(args, via))
    except TimeoutError:
        return fail(f"no answer from {args.via} within {args.timeout:g} s", 1)
    except P2PSIPError as exc:
        return fail(str(exc), 1)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"REGISTER {result['aor']} via {result['via']}: {result['status']} {result['reason']}")
        if result["contacts"]:
            print_table(["contact", "expires"], [(c["contact"], c["expires"]) for c in result["contacts"]])
    return 0 if result["status"] == 200 else 1


async def _call(
    args: argparse.Namespace, via: tuple[str, int], duration: float, show: Callable[[str], None]
) -> dict[str, Any]:
    """One call through the UserAgent (with ``--play``/``--record`` its audio is p2psip.callaudio's)."""
    import time

    from p2psip.stack import Stack
    from p2psip.transport import Target
    from p2psip.useragent import CallFailed, UserAgent

    local_ip = local_ip_toward(via[0])
    stack = await Stack.start([f"udp:{'[' + local_ip + ']' if ':' in local_ip else local_ip}:0"])
    ua = UserAgent(stack, args.from_ or "sip:p2psip@invalid", outbound=Target("udp", via[0], via[1]))
    statuses: list[str] = []
    with_audio = bool(args.play or args.record)

    def provisional(response: Any) -> None:
        statuses.append(f"{response.status} {response.reason}")
        show(f"  {response.status} {response.reason}")

    result: dict[str, Any] = {"uri": args.uri, "via": f"{via[0]}:{via[1]}", "answered": False}
    call: Any = None
    try:
        started = time.perf_counter()
        show(f"INVITE {args.uri} via {via[0]}:{via[1]}")
        try:
            if with_audio:
                call = await ua.call(
                    args.uri,
                    play=args.play,
                    record=args.record,
                    timeout=args.timeout,
                    on_provisional=provisional,
                )
            else:
                call = await ua.call(args.uri, timeout=args.timeout, on_provisional=provisional)
            status, reason = call.response.status, call.response.reason
        except CallFailed as failed:  # a failure response, or 408/503 made up for a timeout/transport error
            status, reason = failed.status, failed.reason
        result["setup_ms"] = round((time.perf_counter() - started) * 1000, 1)
        statuses.append(f"{status} {reason}")
        show(f"  {status} {reason}")
        result["responses"] = statuses
        result["status"] = status
        if call is not None:
            result["answered"] = True
            if call.media is not None and call.media.params is not None:
                params = call.media.params
                result["codec"] = params.codec
                show(f"  audio: {params.codec} to {params.remote[0]}:{params.remote[1]}")
            show(f"  call up; hanging up in {duration:g} s")
            try:
                ended = await call.wait_ended(duration)  # the call's requested length, unless they hang up
                show(f"  the call ended: {ended}")
            except TimeoutError:
                bye = await call.bye(timeout=args.timeout)
                result["bye_status"] = bye.status
                show(f"BYE: {bye.status} {bye.reason}")
    finally:
        if call is not None and call.media is not None:
            await call.wait_ended(args.timeout)  # the media is closed (a recording complete) after this
            stats = call.media.session.stats
            result["rtp_sent"] = stats.packets_sent
            result["rtp_received"] = stats.packets_received
            show(f"RTP: {stats.packets_sent} packets sent, {stats.packets_received} received")
        await ua.close()
        await stack.close()
    return result


def _cmd_call(args: argparse.Namespace) -> int:
    from p2psip.errors import ConfigError, P2PSIPError

    try:
        via = parse_via(args.via)
        check_sip_uri(args.uri, "call")
        if args.from_:
            check_sip_uri(args.from_, "--from")
        if (args.duration is not None and args.duration < 0) or args.timeout <= 0:
            raise ConfigError("--duration must be >= 0 and --timeout > 0")
        duration = 1.0 if args.duration is None else args.duration
        if args.play:
            from p2psip.media.sources import WavSource

            wav = WavSource(args.play)  # a missing or unreadable file is a usage error
            wav.close()
            if args.duration is None:
                duration = wav.duration + 0.5  # the whole file, and its last packets' way over
    except P2PSIPError as exc:
        return fail(str(exc), 2)

    def show(line: str) -> None:
        if not args.json:
            print(line, flush=True)

    try:
        result = asyncio.run(_call(args, via, duration, show))
    except TimeoutError:
        return fail(f"no final answer within {args.timeout:g} s", 1)
    except P2PSIPError as exc:
        return fail(str(exc), 1)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0 if result["answered"] else 1


def add_commands(sub: Any) -> None:
    register = sub.add_parser("register", help="send one REGISTER for an AOR to a peer")
    register.add_argument("uri", metavar="SIP-URI", help="the address of record, e.g. sip:alice@p2p.example")
    register.add_argument("--via", required=True, metavar="HOST:PORT", help="the peer to register at")
    register.add_argument(
        "--contact", metavar="URI", help="the contact to bind (default: this command's address)"
    )
    register.add_argument("--expires", type=int, default=3600, metavar="S", help="seconds (0 removes)")
    register.add_argument("--password", metavar="P", help="answer a digest challenge with this password")
    register.add_argument("--timeout", type=float, default=10.0, metavar="S", help="give up after S seconds")
    register.add_argument("--json", action="store_true", help="machine-readable output")
    register.set_defaults(func=_cmd_register)

    call = sub.add_parser("call", help="call a SIP URI through a peer, then hang up")
    call.add_argument("uri", metavar="SIP-URI")
    call.add_argument(
        "--via", default="127.0.0.1:5060", metavar="HOST:PORT", help="the peer (default 127.0.0.1:5060)"
    )
    call.add_argument("--from", dest="from_", metavar="SIP-URI", help="the caller's address")
    call.add_argument(
        "--duration",
        type=float,
        metavar="S",
        help="seconds to stay up (default 1, or the length of --play's file)",
    )
    call.add_argument("--timeout", type=float, default=30.0, metavar="S", help="give up after S seconds")
    call.add_argument("--play", metavar="WAV", help="audio to send (a WAV file, any rate)")
    call.add_argument("--record", metavar="WAV", help="where to record the audio received (a WAV file)")
    call.add_argument("--json", action="store_true", help="machine-readable output")
    call.set_defaults(func=_cmd_call)
