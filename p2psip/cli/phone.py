"""The phone of the ``register``, ``call`` and ``demo`` commands: a :class:`~p2psip.useragent.UserAgent` on
a UDP stack of its own, bound to the local address the kernel uses toward the peer."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from p2psip.address import ListenSpec, Target
from p2psip.cli.common import fail, via_text
from p2psip.errors import CallFailed, P2PSIPError
from p2psip.message import Response
from p2psip.probe import DeadAddress, refused, unless_refused
from p2psip.stack import Stack
from p2psip.useragent import IncomingCall, UserAgent

__all__ = [
    "DeadAddress",
    "auto_answer",
    "close_phone",
    "local_ip_toward",
    "open_phone",
    "refused",
    "unless_refused",
]


def local_ip_toward(host: str) -> str:
    """The local address the kernel would use to reach ``host`` (a UDP connect sends nothing)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, 9))
            return str(probe.getsockname()[0])
        except OSError:
            return "::1" if family == socket.AF_INET6 else "127.0.0.1"


async def open_phone(
    aor: str,
    *,
    via: tuple[str, int] | None = None,
    host: str | None = None,
    port: int = 0,
    on_call: Callable[[IncomingCall], None] | None = None,
    instance: bool = False,
) -> UserAgent:
    """A UserAgent for ``aor`` whose out-of-dialog requests go through the peer at ``via``; close it with
    :func:`close_phone`. ``instance``: with an RFC 5626 ``+sip.instance`` of its own (a new one each
    run), so its calls do ICE by default when ``via`` answers STUN (a p2psip peer does: docs/nat.md)."""
    if host is None:
        host = local_ip_toward(via[0]) if via is not None else "127.0.0.1"
    stack = await Stack.start([ListenSpec("udp", host, port)])
    outbound = Target("udp", via[0], via[1]) if via is not None else None
    urn = f"<urn:uuid:{uuid.uuid4()}>" if instance else None
    return UserAgent(stack, aor, outbound=outbound, on_call=on_call, instance=urn)


async def close_phone(ua: UserAgent) -> None:
    await ua.close()
    await ua.stack.close()


def auto_answer(incoming: IncomingCall) -> None:
    """``on_call`` of an answering phone: 180 Ringing, then 200 OK (no media)."""
    incoming.ring()
    incoming.accept()


T = TypeVar("T")


def no_answer(via: tuple[str, int], timeout: float) -> str:
    """The one wording of every phone command for a peer that does not answer."""
    return f"no answer from {via_text(via)} within {timeout:g} s (is a peer running there?)"


def nothing_listens(via: tuple[str, int]) -> str:
    """The one wording of every phone command for a peer address that refuses."""
    return f"nothing listens at {via_text(via)} (connection refused: no peer or SIP server runs there)"


async def final_response(request: Awaitable[Response], via: tuple[str, int]) -> Response:
    """The final response to one request sent through the peer at ``via``, whatever its status. No
    response at all (the transaction timed out, or could not send) is TimeoutError; a ``via`` that
    refuses is :class:`DeadAddress`, at once."""
    try:
        return await unless_refused(request, via)
    except CallFailed as failed:
        if failed.response is None:
            raise TimeoutError from None
        return failed.response


def run_one(
    work: Coroutine[Any, Any, T],
    via: tuple[str, int],
    timeout: float,
    json_doc: dict[str, Any] | None = None,
) -> T | None:
    """``asyncio.run(work)``; a failure is printed as one line, in the words above, and gives None (the
    command then exits 1). With ``json_doc`` (``--json``) that document is printed too, with the
    ``error``: a script reading standard output always gets one JSON document."""
    try:
        return asyncio.run(work)
    except TimeoutError:
        error = no_answer(via, timeout)
    except DeadAddress:
        error = nothing_listens(via)
    except P2PSIPError as exc:
        error = str(exc)
    if json_doc is not None:
        print(json.dumps({**json_doc, "error": error}, indent=2))
    fail(error, 1)
    return None


def run_and_print(
    work: Coroutine[Any, Any, dict[str, Any]],
    via: tuple[str, int],
    args: Any,
    json_doc: dict[str, Any],
    line: Callable[[dict[str, Any]], None],
) -> dict[str, Any] | None:
    """One phone request (``register``, ``message``) as a command: :func:`run_one`, then its result as
    the JSON document (``--json``) or in words (``line``). None when it failed (already printed)."""
    result = run_one(work, via, args.timeout, json_doc if args.json else None)
    if result is None:
        return None
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        line(result)
    return result
