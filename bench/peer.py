"""Peer node benchmark: REGISTER→200 and INVITE→180 latency through the overlay vs a single Kamailio.

    python3 bench/peer.py [--sizes 5,20,50] [--users 200] [--rate 20] [--markdown] [--compiled]
                          [--processes N] [--warm-only]

For overlays of 5, 20 and 50 peers on loopback (by default all peers in this one Python process, one event
loop: a single-core deployment of many peers; ``--processes N`` spreads them over N worker processes, peer i
in process i mod N, so the entry and the home peer of a call run in processes of their own, as on machines
of their own, while Kamailio runs its two worker children), a timing client in a separate process (the tests' independent
phone, timestamps from its event loop) registers ``--users`` AORs at one peer (REGISTER→200: a signed
write per contact, stored on 3 replicas; no DHT read before it, as the registering peer holds each new
AOR's only user key) and then calls every AOR through another peer, timing
INVITE→180 (a DHT lookup of the callee, then the proxied INVITE answered by a sipp UAS; each call is then
completed with 200, ACK, BYE). The location cache is off, so every call really looks its callee up. The
calls go through the callee's home peer (the registering peer, docs/nat.md); the same calls are then made
again with home routing off (straight from the entry peer to the contact), same peers, same bindings; then
twice each, alternating, with the callee read from the responsible node alone and from its replica set
(issue 15's reads: the rows compare what the quorum read costs a call); then, warm, with the entry peer's
location cache on (``WARM_CACHE_TTL``, never beyond a binding's expiry), filled by one unmeasured pass. The same client then runs against one Kamailio 5.6 registrar + stateful proxy (usrloc in memory, ``tm``)
started in the same run, and the table gives p50/p99 and our ratio to Kamailio's p99. Operations are
sequential, paced at ``--rate`` per second. Target: p99 call setup through the 50-peer overlay < 50 ms.

Fair both ways (issue 19's rules): every system gets the same unmeasured warm-up (``WARMUP`` REGISTER+call
pairs on their own AORs) once it is up (our ring consistent, Kamailio listening); each cell is repeated
``--repeat`` times with fresh peers, the repeats interleaved across systems, samples pooled and the
per-repeat p99s shown as a spread; the overlay's maintenance runs as ``p2psip start`` runs it (``--maintenance``
sets one period for stabilize/fix-fingers, repair every 10 periods); the
work directory is removed at the end (``--keep`` keeps it); the footer gives the date, load average, CPU
model and steal time over the run.
(sipp's own response-time trace is too coarse here — a few ms granularity — hence the Python client.)

Where a warm call's time goes (issue 19, target 1), printed under the table per overlay size: the peers' CPU
per call with the maintenance of an idle interval as long subtracted, and that maintenance's share of a
core; CPU by stage from cProfile of a second warm pass (idle subtracted; ``--top N`` lists functions); the
SIP messages in and out per call; and the latency by stage from a third pass, with timestamps where the
INVITE and its 180 enter and leave the entry and the home peer (transport observers), with the slowest 2 %
of that pass's calls named: largest stage, time the peer processes did not run, and the collector passes
and long loop callbacks around each (:class:`Stalls`). The same for a
REGISTER: the peers' CPU per measured REGISTER (maintenance subtracted), CPU by stage from a profiled pass
of as many new AORs, and the latency by stage at the registrar peer from another (REGISTER in; the AOR's
current bindings, a DHT lookup and read or the peer's own record; the plan, signature and write to the replicas; the claim's
commit; 200 out). In the worker layout each process profiles and times its own peers (``perf_counter`` is
one clock for all processes) and the bench merges them. ``--warm-only`` keeps target 1's rows (REGISTER,
cold and warm calls, the breakdowns) and skips the home-routing-off and read rows, for shorter runs.

``--compiled``: the peers run the mypyc build of tools/build_compiled.py (built first if needed; bench/harness.py
stops the run if a module of the build would come from its .py); the timing client stays pure Python, so
both builds are timed by the same phone. cProfile does not see inside compiled modules: in that build the
stage breakdown charges their time to their Python callers; the CPU per call (no profiler) is exact.
"""

from __future__ import annotations

import argparse
import asyncio
import asyncio.events
import cProfile
import gc
import json
import os
import pstats
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from harness import COMPILED, ROOT, missing_tool  # first: it puts this checkout on sys.path

# isort: split
from conditions import Conditions
from conftest import free_port
from interop.kamailio import Kamailio, usrloc_header
from interop.sipp import uas

from overlay.localring import quick_node_config, ring_is_consistent
from overlay.node import Node, NodeConfig
from p2psip.config import HostPort, ListenSpec, PeerConfig
from p2psip.peer import Peer
from p2psip.ratelimit import UNLIMITED
from p2psip.run import busy_proxy_gc

DOMAIN = "p2p.example"
#: unmeasured REGISTER+call pairs every system gets once it is up (on AORs of their own)
WARMUP = 10
WARM_USERS = [f"warm{i:02d}" for i in range(WARMUP)]
#: the warm row's location cache lifetime (s): longer than one pass over the AORs; bindings live 600 s
WARM_CACHE_TTL = 300.0
#: rows per overlay size: through the home peer, direct, single-node reads, replica-set reads, warm cache
ROWS = 5


def kamailio_registrar(host: str, port: int) -> str:
    """Kamailio as the centralised equivalent of the overlay: registrar (no auth) + stateful proxy."""
    return (
        usrloc_header(host, port, domain=DOMAIN, modules=("rr",))
        + """modparam("rr", "enable_full_lr", 1)

request_route {
    if (!mf_process_maxfwd_header("10")) { sl_send_reply("483", "Too Many Hops"); exit; }
    if (is_method("CANCEL")) { if (t_check_trans()) { t_relay(); } exit; }
    if (has_totag()) {
        loose_route();
        if (is_method("ACK") && !t_check_trans()) { forward(); exit; }
        t_relay();
        exit;
    }
    if (is_method("REGISTER")) { if (!save("location")) { sl_reply_error(); } exit; }
    if (!lookup("location")) { sl_send_reply("404", "Not Found"); exit; }
    if (is_method("INVITE")) { record_route(); }
    if (!t_relay()) { sl_reply_error(); }
}
"""
    )


CLIENT = """
import asyncio, json, sys
sys.path.insert(0, sys.argv[1])
from peer_phone import Phone

async def main(via_text, uas, users, rate, what):
    host, port = via_text.rsplit(":", 1)
    via = (host, int(port))
    loop = asyncio.get_running_loop()
    reg, inv, failures = [], [], 0
    phone = await Phone.open("bench")
    for user in users if "r" in what else []:  # REGISTER -> 200, paced at `rate`
        started = loop.time()
        response = await phone.register(via, aor=f"sip:{user}@p2p.example", contact=f"<sip:{user}@{uas}>",
                                        expires=600)
        if response.status == 200:
            reg.append((loop.time() - started) * 1000)
        else:
            failures += 1
        await asyncio.sleep(max(0.0, 1 / rate - (loop.time() - started)))
    for user in users if "c" in what else []:  # INVITE -> 180 (then completed: 200, ACK, BYE)
        started = loop.time()
        try:  # the phone sends once (no UDP retransmission): a lost request or answer is a failed call
            result = await phone.call(f"sip:{user}@p2p.example", via, timeout=10)
        except TimeoutError:
            failures += 1
            print(f"call to {user}: no answer within 10 s", file=sys.stderr)
            continue
        ringing = result.latency(180)
        if result.answered and result.bye_status == 200 and ringing is not None:
            inv.append(ringing * 1000)
        else:
            failures += 1
            print(f"call to {user}: {result.statuses}, BYE {result.bye_status}", file=sys.stderr)
        await asyncio.sleep(max(0.0, 1 / rate - (loop.time() - started)))
    print(json.dumps({"register_ms": reg, "invite_180_ms": inv, "failures": failures}))

asyncio.run(main(sys.argv[2], sys.argv[3], sys.argv[6:], float(sys.argv[4]), sys.argv[5]))
"""


#: where a function's own CPU time goes in the stage breakdown: (path fragment, stage), first match wins
STAGE_OF_FILE = [
    ("p2psip/message/", "parse/serialise"),
    ("p2psip/uri.py", "parse/serialise"),
    ("p2psip/address.py", "parse/serialise"),
    ("p2psip/proxy.py", "forwarding (proxy core)"),
    ("p2psip/transaction.py", "transactions+timers"),
    ("p2psip/timers.py", "transactions+timers"),
    ("p2psip/transport.py", "transport"),
    ("p2psip/stack.py", "transport"),
    ("p2psip/flows.py", "transport"),
    ("p2psip/location.py", "lookup+cache"),
    ("p2psip/registrar.py", "registrar (plan, claims, key)"),
    ("p2psip/ownership.py", "registrar (plan, claims, key)"),
    ("overlay/identity.py", "signing/verifying"),
    ("cryptography", "signing/verifying"),
    ("overlay/", "overlay (DHT lookups, maintenance)"),
    ("msgpack", "overlay (DHT lookups, maintenance)"),
    ("asyncio/", "event loop+sockets"),
    ("selectors.py", "event loop+sockets"),
]
#: functions of p2psip/peer.py by stage (the rest of peer.py: "peer (other)")
STAGE_OF_PEER_FUNCTION = {
    "locate": "lookup+cache", "lookup_bindings": "lookup+cache", "_locate_in_overlay": "lookup+cache",
    "fetch_bindings": "lookup+cache", "_targets": "lookup+cache", "_routes": "lookup+cache",
    "homed_bindings": "home peer", "mark_sole_home": "home peer", "is_sole_home": "home peer",
    "_primary_home": "home peer", "preprocess_routes": "home peer", "_pass_own_flow_routes": "home peer",
    "_next_hop": "home peer", "is_home_of": "home peer", "_request_key": "home peer",
    # the REGISTER path: the registrar's own steps (claims of the AOR, its user key, the plan, Path)
    "_register": "registrar (plan, claims, key)", "handle_register": "registrar (plan, claims, key)",
    "_save_claim": "registrar (plan, claims, key)", "_record_claim": "registrar (plan, claims, key)",
    "claim": "registrar (plan, claims, key)", "save_claim": "registrar (plan, claims, key)",
    "commit_claim": "registrar (plan, claims, key)", "_commit_queued": "registrar (plan, claims, key)",
    "holds": "registrar (plan, claims, key)", "_derived": "registrar (plan, claims, key)",
    "get": "registrar (plan, claims, key)", "_account": "registrar (plan, claims, key)",
    "_current_bindings": "registrar (plan, claims, key)", "_own_record": "registrar (plan, claims, key)",
    "_remember": "registrar (plan, claims, key)",
    "path_entry": "home peer", "_lock": "registrar (plan, claims, key)",
}  # fmt: skip


def _stage(func: tuple[str, int, str]) -> str | None:
    path, _line, name = func
    if path == "~" or path.startswith("<"):
        return None  # a C function or generated code: its time goes to its callers' stages
    if path.endswith("p2psip/peer.py"):
        return STAGE_OF_PEER_FUNCTION.get(name, "peer (other)")
    return next((stage for part, stage in STAGE_OF_FILE if part in path), "other")


def stage_seconds(stats: dict[Any, Any]) -> dict[str, float]:
    """CPU seconds by stage (own time of each function; a C function's time split among its callers), from
    ``pstats.Stats(...).stats`` (one process's profile or several processes' merged)."""
    out: dict[str, float] = {}
    for func, (_cc, _nc, own, _cum, callers) in stats.items():
        stage = _stage(func)
        if stage is not None:
            out[stage] = out.get(stage, 0.0) + own
            continue
        if "sendto" in func[2] or "recvfrom" in func[2] or "select" in func[2] or "epoll" in func[2]:
            out["event loop+sockets"] = out.get("event loop+sockets", 0.0) + own
            continue
        total = sum(c[2] for c in callers.values()) or 1.0
        for caller, c in callers.items():
            where = _stage(caller) or "other"
            out[where] = out.get(where, 0.0) + own * c[2] / total
    return out


#: ``--top``: print this many functions with the most own CPU per warm call (0: none)
TOP = 0


def _print_top(busy: dict[Any, Any], idle: dict[Any, Any], calls: int, what: str, idle_scale: float) -> None:
    own = {f: v[2] - idle_scale * idle.get(f, (0, 0, 0.0))[2] for f, v in busy.items()}
    cum = {f: v[3] - idle_scale * idle.get(f, (0, 0, 0.0, 0.0))[3] for f, v in busy.items()}
    print(f"functions with the most own CPU per {what} (cProfile, idle subtracted, {calls} of them; "
          "own us, calls, cumulative us):")  # fmt: skip
    for func, seconds in sorted(own.items(), key=lambda kv: -kv[1])[:TOP]:
        path, line, name = func
        where = "/".join(path.split("/")[-2:]) + f" {cum[func] * 1e6 / max(calls, 1):8.1f} us"
        print(
            f"  {seconds * 1e6 / max(calls, 1):8.1f} us  {busy[func][1] / max(calls, 1):6.1f} x  {where}:{line} {name}"
        )


class Recorder:
    """Timestamps where a call and a REGISTER pass the peers, taken in the process that runs those peers.

    ``time.perf_counter`` is CLOCK_MONOTONIC, one clock for every process of the machine, so the stamps of
    an entry and a home peer in two worker processes subtract like those of one process. Calls: where the
    INVITE and its 180 enter and leave the entry and the home peer (transport observers, so parse to
    serialise is inside a peer's stage), by Call-ID. REGISTERs (``registers``): where each enters the
    registrar peer (the "home" one), where the AOR's current bindings are taken (``_current_bindings``: the
    DHT lookup and read, or the peer's own record of an AOR only it can have written) and the claim's commit (``_save_claim``, after the signed write to the replicas) start
    and end, and where its 200 leaves; one record per REGISTER, as the client sends one at a time."""

    def __init__(self, roles: dict[str, Peer], *, registers: bool) -> None:
        self.calls: dict[str, dict[str, float]] = {}
        self.registers: list[dict[str, float]] = []
        self._undo: list[Any] = []
        for role, peer in roles.items():
            observer = self._observer(role, registers and role == "home")
            peer.stack.transport.add_observer(observer)
            self._undo.append(lambda p=peer, o=observer: p.stack.transport.remove_observer(o))
            if registers and role == "home":
                self._wrap(peer, "_current_bindings", "read")
                self._wrap(peer, "_save_claim", "claim")
        #: CPU time of this process's thread at each stamp of a call (``thread_time``), by Call-ID
        self.cpu: dict[str, dict[str, float]] = {}
        self.stalls = Stalls(sorted(roles))
        self._undo.append(self.stalls.close)

    def _wrap(self, peer: Peer, name: str, mark: str) -> None:
        inner = getattr(peer, name)
        clock, records = time.perf_counter, self.registers

        async def timed(*args: Any, **kwargs: Any) -> Any:
            if records:
                records[-1].setdefault(mark, clock())
            try:
                return await inner(*args, **kwargs)
            finally:
                if records:
                    records[-1].setdefault(mark + " done", clock())

        setattr(peer, name, timed)
        self._undo.append(lambda: delattr(peer, name))

    def _observer(self, role: str, registers: bool) -> Any:
        clock, calls, records, cpu_clock = time.perf_counter, self.calls, self.registers, time.thread_time

        def observe(direction: str, data: bytes, _remote: Any) -> None:
            at = clock()
            first = data[: data.find(b" ", 8)]
            if registers and first.startswith(b"REGISTER") and direction == "in":
                records.append({"in": at})
                return
            if registers and records and first.endswith(b" 200") and b" REGISTER\r\n" in data:
                records[-1].setdefault("out", at)
                return
            kind = "INVITE" if first.startswith(b"INVITE") else "180" if first.endswith(b" 180") else None
            if kind is None:
                return
            start = data.find(b"\r\nCall-ID: ")
            if start < 0:
                return
            call_id = data[start + 11 : data.find(b"\r\n", start + 11)].decode("latin-1")
            mark = f"{role} {direction} {kind}"
            if mark not in calls.setdefault(call_id, {}):
                calls[call_id][mark] = at
                self.cpu.setdefault(call_id, {})[mark] = cpu_clock()

        return observe

    def close(self) -> dict[str, Any]:
        for undo in self._undo:
            undo()
        return {"calls": self.calls, "registers": self.registers, "cpu": self.cpu,
                "stalls": self.stalls.events, "roles": self.stalls.roles}  # fmt: skip


#: a callback of a peer process's event loop that ran this long (s) or longer is a stall (:class:`Stalls`)
STALL_S = 0.0005


def _callback_name(handle: asyncio.Handle) -> str:
    """What a loop callback runs: a function's qualified name, or the coroutine a task steps."""
    callback = getattr(handle, "_callback", None)
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        return f"task {getattr(coro, '__qualname__', type(coro).__name__)}"
    return str(getattr(callback, "__qualname__", None) or type(callback).__name__)


class Stalls:
    """What held a peer process's event loop during the timeline pass, so the slowest calls can be matched
    with it (issue 19, target 1's tail): every pass of the cyclic collector (``gc.callbacks``) and every
    loop callback that ran :data:`STALL_S` or longer (``asyncio.Handle._run`` timed), each as (start, end,
    what) on ``perf_counter``, the clock of the call stamps. Two clock reads per callback while it runs."""

    def __init__(self, roles: list[str]) -> None:
        self.roles = roles
        self.events: list[tuple[float, float, str]] = []
        self._gc_started = 0.0
        gc.callbacks.append(self._gc)
        self._run = run = asyncio.events.Handle._run
        clock, events = time.perf_counter, self.events

        def timed_run(handle: asyncio.Handle) -> None:
            started = clock()
            run(handle)
            ended = clock()
            if ended - started >= STALL_S:
                events.append((started, ended, _callback_name(handle)))

        asyncio.events.Handle._run = timed_run  # type: ignore[method-assign,assignment]

    def _gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.events.append((self._gc_started, time.perf_counter(), f"gc gen{info['generation']}"))

    def close(self) -> None:
        gc.callbacks.remove(self._gc)
        asyncio.events.Handle._run = self._run  # type: ignore[method-assign]


CALL_STAGES = (
    ("entry peer: INVITE in -> out", "entry in INVITE", "entry out INVITE"),
    ("entry -> home peer (loop, kernel)", "entry out INVITE", "home in INVITE"),
    ("home peer: INVITE in -> out", "home in INVITE", "home out INVITE"),
    ("callee: INVITE out -> 180 in (sipp)", "home out INVITE", "home in 180"),
    ("home peer: 180 in -> out", "home in 180", "home out 180"),
    ("home -> entry peer (loop, kernel)", "home out 180", "entry in 180"),
    ("entry peer: 180 in -> out", "entry in 180", "entry out 180"),
)
REGISTER_STAGES = (
    ("registrar peer: REGISTER in -> read (parse, checks)", "in", "read"),
    ("current bindings (DHT read, or the own record)", "read", "read done"),
    ("plan, sign, write to the replicas (DHT)", "read done", "claim"),
    ("claim commit (sqlite)", "claim", "claim done"),
    ("registrar peer: claim -> 200 out", "claim done", "out"),
)


def call_stages(calls: dict[str, dict[str, float]], client_ms: list[float]) -> dict[str, list[float]]:
    """ms per stage and call; "client, loopback" is what the client measured minus the peers' span. The
    calls in the order they entered the entry peer (the client's order)."""
    out: dict[str, list[float]] = {name: [] for name, _a, _b in CALL_STAGES}
    out["client + loopback to/from the entry peer"] = []
    ordered = sorted(calls.values(), key=lambda seen: min(seen.values()))
    for seen, total in zip(ordered, client_ms, strict=False):
        if not all(a in seen and b in seen for _n, a, b in CALL_STAGES):
            continue
        for name, a, b in CALL_STAGES:
            out[name].append((seen[b] - seen[a]) * 1000)
        span = seen["entry out 180"] - seen["entry in INVITE"]
        out["client + loopback to/from the entry peer"].append(total - span * 1000)
    return out


#: the in-peer stages of a call, whose wall time minus the process's CPU time is time it did not run
IN_PEER = (("entry", "INVITE"), ("home", "INVITE"), ("home", "180"), ("entry", "180"))


def tail_lines(
    calls: dict[str, dict[str, float]], cpu: dict[str, dict[str, float]], parts: list[dict[str, Any]],
    client_ms: list[float], share: float = 0.02,
) -> list[str]:  # fmt: skip
    """The slowest ``share`` of the timeline pass's calls, each with its largest stage, the time its peers'
    processes were not running inside their own stages (wall minus thread CPU: descheduled), and what their
    loops were busy with meanwhile (:class:`Stalls`; within the call's time at the client, which starts
    before the entry peer sees the INVITE and ends after its 180 leaves); then the stalls by kind."""
    stalls = [(start, end, f"{'+'.join(part['roles']) or '-'}: {what}") for part in parts
              for start, end, what in part["stalls"]]  # fmt: skip
    ordered = sorted(calls.items(), key=lambda kv: min(kv[1].values()))
    rows = []
    for (call_id, seen), total in zip(ordered, client_ms, strict=False):
        if not all(a in seen and b in seen for _n, a, b in CALL_STAGES):
            continue
        stages = {name: (seen[b] - seen[a]) * 1000 for name, a, b in CALL_STAGES}
        stamps = cpu.get(call_id, {})
        off = 0.0
        for role, kind in IN_PEER:
            a, b = f"{role} in {kind}", f"{role} out {kind}"
            if a in stamps and b in stamps:
                off += max(0.0, (seen[b] - seen[a]) - (stamps[b] - stamps[a])) * 1000
        # the client's time outside the entry peer (sending, the entry's wake-up, the 180 back) lies before
        # or after its span: the window reaches that far either way
        outside = max(0.0, total / 1000 - (seen["entry out 180"] - seen["entry in INVITE"]))
        span = seen["entry in INVITE"] - outside, seen["entry out 180"] + outside
        rows.append((total, stages, off, [s for s in stalls if s[1] > span[0] and s[0] < span[1]]))
    if not rows:
        return []
    rows.sort(key=lambda r: -r[0])
    slow = rows[: max(1, round(len(rows) * share))]
    out = [f"the slowest {len(slow)} of {len(rows)} calls of the timeline pass (client ms; largest stage; "
           "time the peers' processes did not run inside their stages; their loops' stalls >= "
           f"{STALL_S * 1000:g} ms and collector passes meanwhile):"]  # fmt: skip
    for total, stages, off, during in slow:
        name, ms = max(stages.items(), key=lambda kv: kv[1])
        what = ", ".join(f"{w} {(e - b) * 1000:.2f}" for b, e, w in during) or "none"
        out.append(f"  {total:6.2f} ms: {name} {ms:.2f}; not running {off:.2f}; {what}")
    late = sum(1 for _t, _s, _o, during in slow if any(e - b >= 0.001 for b, e, _w in during))
    out.append(f"  {late} of the {len(slow)} overlapped a stall or collector pass of 1 ms or more")
    kinds: dict[str, list[float]] = {}
    for start, end, what in stalls:
        kinds.setdefault(what, []).append((end - start) * 1000)
    out.append("stalls during the pass by kind (count, p50 / max ms, total ms):")
    for what, values in sorted(kinds.items(), key=lambda kv: -sum(kv[1]))[:10]:
        out.append(f"  {what:<60} {len(values):5d}  {Timings.pct(values, 50):6.3f} / {max(values):6.3f}"
                   f"  {sum(values):8.1f}")  # fmt: skip
    return out


#: the tail lines of each cell's timeline pass, in the order the cells ran
TAILS: list[list[str]] = []


def register_stages(records: list[dict[str, float]], client_ms: list[float]) -> dict[str, list[float]]:
    """ms per stage and REGISTER at the registrar peer, and the client's figure minus the peer's span."""
    out: dict[str, list[float]] = {name: [] for name, _a, _b in REGISTER_STAGES}
    out["client + loopback to/from the registrar peer"] = []
    for seen, total in zip(records, client_ms, strict=False):
        if not all(a in seen and b in seen for _n, a, b in REGISTER_STAGES):
            continue
        for name, a, b in REGISTER_STAGES:
            out[name].append((seen[b] - seen[a]) * 1000)
        out["client + loopback to/from the registrar peer"].append(total - (seen["out"] - seen["in"]) * 1000)
    return out


#: the latency stages of each cell, in the order the cells ran: (warm calls, REGISTERs)
TIMELINES: list[tuple[dict[str, list[float]], dict[str, list[float]]]] = []


def timeline_lines(parts: list[dict[str, list[float]]], what: str) -> list[str]:
    """The latency stages pooled over the repeats: p50 and p99 per stage."""
    pooled: dict[str, list[float]] = {}
    for part in parts:
        for name, values in part.items():
            pooled.setdefault(name, []).extend(values)
    count = max((len(v) for v in pooled.values()), default=0)
    out = [f"latency by stage of the {what} ({count} of them, timestamps at the peers):"]
    for name, values in pooled.items():
        if values:
            out.append(
                f"  {name:<52} p50 {Timings.pct(values, 50):6.3f} ms  p99 {Timings.pct(values, 99):6.3f} ms"
            )
    return out


@dataclass
class Breakdown:
    """Where the peers' CPU goes during the warm calls (or the REGISTERs): each stage's CPU per operation,
    the same interval's idle CPU (overlay maintenance with no calls) subtracted. Measured with cProfile
    (which inflates every figure alike; read the shares), and the total without the profiler
    (``cpu_ms_per_call``)."""

    what: str = "warm call"
    calls: int = 0
    cpu_ms_per_call: list[float] = field(default_factory=list)
    stages_ms: dict[str, list[float]] = field(default_factory=dict)
    counters: dict[str, list[float]] = field(default_factory=dict)
    #: share of a core the peers' overlay maintenance took without calls, per run
    maintenance: list[float] = field(default_factory=list)
    #: the layout the peers ran in (one process, or worker processes)
    layout: str = "every peer in this one process and event loop"

    def add(
        self, calls: int, cpu_s: float, stages: dict[str, float], counters: dict[str, float], idle: float
    ) -> None:
        self.calls += calls
        self.maintenance.append(idle)
        self.cpu_ms_per_call.append(cpu_s * 1000 / max(calls, 1))
        for stage, seconds in stages.items():
            self.stages_ms.setdefault(stage, []).append(seconds * 1000 / max(calls, 1))
        for name, value in counters.items():
            self.counters.setdefault(name, []).append(value / max(calls, 1))

    def lines(self) -> list[str]:
        def span(values: list[float], digits: int = 3) -> str:
            lo, hi = min(values), max(values)
            return f"{lo:.{digits}f}" if lo == hi else f"{lo:.{digits}f}-{hi:.{digits}f}"

        if not self.cpu_ms_per_call:
            return []
        total = sum(max(v) for v in self.stages_ms.values()) or 1.0
        out = [f"peers' CPU per {self.what}, overlay maintenance subtracted: {span(self.cpu_ms_per_call)} ms "
               f"(no profiler; {len(self.cpu_ms_per_call)} runs)",
               f"the peers' overlay maintenance alone, no calls: {span([100 * m for m in self.maintenance], 1)} % "
               f"of a core ({self.layout})",
               "by stage (cProfile, ms per operation; shares of the profiled total):"]  # fmt: skip
        for stage, values in sorted(self.stages_ms.items(), key=lambda kv: -max(kv[1])):
            if max(values) >= 0.001:
                out.append(f"  {stage:<36} {span(values):>13} ms  {100 * max(values) / total:5.1f} %")
        per_call = ", ".join(f"{name} {span(v, 2)}" for name, v in sorted(self.counters.items()) if max(v))
        if per_call:
            out.append(f"per {self.what} at the peers: {per_call}")
        return out


@dataclass
class Timings:
    system: str
    register_ms: list[float]
    invite_ms: list[float]
    failures: int
    #: (REGISTER p99, INVITE→180 p99) of each repeat, for the spread
    repeats: list[tuple[float, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.repeats:
            self.repeats = [(Timings.pct(self.register_ms, 99), Timings.pct(self.invite_ms, 99))]

    @staticmethod
    def pool(parts: list[Timings]) -> Timings:
        """The repeats of one cell: samples pooled, each repeat's p99s kept for the spread."""
        return Timings(
            parts[0].system,
            [ms for t in parts for ms in t.register_ms],
            [ms for t in parts for ms in t.invite_ms],
            sum(t.failures for t in parts),
            [r for t in parts for r in t.repeats],
        )

    def spread(self, which: int) -> str:
        """min-max of the repeats' p99 (``which`` 0: REGISTER, 1: INVITE→180)."""
        values = [r[which] for r in self.repeats if r[which] == r[which]]
        return f"{min(values):.2f}-{max(values):.2f}" if values else "n/a"

    @staticmethod
    def pct(values: list[float], p: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))]


#: the timing client runs pure Python from this checkout in both builds: the same phone times every row
CLIENT_ENV = {
    k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH", "P2PSIP_COMPILED")
}


async def timed_client(
    system: str,
    via: str,
    uas_hostport: str,
    users: list[str],
    rate: float,
    *,
    registers: bool = True,
    calls: bool = True,
) -> Timings:
    """Run the timing client (a separate Python process with the tests' phone) against ``via``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, str(ROOT / "tests"), via, uas_hostport, str(rate),
        ("r" if registers else "") + ("c" if calls else "") or "-", *users,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT, env=CLIENT_ENV,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), len(users) * 2 / rate + 120)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"the timing client against {system} did not finish") from None
    if proc.returncode != 0:
        raise RuntimeError(f"the timing client against {system} failed: {err.decode()[-2000:]}")
    data = json.loads(out)
    if data["failures"]:
        print(f"  {system}: {data['failures']} failed: {err.decode(errors='replace')[-600:]}", flush=True)
    return Timings(system, data["register_ms"], data["invite_180_ms"], data["failures"])


def fmt(value: float) -> str:
    return "n/a" if value != value else f"{value:.2f}"


WarmCpu = tuple[int, float, dict[str, float], dict[str, float], float]
"""The warm calls' (or REGISTERs') count, the peers' CPU seconds for them (maintenance subtracted), CPU by
stage, counters, and the share of a core the overlay's maintenance alone took meanwhile."""

#: bound on one command to a worker process (starting a peer, a profile dump, closing 25 peers)
COMMAND_TIMEOUT = 120.0
#: longest answer line of a worker (bytes): a timeline pass's stamps and stalls exceed asyncio's 64 KiB
ANSWER_LIMIT = 1 << 24


class PeerSet:
    """The peers one process runs, driven by commands: in the single-process layout the bench calls them
    directly, in a worker process (``--processes``) they arrive as JSON lines; either way the same code
    starts, tunes, counts, profiles and times the peers."""

    def __init__(self) -> None:
        self.peers: dict[int, Peer] = {}
        self.recorder: Recorder | None = None
        self.profile: cProfile.Profile | None = None

    async def run(self, command: str, args: dict[str, Any]) -> Any:
        return await getattr(self, f"do_{command}")(**args)

    async def do_start(
        self, index: int, join: list[Any] | None, data_dir: str, maintenance: float | None
    ) -> Any:
        config = PeerConfig(
            listen=[ListenSpec("udp", "127.0.0.1", 0)],
            overlay=HostPort("127.0.0.1", 0),
            join=HostPort(join[0], join[1]) if join else None,
            data_dir=Path(data_dir),
            cache_ttl=0.0,
            # one client registers every AOR: lift the bound on new AORs per source (and in all)
            new_aors_per_source=UNLIMITED,
            new_aors_total=UNLIMITED,
            scan_rate=UNLIMITED,
        )
        peer = await Peer.start(config, node_config=_maintenance(maintenance))
        self.peers[index] = peer
        return [list(peer.sip_address()), list(peer.overlay_address)]

    async def do_ring(self) -> list[Any]:
        """Each peer's node id, successor list and predecessor (:func:`ring_of` checks them)."""
        out: list[Any] = []
        for peer in self.peers.values():
            core = peer.node.core
            successors = None if core is None else [s.id for s in core.successors]
            predecessor = None if core is None or core.predecessor is None else core.predecessor.id
            out.append([peer.node.node_id, successors, predecessor])
        return out

    async def do_set(
        self,
        home_routing: bool | None = None,
        quorum_reads: bool | None = None,
        cache_ttl: float | None = None,
    ) -> None:
        for peer in self.peers.values():
            if home_routing is not None:
                peer.config.home_routing = home_routing
            if quorum_reads is not None:
                peer.node.quorum_reads = quorum_reads
            if cache_ttl is not None:
                peer.cache.ttl = cache_ttl

    async def do_counters(self) -> dict[str, float]:
        return _counters(list(self.peers.values()))

    async def do_cpu(self) -> float:
        return time.process_time()

    async def do_profile(self, stem: str | None) -> str | None:
        """Start profiling this process (``stem`` None), or stop and dump the profile to a file of its own."""
        if stem is None:
            self.profile = cProfile.Profile(time.process_time)  # CPU: load on the machine must not count
            self.profile.enable()
            return None
        assert self.profile is not None
        self.profile.disable()
        path = f"{stem}.{os.getpid()}"
        self.profile.dump_stats(path)
        self.profile = None
        return path

    async def do_record(self, roles: dict[str, int] | None, registers: bool = False) -> dict[str, Any] | None:
        """Start timestamps at the peers of ``roles`` this process runs (role -> peer index), or (``roles``
        None) stop and return them."""
        if roles is not None:
            here = {role: self.peers[i] for role, i in roles.items() if i in self.peers}
            self.recorder = Recorder(here, registers=registers)
            return None
        assert self.recorder is not None
        out, self.recorder = self.recorder.close(), None
        return out

    async def do_close(self) -> None:
        for peer in self.peers.values():
            await peer.close(leave=False)
        self.peers.clear()


class InProcess:
    """Every peer in this process and event loop (the layout of every run before 2026-12-07 19:00 UTC)."""

    description = "every peer in this one process and event loop; the calls queue behind it"

    def __init__(self) -> None:
        self.here = PeerSet()

    async def start(self) -> None:
        pass

    async def on(self, where: int, command: str, **args: Any) -> Any:
        return await self.here.run(command, args)

    async def each(self, command: str, **args: Any) -> list[Any]:
        return [await self.here.run(command, args)]

    async def close(self) -> None:
        await self.here.do_close()


class Workers:
    """The peers spread over ``count`` worker processes (peer i in worker i mod count): on separate
    machines every peer has a CPU of its own, in one process 50 peers queue on one event loop; Kamailio
    runs its two worker children. Each worker is this script (or ``script``, bench/registrar.py's) with
    ``--worker`` (the same build: with ``--compiled`` the compiled one), reading one JSON command a line and
    answering one JSON line."""

    def __init__(self, count: int, workdir: Path, script: str = __file__) -> None:
        self.count, self.workdir, self.script = count, workdir, str(Path(script).resolve())
        self.procs: list[asyncio.subprocess.Process] = []
        self.description = f"{count} worker processes, peer i in process i mod {count}"

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # bench/ on the worker's path: with --compiled PYTHONSAFEPATH=1 keeps the script's directory off it
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (env.get("PYTHONPATH"), str(ROOT / "bench"))))
        for k in range(self.count):
            with open(self.workdir / f"worker{k}.log", "wb") as log:
                self.procs.append(await asyncio.create_subprocess_exec(
                    sys.executable, self.script, "--worker", *(["--compiled"] if COMPILED else []),
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log, cwd=ROOT, env=env,
                    limit=ANSWER_LIMIT,
                ))  # fmt: skip

    async def _ask(self, k: int, command: str, args: dict[str, Any]) -> Any:
        proc = self.procs[k]
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write((json.dumps({"command": command, "args": args}) + "\n").encode())
        await proc.stdin.drain()
        line = await asyncio.wait_for(proc.stdout.readline(), COMMAND_TIMEOUT)
        if not line:
            log = (self.workdir / f"worker{k}.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"bench worker {k} ended during {command!r}: {log}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"bench worker {k}, {command!r}: {reply['error']}")
        return reply["ok"]

    async def on(self, where: int, command: str, **args: Any) -> Any:
        return await self._ask(where % self.count, command, args)

    async def each(self, command: str, **args: Any) -> list[Any]:
        return list(await asyncio.gather(*(self._ask(k, command, args) for k in range(len(self.procs)))))

    async def close(self) -> None:
        for k, proc in enumerate(self.procs):
            try:
                if proc.returncode is None:
                    await self._ask(k, "close", {})
            except (RuntimeError, TimeoutError, ConnectionError) as exc:
                print(f"  bench worker {k} did not close cleanly: {exc}", file=sys.stderr)
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


Layout = InProcess | Workers


async def worker(peer_set: type[PeerSet] = PeerSet) -> int:
    """``--worker``: run a :class:`PeerSet` (or ``peer_set``) for the bench process that started this one,
    one JSON command a line on stdin, one JSON answer a line on stdout (the peers' own output goes to
    stderr), until ``close`` or the end of stdin."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # nothing the peers print may reach the answers
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    here = peer_set()
    with busy_proxy_gc():  # as `p2psip start` runs a peer
        try:
            while line := await reader.readline():
                request = json.loads(line)
                try:
                    answer: dict[str, Any] = {"ok": await here.run(request["command"], request["args"])}
                except Exception as exc:  # the bench process reports it and stops the run
                    answer = {"error": f"{type(exc).__name__}: {exc}"}
                answers.write(json.dumps(answer) + "\n")
                answers.flush()
                if request["command"] == "close":
                    break
        finally:
            await here.do_close()
    return 0


async def ring_of(layout: Layout, size: int, timeout: float = 120.0) -> None:
    """Wait (bounded) until the peers' ring is consistent, as :func:`wait_until_consistent` does, with each
    node's successor and predecessor read from the process that runs it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        nodes = [
            SimpleNamespace(node_id=node_id, core=None if successors is None else SimpleNamespace(
                successors=[SimpleNamespace(id=s) for s in successors],
                predecessor=None if predecessor is None else SimpleNamespace(id=predecessor),
            ))
            for part in await layout.each("ring") for node_id, successors, predecessor in part
        ]  # fmt: skip
        if len(nodes) == size and ring_is_consistent(cast(list[Node], nodes)):
            return
        if loop.time() > deadline:
            raise TimeoutError(f"the ring of {size} peers did not settle within {timeout:g} s")
        await asyncio.sleep(0.05)


async def cpu_seconds(layout: Layout) -> float:
    """CPU seconds so far of the process(es) running the peers."""
    return float(sum(await layout.each("cpu")))


async def counters_of(layout: Layout) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in await layout.each("counters"):
        for name, value in part.items():
            out[name] = out.get(name, 0.0) + value
    return out


async def profiled(layout: Layout, stem: Path, run: Any) -> dict[Any, Any]:
    """Run the coroutine ``run`` with every peer process profiled; the profiles merged (pstats)."""
    await layout.each("profile", stem=None)
    try:
        await run
    finally:
        paths = await layout.each("profile", stem=str(stem))
    return pstats.Stats(*paths).stats  # type: ignore[attr-defined,no-any-return]


async def measure_overlay(
    size: int,
    users: list[str],
    rate: float,
    workdir: Path,
    maintenance: float | None = None,
    processes: int = 1,
    warm_only: bool = False,
) -> tuple[list[Timings], WarmCpu, WarmCpu, str]:
    """:func:`overlay_rows` with the collector tuned as ``p2psip start`` tunes it (this process stands for
    the peers' processes in the single-process layout; Kamailio runs as it is deployed too)."""
    with busy_proxy_gc():
        layout: Layout = InProcess() if processes <= 1 else Workers(min(processes, size), workdir / "workers")
        try:
            await layout.start()
            rows, warm, register = await overlay_rows(
                layout, size, users, rate, workdir, maintenance, warm_only
            )
            return rows, warm, register, layout.description
        finally:
            await layout.close()


async def overlay_rows(
    layout: Layout,
    size: int,
    users: list[str],
    rate: float,
    workdir: Path,
    maintenance: float | None,
    warm_only: bool,
) -> tuple[list[Timings], WarmCpu, WarmCpu]:
    """The overlay's row, then (same peers, same bindings) its calls with home routing off: straight from
    the peer the call enters at to the contact, instead of through the callee's home peer (docs/nat.md);
    reads from one node and from the replica set; the warm row; and where the time of a warm call and of a
    REGISTER goes. ``warm_only``: only the REGISTER, cold and warm rows and the breakdowns (target 1)."""
    join: list[Any] | None = None
    addresses: list[list[Any]] = []
    for i in range(size):
        sip, overlay = await layout.on(
            i, "start", index=i, join=join, data_dir=str(workdir / f"peer{i}"), maintenance=maintenance
        )
        join = join or overlay
        addresses.append(sip)
    await ring_of(layout, size)
    uas_port = free_port()
    uas_at = f"127.0.0.1:{uas_port}"
    empty = Timings("", [], [], 0)
    with uas(workdir, uas_port, name="uas"):
        # registrations at the first peer, calls through the last one (another peer, which must look up)
        reg_via = "{}:{}".format(*addresses[0])
        call_via = "{}:{}".format(*addresses[-1])
        await timed_split("warm-up", reg_via, call_via, uas_at, WARM_USERS, rate)  # the same Kamailio gets
        reg_counters_at = await counters_of(layout)
        cpu, wall = await cpu_seconds(layout), time.monotonic()
        registered = await timed_client(f"overlay of {size}", reg_via, uas_at, users, rate, calls=False)
        reg_cpu, reg_wall = await cpu_seconds(layout) - cpu, time.monotonic() - wall
        reg_counters = {k: v - reg_counters_at.get(k, 0) for k, v in (await counters_of(layout)).items()}
        cold = await timed_client(f"overlay of {size}", call_via, uas_at, users, rate, registers=False)
        home = Timings(f"overlay of {size}", registered.register_ms, cold.invite_ms,
                       registered.failures + cold.failures)  # fmt: skip
        direct = single = quorum_t = empty
        if not warm_only:
            await layout.each("set", home_routing=False)
            direct = await timed_client(
                f"overlay of {size}, home routing off", call_via, uas_at, users, rate, registers=False
            )
            # Reads before issue 15 (the callee's bindings from the responsible node alone) against the
            # replica-set reads, alternately, same peers, same bindings, home routing on again: the rows
            # next to each other see the same machine load.
            await layout.each("set", home_routing=True)
            runs: dict[bool, list[Timings]] = {True: [], False: []}
            for quorum in (False, True, False, True):
                await layout.each("set", quorum_reads=quorum)
                runs[quorum].append(await timed_client(
                    f"overlay of {size}, {'replica-set' if quorum else 'single-node'} reads",
                    call_via, uas_at, users, rate, registers=False,
                ))  # fmt: skip
            single, quorum_t = Timings.pool(runs[False]), Timings.pool(runs[True])
        # Warm: the entry peer's location cache on (it honours each binding's expiry), filled by one
        # unmeasured pass over the AORs; the measured pass then skips the DHT read of the callee.
        await layout.each("set", cache_ttl=WARM_CACHE_TTL)
        await timed_client("cache fill", call_via, uas_at, users, rate, registers=False)
        before = await counters_of(layout)
        cpu, wall = await cpu_seconds(layout), time.monotonic()
        warm = await timed_client(
            f"overlay of {size}, warm location cache", call_via, uas_at, users, rate, registers=False
        )
        cpu, wall = await cpu_seconds(layout) - cpu, time.monotonic() - wall
        counters = {k: v - before.get(k, 0) for k, v in (await counters_of(layout)).items()}
        idle = await cpu_seconds(layout)
        await asyncio.sleep(wall)  # the same interval without calls: overlay maintenance alone
        idle = await cpu_seconds(layout) - idle
        cpu -= idle
        reg_cpu -= idle * reg_wall / wall
        # The same warm calls again, profiled, and an idle interval as long, profiled: the difference
        # per stage is what the calls cost.
        busy = await profiled(layout, workdir / "profile-warm", timed_client(
            "profiled warm pass", call_via, uas_at, users, rate, registers=False))  # fmt: skip
        resting = await profiled(layout, workdir / "profile-idle", asyncio.sleep(wall))
        stages = stage_seconds(busy)
        for stage, seconds in stage_seconds(resting).items():
            stages[stage] = stages.get(stage, 0.0) - seconds
        if TOP:
            _print_top(busy, resting, len(warm.invite_ms), "warm call", 1.0)
        # REGISTERs of new AORs, profiled (the same path as the measured ones: a new AOR, one signed
        # write to 3 replicas, no DHT read before it)
        fresh = [f"prof{u}" for u in users]
        reg_started = time.monotonic()
        reg_busy = await profiled(layout, workdir / "profile-register", timed_client(
            "profiled REGISTER pass", reg_via, uas_at, fresh, rate, calls=False))  # fmt: skip
        scale = (time.monotonic() - reg_started) / wall
        reg_stages = stage_seconds(reg_busy)
        for stage, seconds in stage_seconds(resting).items():
            reg_stages[stage] = reg_stages.get(stage, 0.0) - seconds * scale
        if TOP:
            _print_top(reg_busy, resting, len(fresh), "REGISTER", scale)
        # Once more each with timestamps where the INVITE and the 180 enter and leave the two peers on the
        # path, and where a REGISTER passes the registrar peer's stages (unprofiled): latency by stage.
        roles = {"entry": size - 1, "home": 0}
        await layout.each("record", roles=roles)
        timed = await timed_client("timeline pass", call_via, uas_at, users, rate, registers=False)
        call_stamps = await layout.each("record", roles=None)
        await layout.each("record", roles=roles, registers=True)
        reg_timed = await timed_client(
            "REGISTER timeline pass", reg_via, uas_at, [f"tl{u}" for u in users], rate, calls=False
        )
        reg_stamps = await layout.each("record", roles=None)
        calls_seen: dict[str, dict[str, float]] = {}
        cpu_seen: dict[str, dict[str, float]] = {}
        for part in call_stamps:
            for call_id, seen in part["calls"].items():
                calls_seen.setdefault(call_id, {}).update(seen)
            for call_id, seen in part["cpu"].items():
                cpu_seen.setdefault(call_id, {}).update(seen)
        TAILS.append(tail_lines(calls_seen, cpu_seen, call_stamps, timed.invite_ms))
        records = [r for part in reg_stamps for r in part["registers"]]
        TIMELINES.append(
            (call_stages(calls_seen, timed.invite_ms), register_stages(records, reg_timed.register_ms))
        )
        return [home, direct, single, quorum_t, warm], (
            len(warm.invite_ms), cpu, stages, counters, idle / wall
        ), (
            len(registered.register_ms), reg_cpu, reg_stages, reg_counters, idle / wall
        )  # fmt: skip


def _maintenance(period: float | None) -> NodeConfig:
    """The overlay's maintenance as ``p2psip start`` runs it (``NodeConfig()``: stabilize every 1 s, fix
    fingers and check the predecessor every 2 s, repair every 60 s), or every ``period`` seconds for all
    of it and repair every 10 periods (``--maintenance``, the tests' quick ring)."""
    if period is None:
        return NodeConfig()
    return quick_node_config(interval=period, rpc_timeout=1.0)


def _counters(peers: list[Peer]) -> dict[str, float]:
    """The peers' counters of the call path, summed over the peers."""
    names = ("lookups", "lookup_cache_hits", "home_lookups_saved", "routed_to_home", "routed")
    out = {name: float(sum(p.counters[name] for p in peers)) for name in names}
    for name in ("received", "sent"):  # SIP messages in and out of the peers
        out[f"sip_{name}"] = float(sum(p.stack.transport.stats[name] for p in peers))
    return out


async def timed_split(
    system: str, reg_via: str, call_via: str, uas: str, users: list[str], rate: float
) -> Timings:
    """REGISTER through ``reg_via`` and call through ``call_via`` (two client runs when they differ)."""
    if reg_via == call_via:
        return await timed_client(system, reg_via, uas, users, rate)
    first = await timed_client(system, reg_via, uas, users, rate, calls=False)
    second = await timed_client(system, call_via, uas, users, rate, registers=False)
    return Timings(system, first.register_ms, second.invite_ms, first.failures + second.failures)


async def measure_kamailio(users: list[str], rate: float, workdir: Path) -> Timings:
    port = free_port()
    kam = Kamailio(kamailio_registrar("127.0.0.1", port), workdir, port, shm_mb=256, transports=("udp",))
    kam.check()
    uas_port = free_port()
    with kam, uas(workdir, uas_port, name="uas"):
        via = f"127.0.0.1:{port}"
        # the same unmeasured warm-up our overlay gets once its ring is consistent
        await timed_split("warm-up", via, via, f"127.0.0.1:{uas_port}", WARM_USERS, rate)
        return await timed_split("Kamailio registrar+proxy", via, via, f"127.0.0.1:{uas_port}", users, rate)


def main() -> int:
    if sys.argv[1:2] == ["--worker"]:
        return asyncio.run(worker())
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--sizes", default="5,20,50", help="overlay sizes (comma-separated)")
    parser.add_argument("--users", type=int, default=200, help="AORs registered and called per run")
    parser.add_argument("--rate", type=float, default=20.0, help="REGISTERs and calls per second")
    parser.add_argument(
        "--maintenance", type=float, default=None,
        help="overlay stabilize/fix-fingers period, s, repair every 10 periods (default: as p2psip start runs"
        " the overlay: stabilize 1 s, fix fingers 2 s, repair 60 s; the runs before 2026-12-07 10:10 used 1)",
    )  # fmt: skip
    parser.add_argument(
        "--repeat", type=int, default=2, help="fresh runs of every cell, interleaved (default 2)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (removed by default)")
    parser.add_argument(
        "--compiled", action="store_true", help="the peers run the compiled build (tools/build_compiled.py)"
    )
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown too")
    parser.add_argument(
        "--processes", type=int, default=1,
        help="run each overlay's peers in N worker processes (peer i in process i mod N; N >= the size: one"
        " process per peer); default 1: every peer in this process and event loop",
    )  # fmt: skip
    parser.add_argument(
        "--warm-only", action="store_true",
        help="target 1's rows only: REGISTER, cold and warm calls and their breakdowns (no home-routing-off"
        " and read rows)",
    )  # fmt: skip
    parser.add_argument(
        "--top", type=int, default=0, help="print the N costliest functions of the warm calls"
    )
    args = parser.parse_args()
    global TOP
    TOP = max(0, args.top)
    if (
        (args.maintenance is not None and args.maintenance <= 0)
        or args.repeat < 1
        or args.rate <= 0
        or args.users < 1
        or args.processes < 1
    ):
        print(
            "bench/peer.py: --maintenance and --rate must be > 0, --repeat, --users and --processes >= 1",
            file=sys.stderr,
        )
        return 2
    if missing_tool("peer"):
        return 2
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    users = [f"user{i:04d}" for i in range(args.users)]
    root = Path(tempfile.mkdtemp(prefix="bench-peer-"))
    conditions = Conditions()
    layout_text = (
        "every peer in one process" if args.processes == 1 else f"peers in up to {args.processes} processes"
    )
    print(
        f"bench/peer.py: {len(users)} AORs at {args.rate:g}/s; overlays of {sizes}; maintenance "
        f"{'as p2psip start' if args.maintenance is None else f'every {args.maintenance:g} s'}; {args.repeat} repeats; p2psip {'compiled build' if COMPILED else 'pure Python'}; {layout_text}; work dir {root}",
        flush=True,
    )
    started = time.monotonic()
    cells: dict[int, list[list[Timings]]] = {size: [] for size in sizes}
    breakdowns: dict[int, Breakdown] = {size: Breakdown() for size in sizes}
    reg_breakdowns: dict[int, Breakdown] = {size: Breakdown("REGISTER") for size in sizes}
    kam_runs: list[Timings] = []
    try:
        for rep in range(args.repeat):
            for size in sizes:
                pair, warm_cpu, reg_cpu, where = asyncio.run(measure_overlay(
                    size, users, args.rate, root / f"overlay{size}-{rep}", args.maintenance, args.processes,
                    args.warm_only,
                ))  # fmt: skip
                cells[size].append(pair)
                breakdowns[size].add(*warm_cpu)
                reg_breakdowns[size].add(*reg_cpu)
                breakdowns[size].layout = reg_breakdowns[size].layout = where
                for m in pair:
                    if not m.system:
                        continue
                    print(
                        f"  [{rep + 1}] {m.system}: {len(m.register_ms)} REGISTERs, {len(m.invite_ms)} calls, "
                        f"{m.failures} failed",
                        flush=True,
                    )
            kam_one = asyncio.run(measure_kamailio(users, args.rate, root / f"kamailio-{rep}"))
            print(
                f"  [{rep + 1}] {kam_one.system}: {len(kam_one.register_ms)} REGISTERs, "
                f"{len(kam_one.invite_ms)} calls, {kam_one.failures} failed",
                flush=True,
            )
            kam_runs.append(kam_one)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    measures: list[Timings] = []
    for size in sizes:
        measures.extend(Timings.pool([run[i] for run in cells[size]]) for i in range(ROWS))
    kam = Timings.pool(kam_runs)
    measures.append(kam)

    kam_inv99, kam_reg99 = Timings.pct(kam.invite_ms, 99), Timings.pct(kam.register_ms, 99)
    header = ["system", "REGISTER p50 ms", "REGISTER p99 ms", "INVITE→180 p50 ms", "INVITE→180 p99 ms",
              "failed", "p99 setup / Kamailio", "p99 REGISTER / Kamailio",
              "REGISTER p99 spread", "INVITE p99 spread"]  # fmt: skip
    rows = []
    for m in measures:
        if not m.system:
            continue  # a row --warm-only skipped
        inv99, reg99 = Timings.pct(m.invite_ms, 99), Timings.pct(m.register_ms, 99)
        rows.append([
            m.system, fmt(Timings.pct(m.register_ms, 50)), fmt(reg99), fmt(Timings.pct(m.invite_ms, 50)),
            fmt(inv99), str(m.failures),
            f"{inv99 / kam_inv99:.1f}x" if kam_inv99 > 0 and inv99 == inv99 else "n/a",
            f"{reg99 / kam_reg99:.1f}x" if kam_reg99 > 0 and reg99 == reg99 else "n/a",
            m.spread(0), m.spread(1),
        ])  # fmt: skip
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print()
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    groups = [measures[ROWS * i : ROWS * i + ROWS] for i in range(len(sizes))]
    for home, direct, single, quorum, warm in groups:
        w50, w99 = Timings.pct(warm.invite_ms, 50), Timings.pct(warm.invite_ms, 99)
        print(f"{home.system}: warm location cache p50/p99 {fmt(w50)}/{fmt(w99)} ms vs cold (cache off) "
              f"{fmt(Timings.pct(home.invite_ms, 50))}/{fmt(Timings.pct(home.invite_ms, 99))} ms")  # fmt: skip
        if not direct.system:
            continue
        h99, d99 = Timings.pct(home.invite_ms, 99), Timings.pct(direct.invite_ms, 99)
        print(f"{home.system}: p99 call setup through the callee's home peer {fmt(h99)} ms, "
              f"direct to the contact {fmt(d99)} ms (+{fmt(h99 - d99)} ms for the home peer's hop)")  # fmt: skip
        q50, q99 = Timings.pct(quorum.invite_ms, 50), Timings.pct(quorum.invite_ms, 99)
        s50, s99 = Timings.pct(single.invite_ms, 50), Timings.pct(single.invite_ms, 99)
        print(f"{home.system}: call setup with replica-set reads p50/p99 {fmt(q50)}/{fmt(q99)} ms, "
              f"with single-node reads {fmt(s50)}/{fmt(s99)} ms ({len(single.repeats)} runs each, alternating)")  # fmt: skip
    for i, size in enumerate(sizes):
        print(f"\noverlay of {size}, warm calls:")
        print("\n".join(breakdowns[size].lines()))
        print(
            "\n".join(timeline_lines([t[0] for t in TIMELINES[i :: len(sizes)]], "warm calls (INVITE->180)"))
        )
        for lines in TAILS[i :: len(sizes)]:
            print("\n".join(lines))
        print(f"\noverlay of {size}, REGISTERs (new AORs: one signed write to 3 replicas, no read):")
        print("\n".join(reg_breakdowns[size].lines()))
        print("\n".join(timeline_lines([t[1] for t in TIMELINES[i :: len(sizes)]], "REGISTERs (->200)")))
        warm_row, home_row = measures[ROWS * i + ROWS - 1], measures[ROWS * i]
        w99, r99 = Timings.pct(warm_row.invite_ms, 99), Timings.pct(home_row.register_ms, 99)
        print(f"target 1 (<= 1.5x Kamailio at p99), overlay of {size}: warm call setup {fmt(w99)} vs {fmt(kam_inv99)} "
              f"ms ({w99 / kam_inv99:.2f}x), REGISTER {fmt(r99)} vs {fmt(kam_reg99)} ms ({r99 / kam_reg99:.2f}x)")  # fmt: skip
    biggest = measures[ROWS * len(sizes) - ROWS] if sizes else None
    if biggest is not None:
        p99 = Timings.pct(biggest.invite_ms, 99)
        verdict = "met" if p99 < 50 else "NOT met"
        print(
            f"\ntarget p99 call setup < 50 ms through the {sizes[-1]}-peer overlay: {fmt(p99)} ms, {verdict}"
        )
    print(f"({conditions}; shared machine; {args.repeat} repeats; {time.monotonic() - started:.0f} s; "
          f"p2psip {'compiled build' if COMPILED else 'pure Python'}, the timing client pure Python; "
          f"{layout_text})")  # fmt: skip
    if args.markdown:
        print()
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(str(c) for c in row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
