"""Proxy benchmark: calls per second with 0 failed calls, sipp UAC → proxy → sipp UAS on loopback.

One command::

    python bench/proxy.py            # full run: 10 s per rate step (about 10-15 minutes)
    python bench/proxy.py --quick    # 3 s steps, fewer rates (about 3 minutes)
    python bench/proxy.py --workers 2 --only "p2psip x2,kamailio-tm x2"   # both cores, same children

Proxies measured in the same run, one at a time, on UDP:

- ``p2psip`` — our ``p2psip proxy`` command, stateful (transactions, Record-Route), asyncio event loop;
- ``p2psip+uvloop`` — the same with ``--loop uvloop`` (when uvloop is installed: the ``fast`` extra);
- ``kamailio-tm`` — Kamailio 5.6 as a stateful proxy (``tm``'s ``t_relay``, Record-Route, 4 workers);
- ``kamailio-sl`` — Kamailio stateless (``forward``), the floor any proxy can reach;
- ``direct`` — sipp UAC straight to sipp UAS, no proxy: the ceiling of what sipp can measure here.
- with ``--workers N``: ``p2psip xN`` — ``p2psip proxy --workers N`` (N processes on one UDP port, each
  datagram handed to the worker that keeps its transaction) — and ``kamailio-tm xN``, Kamailio tm with N
  children: the ratio of an ``xN`` row is to ``kamailio-tm xN``.

CPU time per call is per call *offered* (a failing call's retransmissions cost too); "(overloaded)" marks
a proxy that did not sustain 1,000 calls/s, so that figure is from a step it failed. Kamailio's figure
includes its idle timer and worker processes, which weighs more at low rates.

For each: the highest rate of a bounded ladder (then one bisection step) that completes every call in
every one of ``--repeat`` runs (default 2), each at no less than 90 % of the asked rate (calls over the
run's time less 1 s for the last calls' tail and the UAC's wait: a "0 failures" step that ran slower than
asked is not a pass); CPU time per call at 1,000 calls/s
(user+system of the proxy and its worker processes, from /proc, over the whole step; the median of the
repeats, their spread beside it); and p99 call-setup
latency (INVITE sent → 200 received at the UAC, from sipp's ``-trace_rtt``, 1 ms resolution) at half of
our stateful proxy's maximum, for every proxy at that same rate. Each step uses a fresh proxy and UAS.

The machine may be shared: numbers move with load, so compare ratios from the same run. The footer gives
the date, load average, CPU model and steal time over the run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tools"))
from build_compiled import use_if_asked  # noqa: E402

COMPILED = use_if_asked()  # --compiled: run the mypyc build of tools/build_compiled.py instead

from conditions import Conditions  # noqa: E402
from conftest import free_port  # noqa: E402
from interop.kamailio import Kamailio, stateful_config, stateless_config  # noqa: E402
from interop.ourproxy import OurProxy  # noqa: E402
from interop.procs import ChildError  # noqa: E402
from interop.sipp import SippResult, run_calls, uas  # noqa: E402

FULL_LADDER = [250, 500, 750, 1000, 1500, 2000, 2500, 3000, 4000, 5000, 6000]
QUICK_LADDER = [250, 500, 1000, 2000, 3000]
#: a step passes only at this fraction of the asked rate or more
MIN_RATE_FRACTION = 0.9
#: seconds of a run that are not sending: the last calls' tail and the UAC's 0.5 s wait
TAIL_S = 1.0


class Runner:
    """Something that forwards calls: started fresh for every step, with its CPU time readable."""

    def __init__(
        self,
        name: str,
        make: Callable[[Path], AbstractContextManager[object]] | None,
        address: Callable[[object], str],
        cpu: Callable[[object], float],
    ) -> None:
        self.name = name
        self.make = make
        self.address = address
        self.cpu = cpu
        self.last: object = None
        """The proxy of the last step, readable after it stopped (our workers' counters)."""

    @contextlib.contextmanager
    def running(self, workdir: Path) -> Iterator[tuple[str | None, Callable[[], float]]]:
        if self.make is None:
            yield None, lambda: 0.0
            return
        with self.make(workdir) as proc:
            self.last = proc
            yield self.address(proc), lambda: self.cpu(proc)


def _ours(loop: str, workers: int = 1) -> Runner:
    extra = ["--workers", str(workers)] if workers > 1 else []
    return Runner(
        f"p2psip{'+uvloop' if loop == 'uvloop' else ''}{f' x{workers}' if workers > 1 else ''}",
        lambda wd: OurProxy(wd, ["udp:127.0.0.1:0"], loop=loop, extra=extra),
        lambda p: p.address("udp"),  # type: ignore[attr-defined]
        lambda p: p.cpu_seconds(),  # type: ignore[attr-defined]
    )


def _kamailio(stateful: bool, children: int = 4, label: str = "") -> Runner:
    def make(wd: Path) -> Kamailio:
        port = free_port()
        build = stateful_config if stateful else stateless_config
        return Kamailio(
            build("127.0.0.1", port, children=children, transports=("udp",)),
            wd,
            port,
            shm_mb=1024,
            transports=("udp",),
        )

    return Runner(
        ("kamailio-tm" if stateful else "kamailio-sl") + label,
        make,
        lambda k: f"127.0.0.1:{k.port}",  # type: ignore[attr-defined]
        lambda k: k.cpu_seconds(),  # type: ignore[attr-defined]
    )


@dataclass
class Step:
    rate: int
    calls: int
    ok: bool
    result: SippResult
    cpu_s: float
    seconds: float
    handed_off: int | None = None
    """Datagrams our workers handed to another worker (``--workers N`` only)."""


@dataclass
class Row:
    name: str
    steps: list[Step] = field(default_factory=list)
    max_rate: int = 0
    cpu_ms_per_call: float | None = None
    cpu_ms_per_call_half: float | None = None
    """CPU per call in the latency step (half our maximum rate), which every proxy sustains."""
    cpu_spread: str = "-"
    """min-max of CPU ms/call at 1,000 calls/s over the repeats."""
    cpu_overloaded: bool = False
    """The CPU figure comes from a 1,000 calls/s step the proxy did not sustain."""
    p99_ms: float | None = None
    p50_ms: float | None = None


def run_step(runner: Runner, rate: int, duration: float, workdir: Path, *, trace_rtt: bool = False) -> Step:
    calls = max(1, int(rate * duration))
    uport, cport = free_port(), free_port()
    step_dir = Path(tempfile.mkdtemp(prefix=f"{runner.name}-{rate}-", dir=workdir))
    started = time.monotonic()
    try:
        with runner.running(step_dir) as (proxy, cpu), uas(step_dir, uport):
            cpu0 = cpu()
            result = run_calls(
                step_dir,
                f"127.0.0.1:{uport}",
                calls=calls,
                rate=rate,
                port=cport,
                proxy=proxy,
                timeout=duration * 3 + 30,
                trace_rtt=trace_rtt,
                recv_timeout_ms=5000,
            )
            cpu_used = cpu() - cpu0
    except ChildError as exc:  # a proxy or sipp that did not start: this step fails, the bench goes on
        print(f"  {runner.name:14s} {rate:5d}/s: could not run: {exc}", flush=True)
        return Step(rate, calls, False, SippResult(None, 0, 0, 0), 0.0, time.monotonic() - started)
    # sustained: every call completed, none failed, and at no less than 90 % of the asked rate (the run
    # exceeds calls/rate by the last calls' tail and the UAC's 0.5 s wait: 1 s is allowed for those)
    # the pass rule allows TAIL_S of the run for the last answers; the rate shown is over the whole run
    ok = (
        result.failed == 0
        and result.successful == calls
        and calls / max(result.elapsed - TAIL_S, 1e-3) >= MIN_RATE_FRACTION * rate
    )
    achieved = calls / max(result.elapsed, 1e-3)
    final = getattr(runner.last, "final_stats", None)
    handed = final().get("handed_off") if final is not None else None
    step = Step(rate, calls, ok, result, cpu_used, time.monotonic() - started, handed)
    verdict = "ok" if ok else "FAIL"
    print(
        f"  {runner.name:14s} {rate:5d}/s x {duration:g}s: {verdict:4s} successful={result.successful} "
        f"failed={result.failed} took={result.elapsed:.1f}s ({achieved:.0f}/s) cpu={cpu_used:.2f}s"
        + (f" handed_off={handed / calls:.2f}/call" if handed is not None else ""),
        flush=True,
    )
    return step


def sustained(runner: Runner, rate: int, duration: float, workdir: Path, row: Row, repeat: int) -> bool:
    """Whether ``rate`` passes in each of ``repeat`` fresh runs (stops at the first that fails)."""
    for _ in range(repeat):
        step = run_step(runner, rate, duration, workdir)
        row.steps.append(step)
        if not step.ok:
            return False
    return True


def find_max(
    runner: Runner, ladder: list[int], duration: float, workdir: Path, row: Row, repeat: int
) -> None:
    best = 0
    failed_at = None
    for rate in ladder:
        if not sustained(runner, rate, duration, workdir, row, repeat):
            failed_at = rate
            break
        best = rate
    if failed_at is not None and best:
        mid = (best + failed_at) // 2
        if mid > best and mid - best >= 100 and sustained(runner, mid, duration, workdir, row, repeat):
            best = mid  # one bisection step, bounded
    row.max_rate = best


def cpu_at(runner: Runner, rate: int, duration: float, workdir: Path, row: Row, repeat: int) -> None:
    steps = [s for s in row.steps if s.rate == rate]
    while len(steps) < repeat:
        steps.append(run_step(runner, rate, duration, workdir))
        row.steps.append(steps[-1])
    # per call offered (not per call completed: a failing call still cost its retransmissions)
    per_call = sorted(1000 * s.cpu_s / s.calls for s in steps)
    row.cpu_ms_per_call = statistics.median(per_call)
    row.cpu_spread = f"{per_call[0]:.2f}-{per_call[-1]:.2f}"
    row.cpu_overloaded = not all(s.ok for s in steps)


def latency_at(runner: Runner, rate: int, duration: float, workdir: Path, row: Row) -> None:
    step = run_step(runner, rate, duration, workdir, trace_rtt=True)
    row.steps.append(step)
    if step.ok and runner.make is not None:
        row.cpu_ms_per_call_half = 1000 * step.cpu_s / step.calls
    if step.result.setup_ms:
        row.p99_ms = step.result.percentile(99)
        row.p50_ms = step.result.percentile(50)


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[Row], half: int, duration: float) -> str:
    kams = {r.name.removeprefix("kamailio-tm"): r for r in rows if r.name.startswith("kamailio-tm")}
    lines = [
        f"| proxy | max calls/s ({duration:g} s, 0 failed) | ratio to kamailio-tm "
        f"| CPU ms/call at 1,000 calls/s (spread) | CPU ms/call at {half} calls/s | p50 / p99 setup ms at {half} calls/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        # a row of N workers is compared with Kamailio with N children ("x2" to "kamailio-tm x2")
        suffix = row.name[row.name.index(" ") :] if " " in row.name else ""
        kam = kams.get(suffix) or kams.get("")
        ratio = row.max_rate / kam.max_rate if kam and kam.max_rate and row.name != "direct" else None
        cpu = fmt(row.cpu_ms_per_call, ".2f") + (" (overloaded)" if row.cpu_overloaded else "")
        cpu += f" ({row.cpu_spread})" if row.cpu_ms_per_call is not None else ""
        lines.append(
            f"| {row.name} | {row.max_rate or 'below ladder'} | {fmt(ratio, '.2f')} | {cpu} "
            f"| {fmt(row.cpu_ms_per_call_half, '.2f')} | {fmt(row.p50_ms, '.0f')} / {fmt(row.p99_ms, '.0f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s steps and a short ladder (about 3 minutes)")
    parser.add_argument("--duration", type=float, help="seconds per step (default 10, quick 3)")
    parser.add_argument(
        "--only",
        help="comma-separated subset: p2psip,p2psip+uvloop,kamailio-tm,kamailio-sl,direct "
        "(with --workers N also 'p2psip xN', 'kamailio-tm xN')",
    )
    parser.add_argument("--repeat", type=int, default=2, help="fresh runs of every step (default 2)")
    parser.add_argument(
        "--compiled", action="store_true", help="p2psip rows run the compiled build (tools/build_compiled.py)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="also measure 'p2psip proxy --workers N' (row 'p2psip xN') against Kamailio tm with N "
        "children ('kamailio-tm xN')",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1 or not 1 <= args.workers <= 64:
        print("bench/proxy.py: --repeat must be at least 1 and --workers 1 to 64", file=sys.stderr)
        return 2
    for tool in ("sipp", "kamailio"):
        if shutil.which(tool) is None:
            print(
                f"bench/proxy.py: {tool} is not installed (apt-get install sip-tester kamailio)",
                file=sys.stderr,
            )
            return 2
    duration = args.duration or (3.0 if args.quick else 10.0)
    ladder = QUICK_LADDER if args.quick else FULL_LADDER

    runners = [_ours("asyncio")]
    try:
        import uvloop  # noqa: F401

        runners.append(_ours("uvloop"))
    except ImportError:
        print("(uvloop is not installed: pip install -e '.[fast]' to measure it)")
    if args.workers > 1:
        # both cores: our workers against Kamailio with as many children (the plain rows keep 4 children)
        runners += [_ours("asyncio", args.workers), _kamailio(True, args.workers, f" x{args.workers}")]
    runners += [_kamailio(True), _kamailio(False), Runner("direct", None, lambda _: "", lambda _: 0.0)]
    if args.only:
        wanted = set(args.only.split(","))
        runners = [r for r in runners if r.name in wanted]

    load = os.getloadavg()
    conditions = Conditions()
    print(
        f"bench/proxy.py {'--quick ' if args.quick else ''}on {platform.node()}: {os.cpu_count()} CPUs, "
        f"load average {load[0]:.1f} at start; step {duration:g} s; ladder {ladder}",
        flush=True,
    )
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        workdir = Path(tmp)
        for runner in runners:
            row = Row(runner.name)
            rows.append(row)
            find_max(runner, ladder, duration, workdir, row, args.repeat)
            if runner.make is not None:
                cpu_at(runner, 1000, duration, workdir, row, args.repeat)
        ours = next((r for r in rows if r.name == "p2psip"), rows[0])
        half = max(100, (ours.max_rate or 200) // 2)
        for runner, row in zip(runners, rows, strict=True):
            latency_at(runner, half, duration, workdir, row)
    end_load = os.getloadavg()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print()
    print(
        f"Proxy benchmark, {stamp}, {os.cpu_count()} CPUs, load average {load[0]:.1f} → {end_load[0]:.1f}, "
        f"sipp built-in-style scenarios with Record-Route over UDP, {duration:g} s per step, "
        f"{args.repeat} repeats; p2psip {'compiled build' if COMPILED else 'pure Python'}"
    )
    print(f"({conditions})")
    print()
    print(table(rows, half, duration))
    for row in rows:  # how much crossed between our workers, per call (of 6 datagrams in per call)
        handed = [s.handed_off / s.calls for s in row.steps if s.handed_off is not None and s.rate == 1000]
        if handed:
            print(f"{row.name}: {statistics.median(handed):.2f} hand-offs per call at 1,000 calls/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
