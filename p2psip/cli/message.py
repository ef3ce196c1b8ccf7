"""``p2psip message``: one instant message (RFC 3428 MESSAGE) to an address of record through a peer.

The peer delivers it to every device registered for the AOR (forking) and answers with the best response:
200 when a device took it, 404 when nobody is registered, 408/480 when nobody answered.
"""

from __future__ import annotations

import argparse
from typing import Any

from p2psip.cli.common import add_phone_options, check_phone_args, fail, via_text
from p2psip.cli.phone import close_phone, final_response, open_phone, run_and_print


async def _message(args: argparse.Namespace, via: tuple[str, int]) -> dict[str, Any]:
    ua = await open_phone(args.from_ or "sip:p2psip@invalid", via=via)
    try:
        response = await final_response(ua.message(args.uri, args.text, timeout=args.timeout), via)
    finally:
        await close_phone(ua)
    return {"uri": args.uri, "via": via_text(via), "status": response.status, "reason": response.reason}


def _cmd_message(args: argparse.Namespace) -> int:
    from p2psip.errors import ConfigError, P2PSIPError

    try:
        via = check_phone_args(args, "message")
        if not args.text:
            raise ConfigError("message: the text is empty")
    except P2PSIPError as exc:
        return fail(str(exc), 2)
    base = {"uri": args.uri, "via": via_text(via)}

    def line(result: dict[str, Any]) -> None:
        print(f"MESSAGE {result['uri']} via {result['via']}: {result['status']} {result['reason']}")

    result = run_and_print(_message(args, via), via, args, base, line)
    return 1 if result is None or not 200 <= result["status"] < 300 else 0


def add_commands(sub: Any) -> None:
    message = sub.add_parser("message", help="send an instant message to a SIP address through a peer")
    add_phone_options(message, timeout=32.0, sender="the sender's address")
    message.add_argument("text", help="the message (text/plain)")
    message.set_defaults(func=_cmd_message)
