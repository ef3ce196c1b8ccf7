"""Client scenarios, sipp-style: a script describes one call, the runner places many at a rate.

A scenario file is Python. Either it lists *steps*, as a sipp XML scenario does::

    from sipapi.scenario import SDP, expect, pause, send

    steps = [
        send("INVITE", body=SDP),
        expect(100, optional=True),
        expect(180, optional=True),
        expect(200),
        send("ACK"),
        pause(0.1),
        send("BYE"),
        expect(200),
    ]

or it uses the UA API (:class:`~p2psip.useragent.UserAgent`) in one coroutine per call::

    async def call(ua, uri):
        c = await ua.call(uri, timeout=10)
        await c.bye()

(optionally with ``def make_ua(stack, local)`` returning the UserAgent, e.g. with credentials). Then::

    python -m sipapi.scenario scenario.py --rate 50 --calls 1000 --target 127.0.0.1:5070

runs it and prints live statistics every second on standard error (attempted, succeeded, failed, active,
call rate, response-time percentiles) and a final table on standard output (``--json`` for a machine).
The exit status is 0 when every call succeeded, 1 otherwise, 2 for a usage error.

Steps: ``send(method)`` builds the request from the call's state — a new INVITE/OPTIONS/MESSAGE/REGISTER
outside a dialog; ``ACK`` for the last INVITE (a 2xx gets an in-dialog ACK with its own branch; a non-2xx
was ACKed already, hop by hop, as the transaction layer would); ``BYE`` and others inside the dialog
(To tag, remote target, route set); ``CANCEL`` for the pending INVITE. ``expect(status)`` waits for a
response (a status, a list of them, or ``'2xx'``-style classes); ``optional=True`` steps may be skipped
when a later one matches, as in sipp. Unexpected provisional responses are ignored, retransmitted finals
re-ACKed; any other surprise fails the call. ``pause(seconds)`` waits. Both kinds of scenario run on the
one :class:`~p2psip.useragent.UserAgent`: steps send on its client transactions (over UDP retransmitted
from T1 = 0.5 s doubling to T2 = 4 s; 32 s without an answer fails the call), and it answers requests
inside a step call's dialog (a BYE from the callee gets 200).
Header values and bodies may use ``{local_ip}``, ``{local_port}``, ``{target}``, ``{call_number}``,
``{service}`` fields.

The response time of a call is the time from its first request to the first final response to it (call
setup time for an INVITE). Percentiles are nearest-rank.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import math
import runpy
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2psip.address import bracket, parse_hostport, target_from_uri
from p2psip.dialog import Dialog
from p2psip.errors import CallFailed, ConfigError, P2PSIPError, ParseError, TransactionError
from p2psip.message import Request, Response, new_call_id, new_tag
from p2psip.stack import Stack, Target
from p2psip.transaction import make_cancel
from p2psip.uri import Address
from p2psip.useragent import Call, UserAgent

from .errors import ScenarioError, StepFailed

__all__ = [
    "SDP",
    "Expect",
    "Pause",
    "Runner",
    "ScenarioError",
    "Send",
    "Stats",
    "expect",
    "load",
    "main",
    "pause",
    "send",
]

SDP = (
    "v=0\r\n"
    "o=sipapi 1 1 IN IP4 {local_ip}\r\n"
    "s=-\r\n"
    "c=IN IP4 {local_ip}\r\n"
    "t=0 0\r\n"
    "m=audio 6000 RTP/AVP 0\r\n"
    "a=rtpmap:0 PCMU/8000\r\n"
)
"""A minimal audio offer (PCMU), for ``send("INVITE", body=SDP)``."""

GIVE_UP = 32.0


@dataclass(frozen=True)
class Send:
    method: str
    uri: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    body: str | bytes = b""
    content_type: str = "application/sdp"


@dataclass(frozen=True)
class Expect:
    statuses: tuple[int | str, ...]
    optional: bool = False
    timeout: float | None = None

    def matches(self, status: int) -> bool:
        for want in self.statuses:
            if isinstance(want, int) and want == status:
                return True
            if isinstance(want, str) and len(want) == 3 and want.endswith("xx") and want[0] == str(status)[0]:
                return True
        return False


@dataclass(frozen=True)
class Pause:
    seconds: float


def send(
    method: str,
    *,
    uri: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    body: str | bytes = b"",
    content_type: str = "application/sdp",
) -> Send:
    """A step that sends ``method`` (see the module docstring for how each request is built)."""
    return Send(method.upper(), uri, tuple(headers), body, content_type)


def expect(
    status: int | str | Sequence[int | str], *, optional: bool = False, timeout: float | None = None
) -> Expect:
    """A step that waits for a response with ``status`` (e.g. ``200``, ``[180, 183]``, ``'2xx'``)."""
    statuses = (status,) if isinstance(status, int | str) else tuple(status)
    for item in statuses:
        if isinstance(item, str) and not (len(item) == 3 and item[0] in "123456" and item.endswith("xx")):
            raise ScenarioError(f"expect: {item!r} is neither a status nor a class such as '2xx'")
    return Expect(statuses, optional, timeout)


def pause(seconds: float) -> Pause:
    """A step that waits ``seconds``."""
    if seconds < 0:
        raise ScenarioError("pause: seconds must not be negative")
    return Pause(seconds)


Step = Send | Expect | Pause


@dataclass
class Scenario:
    """A loaded scenario: steps, or a ``call(ua, uri[, number])`` coroutine function."""

    path: str
    steps: list[Step] | None = None
    call: Callable[..., Any] | None = None
    make_ua: Callable[..., UserAgent] | None = None


def load(path: str | Path) -> Scenario:
    """Run a scenario file and take its ``steps`` or ``call``. Raises ScenarioError with the reason."""
    try:
        namespace = runpy.run_path(str(path), run_name="sipapi_scenario")
    except FileNotFoundError:
        raise ScenarioError(f"no scenario file {path}") from None
    except SyntaxError as exc:
        raise ScenarioError(f"{path}:{exc.lineno}: syntax error: {exc.msg}") from None
    steps = namespace.get("steps")
    call = namespace.get("call")
    if steps is None and call is None:
        raise ScenarioError(f"{path} defines neither `steps = [...]` nor `async def call(ua, uri)`")
    if steps is not None:
        steps = list(steps)
        for step in steps:
            if not isinstance(step, Send | Expect | Pause):
                raise ScenarioError(f"{path}: {step!r} is not a send/expect/pause step")
        if not steps or not isinstance(steps[0], Send):
            raise ScenarioError(f"{path}: the first step must be a send(...)")
    if call is not None and not inspect.iscoroutinefunction(call):
        raise ScenarioError(f"{path}: call must be an `async def call(ua, uri)`")
    return Scenario(str(path), steps=steps, call=call, make_ua=namespace.get("make_ua"))


# ----------------------------------------------------------------------------------------- statistics


@dataclass
class Stats:
    """Counters and response times of one run (what the live line and the final table show)."""

    calls: int
    started_at: float = field(default_factory=time.monotonic)
    attempted: int = 0
    succeeded: int = 0
    failed: int = 0
    response_ms: list[float] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)

    @property
    def active(self) -> int:
        return self.attempted - self.succeeded - self.failed

    def elapsed(self) -> float:
        return time.monotonic() - self.started_at

    def percentile(self, p: float) -> float:
        """Nearest-rank percentile of the response times (ms); NaN with no samples."""
        if not self.response_ms:
            return math.nan
        ordered = sorted(self.response_ms)
        rank = max(1, min(len(ordered), math.ceil(p / 100 * len(ordered))))
        return ordered[rank - 1]

    def line(self) -> str:
        rate = self.attempted / self.elapsed() if self.elapsed() > 0 else 0.0
        return (
            f"{self.elapsed():6.1f}s attempted {self.attempted:>6} succeeded {self.succeeded:>6} "
            f"failed {self.failed:>5} active {self.active:>4} rate {rate:6.1f}/s "
            f"resp p50 {self.percentile(50):7.1f} p90 {self.percentile(90):7.1f} "
            f"p99 {self.percentile(99):7.1f} ms"
        )

    def as_dict(self) -> dict[str, Any]:
        def num(x: float) -> float | None:
            return None if math.isnan(x) else round(x, 2)

        return {
            "calls": self.calls,
            "attempted": self.attempted,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "elapsed_s": round(self.elapsed(), 3),
            "call_rate": round(self.attempted / self.elapsed(), 2) if self.elapsed() > 0 else 0.0,
            "response_ms": {
                "p50": num(self.percentile(50)),
                "p90": num(self.percentile(90)),
                "p99": num(self.percentile(99)),
                "max": num(max(self.response_ms, default=math.nan)),
            },
            "failures": dict(self.reasons),
        }

    def table(self) -> str:
        d = self.as_dict()
        rows = [
            ("calls attempted", d["attempted"]),
            ("calls succeeded", d["succeeded"]),
            ("calls failed", d["failed"]),
            ("elapsed (s)", d["elapsed_s"]),
            ("call rate (/s)", d["call_rate"]),
            ("response time p50 (ms)", d["response_ms"]["p50"]),
            ("response time p90 (ms)", d["response_ms"]["p90"]),
            ("response time p99 (ms)", d["response_ms"]["p99"]),
        ]
        rows += [(f"failed: {reason}", count) for reason, count in sorted(self.reasons.items())]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


# ------------------------------------------------------------------------------------- the step engine


class _StepCall:
    """One call of a step scenario: a script over the one :class:`~p2psip.useragent.UserAgent`.

    Each step sends or expects one message (sipp's model, so a scenario can test what a UA would never
    do), but nothing of a phone is written again here: requests go out on the UA's client transactions
    (:meth:`~p2psip.useragent.UserAgent.send_request`: retransmission, timers, the ACK of a non-2xx), the
    dialog is :class:`~p2psip.dialog.Dialog` (in-dialog requests, the 2xx ACK) adopted by the UA (which
    answers a BYE from the other end and re-ACKs a late 2xx), the CANCEL is
    :func:`~p2psip.transaction.make_cancel`."""

    def __init__(self, runner: Runner, ua: UserAgent, number: int) -> None:
        self.runner = runner
        self.ua = ua
        self.number = number
        self.call_id = new_call_id(runner.local[0])
        self.from_tag = new_tag()
        self.cseq = 0
        self.dialog: Dialog | None = None  # from the 2xx to our INVITE: in-dialog requests and its ACK
        self.adopted: Call | None = None
        self.invite: Request | None = None
        self.invite_final: Response | None = None
        self.queue: asyncio.Queue[Response | CallFailed] = asyncio.Queue()
        self.first_sent: float | None = None
        self.response_ms: float | None = None
        self.seen_2xx: set[tuple[str, int]] = set()

    # -- building ---------------------------------------------------------------------------------------
    def fields(self) -> dict[str, Any]:
        r = self.runner
        return {
            "local_ip": r.local[0],
            "local_port": r.local[1],
            "target": r.target_text,
            "call_number": self.number,
            "service": r.service,
        }

    def _fmt(self, text: str) -> str:
        try:
            return text.format(**self.fields())
        except (KeyError, IndexError, ValueError):
            return text

    def build(self, step: Send) -> Request | None:
        r = self.runner
        method = step.method
        body = step.body.encode() if isinstance(step.body, str) else step.body
        body = self._fmt(body.decode(errors="replace")).encode() if body else b""
        local_uri = f"sip:sipapi@{r.local_host_text}:{r.local[1]}"
        if method == "ACK":
            invite, final = self.invite, self.invite_final
            if invite is None or final is None:
                raise StepFailed("send ACK: no INVITE was answered")
            if final.status >= 300:
                return None  # ACKed already by the INVITE client transaction
            if self.dialog is None:
                raise StepFailed(f"send ACK: the {final.status} created no dialog (no To tag)")
            return self.dialog.create_ack(final)
        if method == "CANCEL":
            if self.invite is None:
                raise StepFailed("send CANCEL: no INVITE is pending")
            return make_cancel(self.invite)  # §9.1, the INVITE's top Via and branch
        if self.dialog is not None:
            request = self.dialog.create_request(method)
        else:
            self.cseq += 1
            uri = self._fmt(step.uri) if step.uri else r.request_uri
            request = Request.create(
                method,
                uri,
                from_=f"<{local_uri}>;tag={self.from_tag}",
                to=f"<{uri}>",
                call_id=self.call_id,
                cseq=self.cseq,
                contact=f"<{local_uri}>",
                headers=[("User-Agent", "sipapi-scenario")],
            )
        for name, value in step.headers:
            request.add(name, self._fmt(value))
        if body:
            request.set("Content-Type", step.content_type)
            request.body = body
        if method == "INVITE":
            self.invite = request
            self.invite_final = None
        return request

    # -- sending ------------------------------------------------------------------------------------------
    def transmit(self, request: Request) -> None:
        target = self.runner.next_hop(request)
        if self.first_sent is None:
            self.first_sent = time.monotonic()
        if request.method == "ACK":
            self.ua.send_ack(request, target)
            return
        branch = None
        if request.method == "CANCEL":  # on its own transaction, with the INVITE's branch (§9.1)
            via = request.top_via
            branch = via.branch if via is not None else None
            request.remove_first("Via")
        final = self.ua.send_request(request, target, branch=branch, on_response=self.on_response)
        final.add_done_callback(self._on_final)

    def _on_final(self, final: asyncio.Future[Response]) -> None:
        if final.cancelled():
            return
        exc = final.exception()
        if isinstance(exc, CallFailed):
            self.queue.put_nowait(exc)  # no answer (timer B/F) or the transport failed

    # -- receiving ----------------------------------------------------------------------------------------
    def on_response(self, response: Response) -> None:
        try:
            cseq = response.cseq
        except ParseError:
            return
        if cseq.method == "INVITE" and self.invite is not None and 200 <= response.status < 300:
            key = (response.to.tag or "", cseq.number)
            if key in self.seen_2xx:  # a retransmitted 2xx: ACK it again
                ack = self.dialog.last_ack if self.dialog is not None else None
                if ack is not None:
                    self.ua.send_ack(ack, self.runner.next_hop(ack), resend=True)
                return
            self.seen_2xx.add(key)
            try:
                self.dialog = Dialog.uac(self.invite, response)  # §12.1.2: target, route set, tags
            except (TransactionError, ParseError):
                self.dialog = None  # no To tag: send("ACK") / send("BYE") will fail the call
            else:
                self.adopted = self.ua.adopt(self.dialog)
        if cseq.method == "INVITE" and response.status >= 200:
            self.invite_final = response
        if response.status >= 200 and self.response_ms is None and self.first_sent is not None:
            self.response_ms = (time.monotonic() - self.first_sent) * 1000
        self.queue.put_nowait(response)

    # -- running ------------------------------------------------------------------------------------------
    async def run(self, steps: list[Step]) -> None:
        i = 0
        n = len(steps)
        try:
            while i < n:
                step = steps[i]
                if isinstance(step, Send):
                    request = self.build(step)
                    if request is not None:
                        self.transmit(request)
                    i += 1
                elif isinstance(step, Pause):
                    await asyncio.sleep(step.seconds)
                    i += 1
                else:
                    i = await self._expect(steps, i)
        finally:
            if self.adopted is not None:
                self.ua.forget(self.adopted)

    async def _expect(self, steps: list[Step], i: int) -> int:
        window: list[int] = []
        j = i
        while j < len(steps) and isinstance(steps[j], Expect):
            window.append(j)
            if not steps[j].optional:  # type: ignore[union-attr]
                break
            j += 1
        first = steps[i]
        assert isinstance(first, Expect)
        timeout = first.timeout if first.timeout is not None else GIVE_UP
        while True:
            wanted = "/".join(str(s) for k in window for s in steps[k].statuses)  # type: ignore[union-attr]
            try:
                response = await asyncio.wait_for(self.queue.get(), timeout)
            except TimeoutError:
                raise StepFailed(f"timeout waiting for {wanted}") from None
            if isinstance(response, CallFailed):
                raise StepFailed(f"{response.status} {response.reason} waiting for {wanted}")
            for k in window:
                step = steps[k]
                assert isinstance(step, Expect)
                if step.matches(response.status):
                    return k + 1
            if response.status < 200:
                continue  # an unexpected provisional response: harmless
            raise StepFailed(f"unexpected {response.status} (expected {wanted})")


# ------------------------------------------------------------------------------------------- the runner


class Runner:
    """Places ``calls`` calls of a scenario at ``rate`` calls/s against ``target`` (HOST:PORT)."""

    def __init__(
        self,
        scenario: Scenario,
        target: str,
        *,
        rate: float = 10.0,
        calls: int = 1,
        local: str = "127.0.0.1:0",
        transport: str = "udp",
        service: str = "service",
        limit: int | None = None,
        call_timeout: float = 60.0,
        proxy: str | None = None,
    ) -> None:
        if rate <= 0:
            raise ScenarioError("--rate must be above 0")
        if calls < 1:
            raise ScenarioError("--calls must be at least 1")
        if transport not in ("udp", "tcp"):
            raise ScenarioError(f"--transport {transport!r}: udp or tcp")
        self.scenario = scenario
        self.target_text = target
        self.target = _hostport(target, "--target")
        self.proxy = _hostport(proxy, "--proxy") if proxy else None
        self.rate = rate
        self.calls_total = calls
        self.local_spec = local
        self.transport = transport
        self.service = service
        self.limit = limit or max(100, int(rate * 10))
        self.call_timeout = call_timeout
        self.stats = Stats(calls)
        self.local: tuple[str, int] = ("127.0.0.1", 0)
        self.request_uri = f"sip:{service}@{bracket(self.target[0])}:{self.target[1]}"
        if transport == "tcp":
            self.request_uri += ";transport=tcp"

    @property
    def local_host_text(self) -> str:
        return bracket(self.local[0])

    def next_hop(self, request: Request) -> Target:
        if self.proxy is not None:
            return Target(self.transport, *self.proxy)
        route = request.get("Route")
        uri = Address(route).uri if route is not None else request.uri
        return target_from_uri(uri, default_transport=self.transport)  # RFC 3263 without DNS

    async def run(self, *, live: Callable[[str], None] | None = None, interval: float = 1.0) -> Stats:
        self.loop = asyncio.get_running_loop()
        host, _, port = self.local_spec.rpartition(":")
        spec = f"{self.transport}:{host}:{port}"
        self.stack = await Stack.start([spec])
        self.local = self.stack.local_address(self.transport)
        make = self.scenario.make_ua
        if make is not None:
            ua = make(self.stack, self.local)
        else:
            # --proxy (sipp -rsa) is the UA's outbound proxy: API-style calls go through it as steps do
            outbound = Target(self.transport, *self.proxy) if self.proxy is not None else None
            aor = f"sip:sipapi@{self.local_host_text}"
            # with an RFC 5626 instance: its calls with audio do ICE by default when the proxy answers
            # STUN (a p2psip peer), asked once per run (UserAgent._probe_outbound: a proxy without STUN
            # costs the first call with audio 0.5 s, no call waits for ICE's STUN timeout)
            instance = f"<urn:uuid:{uuid.uuid4()}>"
            ua = UserAgent(
                self.stack, aor, user_agent="sipapi-scenario", outbound=outbound, instance=instance
            )
        reporter = asyncio.ensure_future(self._report(live, interval)) if live else None
        semaphore = asyncio.Semaphore(self.limit)
        tasks: set[asyncio.Task[None]] = set()
        self.stats = Stats(self.calls_total)
        start = self.loop.time()
        try:
            for number in range(1, self.calls_total + 1):
                due = start + (number - 1) / self.rate
                delay = due - self.loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await semaphore.acquire()
                task = asyncio.ensure_future(self._one(number, ua, semaphore))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(set(tasks))
        finally:
            if reporter is not None:
                reporter.cancel()
            for task in tasks:
                task.cancel()
            await ua.close()
            await self.stack.close()
        if live:
            live(self.stats.line())
        return self.stats

    async def _one(self, number: int, ua: UserAgent, semaphore: asyncio.Semaphore) -> None:
        stats = self.stats
        stats.attempted += 1
        began = time.monotonic()
        try:
            if self.scenario.steps is not None:
                call = _StepCall(self, ua, number)
                await asyncio.wait_for(call.run(self.scenario.steps), self.call_timeout)
                if call.response_ms is not None:
                    stats.response_ms.append(call.response_ms)
            else:
                assert self.scenario.call is not None
                fn = self.scenario.call
                args: list[Any] = [ua, self.request_uri]
                if len(inspect.signature(fn).parameters) >= 3:
                    args.append(number)
                await asyncio.wait_for(fn(*args), self.call_timeout)
                stats.response_ms.append((time.monotonic() - began) * 1000)
        except StepFailed as exc:
            stats.failed += 1
            stats.reasons[str(exc)] += 1
        except TimeoutError:
            stats.failed += 1
            stats.reasons[f"call longer than {self.call_timeout:g} s"] += 1
        except Exception as exc:
            stats.failed += 1
            status = getattr(exc, "status", None)
            stats.reasons[f"{status}" if status is not None else f"{type(exc).__name__}: {exc}"[:80]] += 1
        else:
            stats.succeeded += 1
        finally:
            semaphore.release()

    async def _report(self, live: Callable[[str], None] | None, interval: float) -> None:
        assert live is not None
        while True:
            await asyncio.sleep(interval)
            live(self.stats.line())


def _hostport(text: str, what: str) -> tuple[str, int]:
    try:
        return parse_hostport(text, what).as_tuple()
    except ConfigError as exc:
        raise ScenarioError(str(exc)) from None


# --------------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sipapi.scenario",
        description="Run a sipapi client scenario at a call rate, like sipp.",
    )
    p.add_argument("scenario", help="the scenario file (steps = [...] or async def call(ua, uri))")
    p.add_argument("--target", required=True, help="HOST:PORT of the system under test")
    p.add_argument("--rate", type=float, default=10.0, help="calls per second (default 10)")
    p.add_argument("--calls", type=int, default=1, help="number of calls (default 1)")
    p.add_argument("--local", default="127.0.0.1:0", help="our HOST:PORT (default 127.0.0.1:0)")
    p.add_argument("--transport", default="udp", choices=["udp", "tcp"])
    p.add_argument("--proxy", help="send every request to this HOST:PORT (like sipp -rsa)")
    p.add_argument("--service", default="service", help="user part of the Request-URI (default service)")
    p.add_argument("--limit", type=int, help="most calls at once (default 10 x rate, at least 100)")
    p.add_argument("--call-timeout", type=float, default=60.0, help="seconds a call may take (default 60)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between live statistics lines")
    p.add_argument("--json", action="store_true", help="print the final statistics as JSON")
    p.add_argument("--quiet", action="store_true", help="no live statistics")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        scenario = load(args.scenario)
        runner = Runner(
            scenario,
            args.target,
            rate=args.rate,
            calls=args.calls,
            local=args.local,
            transport=args.transport,
            service=args.service,
            limit=args.limit,
            call_timeout=args.call_timeout,
            proxy=args.proxy,
        )
    except ScenarioError as exc:
        print(f"sipapi.scenario: error: {exc}", file=sys.stderr)
        return 2

    def live(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        stats = asyncio.run(runner.run(live=None if args.quiet else live, interval=args.interval))
    except (P2PSIPError, OSError) as exc:
        print(f"sipapi.scenario: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1
    if args.json:
        print(json.dumps(stats.as_dict()))
    else:
        print(stats.table())
    return 0 if stats.failed == 0 and stats.succeeded == stats.calls else 1


if __name__ == "__main__":
    # Run the importable module's main, so that scenario files (which import sipapi.scenario) and the
    # runner share one set of step classes rather than this __main__ copy's.
    from sipapi.scenario import main as _main

    sys.exit(_main())
