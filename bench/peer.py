"""Peer node benchmark: REGISTER→200 and INVITE→180 latency through the overlay vs a single Kamailio.

    python3 bench/peer.py [--sizes 5,20,50] [--users 200] [--rate 20] [--markdown] [--compiled]

For overlays of 5, 20 and 50 peers on loopback (all peers in this one Python process, one event loop: a
single-core deployment of many peers), a timing client in a separate process (the tests' independent
phone, timestamps from its event loop) registers ``--users`` AORs at one peer (REGISTER→200: a DHT read and
a signed write per contact, stored on 3 replicas) and then calls every AOR through another peer, timing
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
INVITE and its 180 enter and leave the entry and the home peer (transport observers).

``--compiled``: the peers run the mypyc build of tools/build_compiled.py (built first if needed; bench/harness.py
stops the run if a module of the build would come from its .py); the timing client stays pure Python, so
both builds are timed by the same phone. cProfile does not see inside compiled modules: in that build the
stage breakdown charges their time to their Python callers; the CPU per call (no profiler) is exact.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import COMPILED, ROOT, missing_tool  # first: it puts this checkout on sys.path

# isort: split
from conditions import Conditions
from conftest import free_port
from interop.kamailio import Kamailio, usrloc_header
from interop.sipp import uas

from overlay.localring import quick_node_config, wait_until_consistent
from overlay.node import NodeConfig
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
        result = await phone.call(f"sip:{user}@p2p.example", via, timeout=10)
        ringing = result.latency(180)
        if result.answered and result.bye_status == 200 and ringing is not None:
            inv.append(ringing * 1000)
        else:
            failures += 1
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
}  # fmt: skip


def _stage(func: tuple[str, int, str]) -> str | None:
    path, _line, name = func
    if path == "~" or path.startswith("<"):
        return None  # a C function or generated code: its time goes to its callers' stages
    if path.endswith("p2psip/peer.py"):
        return STAGE_OF_PEER_FUNCTION.get(name, "peer (other)")
    return next((stage for part, stage in STAGE_OF_FILE if part in path), "other")


def stage_seconds(profile: cProfile.Profile) -> dict[str, float]:
    """CPU seconds by stage (own time of each function; a C function's time split among its callers)."""
    stats: dict[Any, Any] = pstats.Stats(profile).stats  # type: ignore[attr-defined]
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


def _print_top(profiled: cProfile.Profile, resting: cProfile.Profile, calls: int) -> None:
    busy: dict[Any, Any] = pstats.Stats(profiled).stats  # type: ignore[attr-defined]
    idle: dict[Any, Any] = pstats.Stats(resting).stats  # type: ignore[attr-defined]
    own = {f: v[2] - idle.get(f, (0, 0, 0.0))[2] for f, v in busy.items()}
    cum = {f: v[3] - idle.get(f, (0, 0, 0.0, 0.0))[3] for f, v in busy.items()}
    print(f"functions with the most own CPU per warm call (cProfile, idle subtracted, {calls} calls; "
          "own us, calls, cumulative us):")  # fmt: skip
    for func, seconds in sorted(own.items(), key=lambda kv: -kv[1])[:TOP]:
        path, line, name = func
        where = "/".join(path.split("/")[-2:]) + f" {cum[func] * 1e6 / max(calls, 1):8.1f} us"
        print(
            f"  {seconds * 1e6 / max(calls, 1):8.1f} us  {busy[func][1] / max(calls, 1):6.1f} x  {where}:{line} {name}"
        )


#: the latency stages of the warm calls of each cell, in the order the cells ran
TIMELINES: list[dict[str, list[float]]] = []


class Timeline:
    """Timestamps (``perf_counter``) of the INVITE and its 180 entering and leaving the entry peer and the
    home peer (transport observers, so parse to serialise is inside a peer's stage), by Call-ID."""

    STAGES = (
        ("entry peer: INVITE in -> out", ("entry", "in", "INVITE"), ("entry", "out", "INVITE")),
        ("entry -> home peer (loop, kernel)", ("entry", "out", "INVITE"), ("home", "in", "INVITE")),
        ("home peer: INVITE in -> out", ("home", "in", "INVITE"), ("home", "out", "INVITE")),
        ("callee: INVITE out -> 180 in (sipp)", ("home", "out", "INVITE"), ("home", "in", "180")),
        ("home peer: 180 in -> out", ("home", "in", "180"), ("home", "out", "180")),
        ("home -> entry peer (loop, kernel)", ("home", "out", "180"), ("entry", "in", "180")),
        ("entry peer: 180 in -> out", ("entry", "in", "180"), ("entry", "out", "180")),
    )

    def __init__(self, entry: Peer, home: Peer) -> None:
        self.events: dict[bytes, dict[tuple[str, str, str], float]] = {}
        self.order: list[bytes] = []
        self.observed: list[tuple[Peer, Any]] = []
        for role, peer in (("entry", entry), ("home", home)):
            observer = self._observer(role)
            peer.stack.transport.add_observer(observer)
            self.observed.append((peer, observer))

    def _observer(self, role: str) -> Any:
        clock = time.perf_counter
        events = self.events

        def observe(direction: str, data: bytes, _remote: Any) -> None:
            at = clock()
            first = data[: data.find(b" ", 8)]
            kind = "INVITE" if first.startswith(b"INVITE") else "180" if first.endswith(b" 180") else None
            if kind is None:
                return
            start = data.find(b"\r\nCall-ID: ")
            if start < 0:
                return
            call_id = data[start + 11 : data.find(b"\r\n", start + 11)]
            if call_id not in events:
                events[call_id] = {}
                self.order.append(call_id)
            events[call_id].setdefault((role, direction, kind), at)

        return observe

    def close(self) -> None:
        for peer, observer in self.observed:
            peer.stack.transport.remove_observer(observer)

    def stages(self, client_ms: list[float]) -> dict[str, list[float]]:
        """ms per stage and call; "client, loopback" is what the client measured minus the peers' span."""
        out: dict[str, list[float]] = {name: [] for name, _a, _b in self.STAGES}
        out["client + loopback to/from the entry peer"] = []
        for call_id, total in zip(self.order, client_ms, strict=False):
            seen = self.events[call_id]
            if not all(a in seen and b in seen for _n, a, b in self.STAGES):
                continue
            for name, a, b in self.STAGES:
                out[name].append((seen[b] - seen[a]) * 1000)
            span = seen[("entry", "out", "180")] - seen[("entry", "in", "INVITE")]
            out["client + loopback to/from the entry peer"].append(total - span * 1000)
        return out


def timeline_lines(parts: list[dict[str, list[float]]]) -> list[str]:
    """The latency stages pooled over the repeats: p50 and p99 per stage."""
    pooled: dict[str, list[float]] = {}
    for part in parts:
        for name, values in part.items():
            pooled.setdefault(name, []).extend(values)
    calls = max((len(v) for v in pooled.values()), default=0)
    out = [
        f"latency by stage of the warm calls (INVITE->180, {calls} calls, timestamps at the peers' sockets):"
    ]
    for name, values in pooled.items():
        if values:
            out.append(
                f"  {name:<44} p50 {Timings.pct(values, 50):6.3f} ms  p99 {Timings.pct(values, 99):6.3f} ms"
            )
    return out


@dataclass
class Breakdown:
    """Where the peers' CPU goes during the warm calls: each stage's CPU per call, the same interval's
    idle CPU (overlay maintenance with no calls) subtracted. Measured with cProfile (which inflates every
    figure alike; read the shares), and the total without the profiler (``cpu_ms_per_call``)."""

    calls: int = 0
    cpu_ms_per_call: list[float] = field(default_factory=list)
    stages_ms: dict[str, list[float]] = field(default_factory=dict)
    counters: dict[str, list[float]] = field(default_factory=dict)
    #: share of a core the peers' overlay maintenance took without calls, per run
    maintenance: list[float] = field(default_factory=list)

    def add(
        self, calls: int, cpu_s: float, stages: dict[str, float], counters: dict[str, float], idle: float
    ) -> None:
        self.calls += calls
        self.maintenance.append(idle)
        self.cpu_ms_per_call.append(cpu_s * 1000 / calls)
        for stage, seconds in stages.items():
            self.stages_ms.setdefault(stage, []).append(seconds * 1000 / calls)
        for name, value in counters.items():
            self.counters.setdefault(name, []).append(value / calls)

    def lines(self) -> list[str]:
        def span(values: list[float], digits: int = 3) -> str:
            lo, hi = min(values), max(values)
            return f"{lo:.{digits}f}" if lo == hi else f"{lo:.{digits}f}-{hi:.{digits}f}"

        total = sum(max(v) for v in self.stages_ms.values()) or 1.0
        out = [f"peers' CPU per warm call, overlay maintenance subtracted: {span(self.cpu_ms_per_call)} ms "
               f"(no profiler; {len(self.cpu_ms_per_call)} runs)",
               f"the peers' overlay maintenance alone, no calls: {span([100 * m for m in self.maintenance], 1)} % "
               "of a core (every peer in this one process and event loop; the calls queue behind it)",
               "by stage (cProfile, ms per call; shares of the profiled total):"]  # fmt: skip
        for stage, values in sorted(self.stages_ms.items(), key=lambda kv: -max(kv[1])):
            if max(values) >= 0.001:
                out.append(f"  {stage:<36} {span(values):>13} ms  {100 * max(values) / total:5.1f} %")
        per_call = ", ".join(f"{name} {span(v, 2)}" for name, v in sorted(self.counters.items()) if max(v))
        out.append(f"per call at the peers: {per_call}")
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
    return Timings(system, data["register_ms"], data["invite_180_ms"], data["failures"])


def fmt(value: float) -> str:
    return "n/a" if value != value else f"{value:.2f}"


WarmCpu = tuple[int, float, dict[str, float], dict[str, float], float]
"""The warm calls' count, the peers' CPU seconds for them (maintenance subtracted), CPU by stage, counters,
and the share of a core the overlay's maintenance alone took meanwhile."""


async def measure_overlay(
    size: int, users: list[str], rate: float, workdir: Path, maintenance: float | None = None
) -> tuple[list[Timings], WarmCpu]:
    """:func:`overlay_rows` with the collector tuned as ``p2psip start`` tunes it (this process stands for
    the peers' processes; Kamailio runs as it is deployed too)."""
    with busy_proxy_gc():
        return await overlay_rows(size, users, rate, workdir, maintenance)


async def overlay_rows(
    size: int, users: list[str], rate: float, workdir: Path, maintenance: float | None = None
) -> tuple[list[Timings], WarmCpu]:
    """The overlay's row, then (same peers, same bindings) its calls with home routing off: straight from
    the peer the call enters at to the contact, instead of through the callee's home peer (docs/nat.md)."""
    peers: list[Peer] = []
    try:
        for i in range(size):
            config = PeerConfig(
                listen=[ListenSpec("udp", "127.0.0.1", 0)],
                overlay=HostPort("127.0.0.1", 0),
                join=HostPort(*peers[0].overlay_address) if peers else None,
                data_dir=workdir / f"peer{i}",
                cache_ttl=0.0,
                # one client registers every AOR: lift the bound on new AORs per source (and in all)
                new_aors_per_source=UNLIMITED,
                new_aors_total=UNLIMITED,
                scan_rate=UNLIMITED,
            )
            peers.append(await Peer.start(config, node_config=_maintenance(maintenance)))
        await wait_until_consistent([p.node for p in peers], timeout=120)
        uas_port = free_port()
        with uas(workdir, uas_port, name="uas"):
            # registrations at the first peer, calls through the last one (another peer, which must look up)
            host, port = peers[0].sip_address()
            call_host, call_port = peers[-1].sip_address()
            await timed_split(  # warm-up, not measured: the same Kamailio gets
                "warm-up", f"{host}:{port}", f"{call_host}:{call_port}", f"127.0.0.1:{uas_port}",
                WARM_USERS, rate,
            )  # fmt: skip
            home = await timed_split(
                f"overlay of {size}", f"{host}:{port}", f"{call_host}:{call_port}", f"127.0.0.1:{uas_port}",
                users, rate,
            )  # fmt: skip
            for peer in peers:
                peer.config.home_routing = False
            direct = await timed_client(
                f"overlay of {size}, home routing off", f"{call_host}:{call_port}", f"127.0.0.1:{uas_port}",
                users, rate, registers=False,
            )  # fmt: skip
            # Reads before issue 15 (the callee's bindings from the responsible node alone) against the
            # replica-set reads, alternately, same peers, same bindings, home routing on again: the rows
            # next to each other see the same machine load.
            for peer in peers:
                peer.config.home_routing = True
            runs: dict[bool, list[Timings]] = {True: [], False: []}
            for quorum in (False, True, False, True):
                for peer in peers:
                    peer.node.quorum_reads = quorum
                runs[quorum].append(await timed_client(
                    f"overlay of {size}, {'replica-set' if quorum else 'single-node'} reads",
                    f"{call_host}:{call_port}", f"127.0.0.1:{uas_port}", users, rate, registers=False,
                ))  # fmt: skip
            single, quorum_t = Timings.pool(runs[False]), Timings.pool(runs[True])
            # Warm: the entry peer's location cache on (it honours each binding's expiry), filled by one
            # unmeasured pass over the AORs; the measured pass then skips the DHT read of the callee.
            for peer in peers:
                peer.cache.ttl = WARM_CACHE_TTL
            await timed_client(
                "cache fill",
                f"{call_host}:{call_port}",
                f"127.0.0.1:{uas_port}",
                users,
                rate,
                registers=False,
            )
            before = _counters(peers)
            cpu, wall = time.process_time(), time.monotonic()
            warm = await timed_client(
                f"overlay of {size}, warm location cache", f"{call_host}:{call_port}", f"127.0.0.1:{uas_port}",
                users, rate, registers=False,
            )  # fmt: skip
            cpu, wall = time.process_time() - cpu, time.monotonic() - wall
            counters = {k: v - before.get(k, 0) for k, v in _counters(peers).items()}
            idle = time.process_time()
            await asyncio.sleep(wall)  # the same interval without calls: overlay maintenance alone
            idle = time.process_time() - idle
            cpu -= idle
            # The same warm calls again, profiled, and an idle interval as long, profiled: the difference
            # per stage is what the calls cost.
            profiled = cProfile.Profile(time.process_time)  # CPU: load on the machine must not count
            profiled.enable()
            await timed_client(
                "profiled warm pass", f"{call_host}:{call_port}", f"127.0.0.1:{uas_port}", users, rate,
                registers=False,
            )  # fmt: skip
            profiled.disable()
            resting = cProfile.Profile(time.process_time)
            resting.enable()
            await asyncio.sleep(wall)
            resting.disable()
            stages = stage_seconds(profiled)
            for stage, seconds in stage_seconds(resting).items():
                stages[stage] = stages.get(stage, 0.0) - seconds
            if TOP:
                _print_top(profiled, resting, len(warm.invite_ms))
            # Once more with timestamps where the INVITE and the 180 enter and leave the two peers on the
            # path (unprofiled): the latency by stage.
            timeline = Timeline(entry=peers[-1], home=peers[0])
            timed = await timed_client(
                "timeline pass", f"{call_host}:{call_port}", f"127.0.0.1:{uas_port}", users, rate,
                registers=False,
            )  # fmt: skip
            timeline.close()
            TIMELINES.append(timeline.stages(timed.invite_ms))
            return [home, direct, single, quorum_t, warm], (
                len(warm.invite_ms),
                cpu,
                stages,
                counters,
                idle / wall,
            )
    finally:
        for peer in peers:
            await peer.close(leave=False)


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
    ):
        print(
            "bench/peer.py: --maintenance and --rate must be > 0, --repeat and --users >= 1", file=sys.stderr
        )
        return 2
    if missing_tool("peer"):
        return 2
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    users = [f"user{i:04d}" for i in range(args.users)]
    root = Path(tempfile.mkdtemp(prefix="bench-peer-"))
    conditions = Conditions()
    print(
        f"bench/peer.py: {len(users)} AORs at {args.rate:g}/s; overlays of {sizes}; maintenance "
        f"{'as p2psip start' if args.maintenance is None else f'every {args.maintenance:g} s'}; {args.repeat} repeats; p2psip {'compiled build' if COMPILED else 'pure Python'}; work dir {root}",
        flush=True,
    )
    started = time.monotonic()
    cells: dict[int, list[list[Timings]]] = {size: [] for size in sizes}
    breakdowns: dict[int, Breakdown] = {size: Breakdown() for size in sizes}
    kam_runs: list[Timings] = []
    try:
        for rep in range(args.repeat):
            for size in sizes:
                pair, warm_cpu = asyncio.run(
                    measure_overlay(size, users, args.rate, root / f"overlay{size}-{rep}", args.maintenance)
                )
                cells[size].append(pair)
                breakdowns[size].add(*warm_cpu)
                for m in pair:
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
        print("\n".join(timeline_lines(TIMELINES[i :: len(sizes)])))
    biggest = measures[ROWS * len(sizes) - ROWS] if sizes else None
    if biggest is not None:
        p99 = Timings.pct(biggest.invite_ms, 99)
        verdict = "met" if p99 < 50 else "NOT met"
        print(
            f"\ntarget p99 call setup < 50 ms through the {sizes[-1]}-peer overlay: {fmt(p99)} ms, {verdict}"
        )
    print(f"({conditions}; shared machine; {args.repeat} repeats; {time.monotonic() - started:.0f} s; "
          f"p2psip {'compiled build' if COMPILED else 'pure Python'}, the timing client pure Python)")  # fmt: skip
    if args.markdown:
        print()
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(str(c) for c in row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
