"""The scripting contract (DESIGN.md), checked on a stand-alone script server in this process with our own
UAs as callers and callees over loopback: header access, location, accept/reject/redirect/challenge/
default, proxy outcomes ('success', 'busy', 'noanswer', 'redirect', 'failure') with the non-2xx held back,
forking, ``async def`` handlers, and what a failing or slow handler costs."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any, cast

import pytest
from test_sipapi_support import UdpClient

from p2psip.message import Request, parse
from p2psip.stack import Stack
from p2psip.useragent import CallFailed, IncomingCall, UserAgent
from sipapi.events import Event, EventTarget, ScriptError
from sipapi.server import ListenPoint, Server

RAW = (
    b"INVITE sip:bob@example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5080;branch=z9hG4bK0\r\n"
    b"Max-Forwards: 69\r\n"
    b'From: "Carol" <sip:carol@example.com>;tag=abc\r\n'
    b"To: <sip:bob@example.com>\r\n"
    b"Call-ID: 1@x\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
)


class Recorder:
    """A Controller that records the decisions (to check the Event/Action rules without a network)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def in_loop(self) -> bool:
        return False

    def respond(self, *args: Any) -> None:
        self.calls.append(("respond", *args))

    def redirect(self, *args: Any) -> None:
        self.calls.append(("redirect", *args))

    def challenge(self, *args: Any) -> None:
        self.calls.append(("challenge", *args))

    def default(self) -> None:
        self.calls.append(("default",))

    def save(self) -> None:
        self.calls.append(("save",))

    def proxy(self, locations: list[str], timeout: float | None) -> str:
        self.calls.append(("proxy", locations, timeout))
        return "busy"

    def proxy_async(self, locations: list[str], timeout: float | None) -> Any:
        raise AssertionError("not in a loop")

    def lookup(self, aor: str) -> list[str]:
        return ["sip:bob@127.0.0.1:5099"]

    def lookup_async(self, aor: str) -> Any:
        raise AssertionError("not in a loop")

    def authenticate(self, realm: str, users: dict[str, str]) -> str | None:
        return None


def test_event_reads_like_the_request() -> None:
    request = parse(RAW)
    assert isinstance(request, Request)
    rec = Recorder()
    event = Event(request, rec)
    assert event["Max-Forwards"] is not None and int(event["Max-Forwards"].value) == 69
    frm = event["From"]
    assert frm is not None and frm.uri is not None
    assert (frm.uri.user, frm.uri.host, frm.display, frm.tag) == ("carol", "example.com", "Carol", "abc")
    assert event["f"] == frm  # compact names too
    assert event["X-Nothing"] is None  # missing header: None, not KeyError
    assert event["Max-Forwards"].uri is None  # not an address: None, not an error
    assert [v.value for v in event.all("Via")] == [
        "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1",
        "SIP/2.0/UDP 127.0.0.1:5080;branch=z9hG4bK0",
    ]
    assert (event.method, str(event.uri), event.uri.user) == ("INVITE", "sip:bob@example.com", "bob")
    assert str(event) == str(request) and len(str(event)) == len(RAW)
    assert str(event.location) == "sip:bob@example.com"
    event.location = ["sip:a@127.0.0.1", "<sip:b@127.0.0.1:5062>"]
    assert [str(u) for u in event.location] == ["sip:a@127.0.0.1", "sip:b@127.0.0.1:5062"]  # type: ignore[union-attr]
    assert event.action.proxy(timeout=3) == "busy"  # a non-2xx outcome: may still decide
    event.action.redirect()
    with pytest.raises(ScriptError):
        event.action.reject(486)  # already answered
    assert rec.calls == [
        ("proxy", ["sip:a@127.0.0.1", "sip:b@127.0.0.1:5062"], 3),
        ("redirect", ["sip:a@127.0.0.1", "sip:b@127.0.0.1:5062"], 302),
    ]
    with pytest.raises(ScriptError):
        Event(request, rec).action.accept(code=486)
    with pytest.raises(ScriptError):
        Event(request, rec).action.save()  # only a REGISTER
    looked = Event(request, rec)
    assert looked.lookup() and str(looked.location) == "sip:bob@127.0.0.1:5099"


# ------------------------------------------------------------------------------------- on the wire

Handler = Callable[[Event], Any]


class Rig:
    """A script server with one handler, a caller, and callees of our own."""

    def __init__(self) -> None:
        self.target = EventTarget()
        self.stacks: list[Stack] = []
        self.outcomes: list[str] = []
        self.server: Server | None = None
        self.loop = asyncio.get_running_loop()
        self.recorded = asyncio.Event()

    def record(self, *outcomes: str) -> None:
        """Called by a handler (on the script runtime's thread) with the outcomes it saw."""
        self.outcomes += outcomes
        self.loop.call_soon_threadsafe(self.recorded.set)

    async def outcomes_when(self, count: int, timeout: float = 10.0) -> list[str]:
        """The outcomes once ``count`` were recorded: the caller's final response can arrive before the
        handler, which goes on after proxy() returns, has recorded what proxy() said."""
        while len(self.outcomes) < count:
            self.recorded.clear()
            if len(self.outcomes) >= count:
                break
            await asyncio.wait_for(self.recorded.wait(), timeout)
        return list(self.outcomes)

    async def start(self, handler: Handler, deadline: float = 5.0) -> None:
        self.target.addEventListener("incoming", handler)
        self.server = await Server.start(self.target, [ListenPoint("127.0.0.1", 0, "udp")], deadline=deadline)

    async def ua(
        self, aor: str, on_call: Callable[[IncomingCall], None] | None = None, **kw: Any
    ) -> UserAgent:
        stack = await Stack.start(["udp:127.0.0.1:0"])
        self.stacks.append(stack)
        return UserAgent(stack, aor, on_call=on_call, **kw)

    async def callee(self, behaviour: str) -> str:
        def on_call(incoming: IncomingCall) -> None:
            if behaviour == "answer":
                incoming.accept()
            elif behaviour == "ring":
                incoming.ring()
            elif behaviour == "redirect":
                incoming.reject(302)
            else:
                incoming.reject(int(behaviour))

        ua = await self.ua("sip:bob@127.0.0.1", on_call)
        return str(ua.stack.local_uri("udp", user="bob"))

    async def caller(self, **kw: Any) -> UserAgent:
        assert self.server is not None
        host, port = self.server.stack.local_address("udp")
        return await self.ua("sip:carol@example.com", outbound=f"{host}:{port}", **kw)

    async def close(self) -> None:
        for stack in self.stacks:
            await stack.close()
        if self.server is not None:
            await self.server.close()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    r = Rig()
    yield r
    await r.close()


async def status_of(ua: UserAgent, uri: str = "sip:bob@example.com") -> int:
    try:
        call = await ua.call(uri, timeout=15)
    except CallFailed as failed:
        return failed.status
    await call.bye()
    return 200


@pytest.mark.parametrize(
    ("behaviour", "outcome", "status"),
    [("answer", "success", 200), ("486", "busy", 486), ("600", "busy", 600), ("480", "noanswer", 480),
     ("redirect", "redirect", 302), ("404", "failure", 404), ("503", "failure", 500)],
)  # fmt: skip
async def test_proxy_outcomes_and_the_held_response(
    rig: Rig, behaviour: str, outcome: str, status: int
) -> None:
    target = await rig.callee(behaviour)

    def handler(event: Event) -> None:
        if event["To"].tag:  # in-dialog (ACK aside, the BYE comes here too): follow the Route
            event.action.proxy()
            return
        event.location = target
        rig.record(event.action.proxy(timeout=10))  # then nothing: the held response goes up

    await rig.start(handler)
    assert await status_of(await rig.caller()) == status
    assert await rig.outcomes_when(1) == [outcome]


async def test_noanswer_cancels_and_the_handler_may_still_decide(rig: Rig) -> None:
    target = await rig.callee("ring")
    callee_stack = rig.stacks[-1]

    def handler(event: Event) -> None:
        event.location = target
        outcome = event.action.proxy(timeout=0.5)
        rig.record(outcome)
        if outcome == "noanswer":
            event.location = "sip:jones@voicemail.example.com"
            event.action.redirect()

    await rig.start(handler)
    caller = await rig.caller()
    with pytest.raises(CallFailed) as failed:
        await caller.call("sip:bob@example.com", timeout=15)
    assert failed.value.status == 302 and await rig.outcomes_when(1) == ["noanswer"]
    assert failed.value.response is not None
    assert failed.value.response.get("Contact") == "<sip:jones@voicemail.example.com>"
    assert callee_stack.stats["received"] >= 3  # INVITE, CANCEL, ACK for its 487


async def test_failure_without_target_and_fork(rig: Rig) -> None:
    busy = await rig.callee("486")
    answers = await rig.callee("answer")

    def handler(event: Event) -> None:
        if event["To"].tag:
            event.action.proxy()
            return
        if event.uri.user == "nobody":
            event.location = "sip:x@nowhere.invalid"  # a name, no DNS: no reachable target
            rig.record(event.action.proxy())
            return
        event.location = [busy, answers]
        rig.record(event.action.proxy(timeout=10))

    await rig.start(handler)
    caller = await rig.caller()
    assert await status_of(caller, "sip:nobody@example.com") == 404
    assert await status_of(caller) == 200
    assert await rig.outcomes_when(2) == ["failure", "success"]


async def test_async_handler_awaits_proxy(rig: Rig) -> None:
    busy = await rig.callee("486")
    answers = await rig.callee("answer")

    async def handler(event: Event) -> None:
        if event["To"].tag:
            await event.action.proxy()
            return
        event.location = busy
        first = await event.action.proxy(timeout=5)
        event.location = answers
        second = await event.action.proxy(timeout=5)
        rig.record(first, second)

    await rig.start(handler)
    assert await status_of(await rig.caller()) == 200
    assert await rig.outcomes_when(2) == ["busy", "success"]


async def test_challenge_and_authenticate(rig: Rig) -> None:
    def handler(event: Event) -> Any:
        user = event.authenticate({"carol": "secret"}, realm="example.com")
        if user is None:
            return event.action.challenge("example.com")
        return event.action.accept(headers=[("X-User", user)])

    await rig.start(handler)
    good = await rig.caller(password="secret")
    reply = await good.message("sip:bob@example.com", "hello")
    assert reply.status == 200 and reply.get("X-User") == "carol"
    bad = await rig.caller(password="wrong")
    assert (await bad.message("sip:bob@example.com", "hello")).status == 401


async def test_a_failing_or_slow_handler_costs_one_request(rig: Rig) -> None:
    release = threading.Event()  # the slow handler overruns for sure: it waits for the test, not a clock

    def handler(event: Event) -> Any:
        if event.uri.user == "boom":
            raise RuntimeError("bug in the script")
        if event.uri.user == "slow":
            release.wait(60)  # past the 2 s deadline: 500, the thread is left to finish
        if event.uri.user == "twice":
            event.action.accept()
            event.action.accept()
        return event.action.reject(code=486, reason="Busy Here")

    # 2 s: ample for the quick handlers on a loaded machine (a timeout there would be a wrong 500).
    await rig.start(handler, deadline=2.0)
    caller = await rig.caller()
    try:
        assert await status_of(caller, "sip:boom@example.com") == 500
        assert await status_of(caller, "sip:slow@example.com") == 500
        assert await status_of(caller, "sip:twice@example.com") == 200  # the first answer stands
        assert await status_of(caller, "sip:ok@example.com") == 486
    finally:
        release.set()
    assert rig.server is not None
    assert rig.server.core.script_stats["script_errors"] >= 2
    assert rig.server.core.script_stats["script_timeouts"] == 1


async def test_default_is_501_and_max_forwards_in_proxy(rig: Rig) -> None:
    def handler(event: Event) -> Any:
        if event.method == "MESSAGE":
            return None  # no decision: the default action (501 in a stand-alone server)
        event.location = "sip:bob@127.0.0.1:9"
        rig.record(event.action.proxy())

    await rig.start(handler)
    caller = await rig.caller()
    assert (await caller.message("sip:bob@example.com", "hi")).status == 501
    assert rig.server is not None
    client = UdpClient()
    try:
        request = client.request("OPTIONS", "sip:bob@example.com", max_forwards=0)
        reply = await asyncio.to_thread(client.send, request, rig.server.stack.local_address("udp"), 10.0)
    finally:
        client.close()
    assert reply.status == 483 and await rig.outcomes_when(1) == [
        "failure"
    ]  # proxy() checks Max-Forwards (§16.3)


def test_script_file_names_are_safe() -> None:
    from sipapi.scripts import script_name

    def name(uri: str) -> str | None:
        request = parse(RAW.replace(b"sip:bob@example.com SIP/2.0", f"{uri} SIP/2.0".encode()))
        assert isinstance(request, Request)
        return script_name(request)

    assert name("sip:jones@Example.COM:5070;transport=tcp") == "jones@example.com.py"
    assert name("sips:jones@example.com") == "jones@example.com.py"
    assert name("sip:example.com") is None  # no user: no per-user script
    assert name("sip:..@example.com") is None
    escaped = name("sip:a%2F..%2Fb@example.com")  # an escaped slash stays an escape: no way out of DIR
    assert escaped is not None and "/" not in escaped
    assert name("tel:+15551234") is None


def test_a_handler_waiting_on_a_loop_that_closes_is_freed_with_a_script_error() -> None:
    """A handler thread whose call was scheduled on the loop just before the loop closed must not wait
    for ever: the CI run once hung at exit on such a thread (thread-pool workers are joined at exit)."""
    from sipapi.runtime import LoopController

    loop = asyncio.new_event_loop()
    controller = LoopController(cast(Any, SimpleNamespace(loop=loop)))  # only .loop is used
    outcome: list[BaseException | None] = []
    scheduled = threading.Event()

    def handler_thread() -> None:
        async def answer() -> None:
            return None

        coro = answer()
        scheduled.set()
        try:
            controller._await(coro)
            outcome.append(None)
        except ScriptError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=handler_thread, daemon=True)
    thread.start()
    assert scheduled.wait(5)
    loop.close()  # the loop never ran: whether it closed before or after the call was queued, the same end
    thread.join(timeout=5)
    assert not thread.is_alive(), "the handler thread still waits on a closed loop"
    assert len(outcome) == 1 and isinstance(outcome[0], ScriptError)
