"""``p2psip register`` and ``p2psip call``: one REGISTER, or one call, through a peer."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2psip.cli.common import add_phone_options, check_phone_args, check_sip_uri, fail, print_table, via_text
from p2psip.cli.phone import (
    DeadAddress,
    close_phone,
    final_response,
    no_answer,
    nothing_listens,
    open_phone,
    run_and_print,
    run_one,
    unless_refused,
)


async def _register(args: argparse.Namespace, via: tuple[str, int]) -> dict[str, Any]:
    from p2psip.uri import URI

    ua = await open_phone(args.uri, via=via)
    try:
        registering = ua.register(
            f"sip:{URI(args.uri).host}",
            contact=args.contact,
            expires=args.expires,
            password=args.password,
            refresh=False,
            timeout=args.timeout,
        )
        response = await final_response(registering, via)
    finally:
        await close_phone(ua)
    return {
        "aor": args.uri,
        "via": via_text(via),
        "status": response.status,
        "reason": response.reason,
        "contacts": [
            {"contact": str(c.uri), "expires": c.expires}
            for c in (response.contacts if response.status == 200 else [])
        ],
    }


async def _stay_registered(
    args: argparse.Namespace, via: tuple[str, int], result: dict[str, Any]
) -> dict[str, Any]:
    """``register --stay``: this command is the phone. It registers as an RFC 5626 outbound client (an
    instance id and reg-id, so the peer keeps a flow to it), keeps the registration alive (keep-alives,
    refreshes, a new REGISTER as soon as the flow fails: :class:`~p2psip.useragent.UserAgent` does all of
    it), prints the messages and calls it receives, and unregisters when SIGINT or SIGTERM stops it."""
    from p2psip.run import stop_signals
    from p2psip.uri import URI

    def show(text: str) -> None:
        if not args.json:
            print(text, flush=True)

    def on_call(incoming: Any) -> None:
        caller = str(incoming.request.from_.uri) if incoming.request.from_ is not None else "?"
        show(f"call from {caller}: declined 480 (register --stay answers no calls)")
        result["calls"].append(caller)
        incoming.reject(480)

    def on_message(request: Any) -> None:
        sender = str(request.from_.uri) if request.from_ is not None else "?"
        text = request.body.decode("utf-8", "replace")
        show(f"MESSAGE from {sender}: {text}")
        result["messages"].append({"from": sender, "text": text})

    result.update(calls=[], messages=[])
    ua = await open_phone(args.uri, via=via, on_call=on_call, instance=True)
    ua.on_message_cb = on_message
    registrar = f"sip:{URI(args.uri).host}"
    try:
        with stop_signals() as stopped:
            registering = ua.register(
                registrar, expires=args.expires, password=args.password, timeout=args.timeout
            )
            response = await final_response(registering, via)
            result.update(status=response.status, reason=response.reason)
            if response.status != 200:
                return result
            outbound = ua.outbound_flow(registrar)
            result["outbound"] = outbound
            show(
                f"REGISTER {args.uri} via {via_text(via)}: 200 OK; staying registered"
                f" ({'an RFC 5626 flow the peer keeps' if outbound else 'no RFC 5626 flow: refreshed only'})"
                "; Ctrl-C unregisters"
            )
            await stopped.wait()
        with contextlib.suppress(Exception):  # leaving anyway: a peer gone meanwhile is not an error
            await asyncio.wait_for(ua.register(registrar, expires=0, timeout=5.0), 6.0)
            result["unregistered"] = True
            show(f"unregistered {args.uri}")
    finally:
        await close_phone(ua)
    return result


def _cmd_register(args: argparse.Namespace) -> int:
    from p2psip.errors import ConfigError, P2PSIPError

    try:
        via = check_phone_args(args, "register")
        if args.contact is not None:
            from p2psip.uri import Address

            Address(args.contact)
        if args.expires < 0:
            raise ConfigError("--expires must be 0 or more seconds")
        if args.stay and (args.contact is not None or args.expires == 0):
            raise ConfigError(
                "--stay keeps this command's own contact registered: not with --contact or --expires 0"
            )
    except P2PSIPError as exc:
        return fail(str(exc), 2)
    base = {"aor": args.uri, "via": via_text(via)}
    if args.stay:
        work = _stay_registered(args, via, dict(base))
        stayed = run_one(work, via, args.timeout, base if args.json else None)
        if stayed is None:
            return 1
        if args.json:
            print(json.dumps(stayed, indent=2))
        elif stayed["status"] != 200:
            print(f"REGISTER {args.uri} via {via_text(via)}: {stayed['status']} {stayed['reason']}")
        return 0 if stayed["status"] == 200 else 1

    def line(result: dict[str, Any]) -> None:
        print(f"REGISTER {result['aor']} via {result['via']}: {result['status']} {result['reason']}")
        if result["contacts"]:
            print_table(["contact", "expires"], [(c["contact"], c["expires"]) for c in result["contacts"]])

    result = run_and_print(_register(args, via), via, args, base, line)
    return 1 if result is None or result["status"] != 200 else 0


class _Interrupted(Exception):
    """SIGINT or SIGTERM arrived during the call."""


async def _call(
    args: argparse.Namespace,
    via: tuple[str, int],
    duration: float,
    show: Callable[[str], None],
    result: dict[str, Any],
) -> None:
    """One call through the UserAgent (with ``--play``/``--record`` its audio is p2psip.callaudio's),
    filling ``result`` as it goes: whatever stops it (a failure, a timeout, Ctrl-C), what happened so far
    is there to print."""
    from p2psip.run import stop_signals
    from p2psip.useragent import CallFailed

    ua = await open_phone(args.from_ or "sip:p2psip@invalid", via=via, instance=True)
    statuses: list[str] = []
    with_audio = bool(args.play or args.record)

    def provisional(response: Any) -> None:
        statuses.append(f"{response.status} {response.reason}")
        show(f"  {response.status} {response.reason}")

    call: Any = None

    async def place_and_hang_up() -> None:
        nonlocal call
        started = time.perf_counter()
        show(f"INVITE {args.uri} via {via_text(via)}")
        try:
            if with_audio:
                placing = ua.call(
                    args.uri,
                    play=args.play,
                    record=args.record,
                    timeout=args.timeout,
                    on_provisional=provisional,
                )
            else:
                placing = ua.call(args.uri, timeout=args.timeout, on_provisional=provisional)
            try:
                call = await unless_refused(placing, via)
            except TimeoutError:
                result["error"] = (
                    f"no final answer to the INVITE within {args.timeout:g} s"
                    if statuses
                    else no_answer(via, args.timeout)
                )
                raise
            status, reason = call.response.status, call.response.reason
        except CallFailed as failed:  # a failure response, or 408/503 made up for a timeout/transport error
            status, reason = failed.status, failed.reason
        result["setup_ms"] = round((time.perf_counter() - started) * 1000, 1)
        statuses.append(f"{status} {reason}")
        show(f"  {status} {reason}")
        result["responses"] = statuses
        result["status"] = status
        if call is None:
            return
        result["answered"] = True
        if call.media is not None and call.media.params is not None:
            params = call.media.params
            result["codec"] = params.codec
            show(f"  audio: {params.codec} to {params.remote[0]}:{params.remote[1]}")
        then = f"transferring to {args.transfer_to}" if args.transfer_to else "hanging up"
        show(f"  call up; {then} in {duration:g} s")
        try:
            ended = await call.wait_ended(duration)  # the call's requested length, unless they hang up
            show(f"  the call ended: {ended}")
        except TimeoutError:
            if args.transfer_to and await _transfer(call, args, show, result):
                return
            try:
                bye = await call.bye(timeout=args.timeout)
            except TimeoutError:
                result["error"] = (
                    f"the call was answered, but the BYE got no answer within {args.timeout:g} s"
                )
                raise
            except CallFailed as failed:  # 408/503 made up by the transaction layer
                result["error"] = (
                    f"the call was answered, but the BYE failed: {failed.status} {failed.reason}"
                )
                raise
            result["bye_status"] = bye.status
            show(f"BYE: {bye.status} {bye.reason}")

    try:
        with stop_signals() as stopped:
            flow = asyncio.ensure_future(place_and_hang_up())
            stop = asyncio.ensure_future(stopped.wait())
            await asyncio.wait({flow, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not flow.done():
                flow.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await flow
                # ringing: CANCEL (and ACK its 487); up: BYE. Bounded: a second Ctrl-C ends it at once.
                said = await ua.hang_up(timeout=min(args.timeout, 5.0))
                result["interrupted"] = "; ".join(said) or "nothing was sent yet"
                raise _Interrupted
            flow.result()
    except TimeoutError:
        await ua.hang_up(timeout=min(args.timeout, 5.0))  # a CANCELled INVITE: wait for (and ACK) its 487
        raise
    finally:
        if call is not None and call.media is not None:
            with contextlib.suppress(TimeoutError):
                await call.wait_ended(args.timeout)  # the media is closed (a recording complete) after this
            stats = call.media.session.stats
            result["rtp_sent"] = stats.packets_sent
            result["rtp_received"] = stats.packets_received
            show(f"RTP: {stats.packets_sent} packets sent, {stats.packets_received} received")
        await close_phone(ua)


async def _transfer(
    call: Any, args: argparse.Namespace, show: Callable[[str], None], result: dict[str, Any]
) -> bool:
    """Blind transfer (REFER) of the answered call to ``--transfer-to``; True when the far end reported
    the new call answered (we have hung up then), False when it failed (the call is still up)."""
    from p2psip.errors import P2PSIPError

    show(f"REFER to {args.transfer_to}")
    try:
        frag = await call.transfer(args.transfer_to, timeout=args.timeout)
    except (P2PSIPError, TimeoutError) as exc:
        reason = str(exc) or "no final NOTIFY"
        result["transfer"] = reason
        show(f"  transfer failed: {reason}")
        return False
    assert frag is not None
    result["transfer_status"] = frag.status
    show(f"  transfer: {frag.status} {frag.reason}")
    return bool(frag.success)


def _check_record(path: str) -> None:
    """``--record`` must be writable before the call starts (not found out after it was answered)."""
    from p2psip.errors import ConfigError

    folder = Path(path).expanduser().resolve().parent
    if not folder.is_dir():
        raise ConfigError(f"--record {path}: no such directory {folder}")
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"--record {path}: cannot write in {folder}")
    if Path(path).is_dir():
        raise ConfigError(f"--record {path}: is a directory")


def _cmd_call(args: argparse.Namespace) -> int:
    from p2psip.errors import ConfigError, P2PSIPError

    try:
        via = check_phone_args(args, "call")
        if args.transfer_to:
            check_sip_uri(args.transfer_to, "--transfer-to")
        if args.duration is not None and args.duration < 0:
            raise ConfigError("--duration must be 0 or more seconds")
        duration = 1.0 if args.duration is None else args.duration
        if args.play:
            from p2psip.media.sources import WavSource

            wav = WavSource(args.play)  # a missing or unreadable file is a usage error
            wav.close()
            if args.duration is None:
                duration = wav.duration + 0.5  # the whole file, and its last packets' way over
        if args.record:
            _check_record(args.record)
    except P2PSIPError as exc:
        return fail(str(exc), 2)

    def show(line: str) -> None:
        if not args.json:
            print(line, flush=True)

    result: dict[str, Any] = {"uri": args.uri, "via": via_text(via), "answered": False}
    code = 0
    try:
        asyncio.run(_call(args, via, duration, show, result))
        code = 0 if result["answered"] else 1
    except _Interrupted:
        code = 130
    except TimeoutError:
        code = 1
    except DeadAddress:
        result["error"] = nothing_listens(via)
        code = 1
    except P2PSIPError as exc:
        result.setdefault("error", str(exc))
        code = 1
    if args.json:
        print(json.dumps(result, indent=2))  # always: what happened so far, the error too
    if "interrupted" in result:
        print(f"p2psip: interrupted: {result['interrupted']}", file=sys.stderr)
    elif "error" in result:
        fail(result["error"], code)
    return code


def add_commands(sub: Any) -> None:
    register = sub.add_parser("register", help="send one REGISTER for an AOR to a peer")
    add_phone_options(
        register, timeout=10.0, sender=None, via_help="the peer to register at", via_required=True
    )
    register.add_argument(
        "--contact", metavar="URI", help="the contact to bind (default: this command's address)"
    )
    register.add_argument("--expires", type=int, default=3600, metavar="S", help="seconds (0 removes)")
    register.add_argument("--password", metavar="P", help="answer a digest challenge with this password")
    register.add_argument(
        "--stay",
        action="store_true",
        help="stay registered until Ctrl-C or SIGTERM as an RFC 5626 outbound client (keep-alives, "
        "refreshes, a new REGISTER when the flow fails), print the messages and calls received, then "
        "unregister",
    )
    register.set_defaults(func=_cmd_register)

    call = sub.add_parser("call", help="call a SIP URI through a peer, then hang up")
    add_phone_options(call, timeout=30.0, sender="the caller's address")
    call.add_argument(
        "--duration",
        type=float,
        metavar="S",
        help="seconds to stay up (default 1, or the length of --play's file)",
    )
    call.add_argument("--play", metavar="WAV", help="audio to send (a WAV file, any rate)")
    call.add_argument("--record", metavar="WAV", help="where to record the audio received (a WAV file)")
    call.add_argument(
        "--transfer-to",
        metavar="SIP-URI",
        help="after --duration, transfer the call there (REFER, blind) instead of hanging up",
    )
    call.set_defaults(func=_cmd_call)
