"""Memory: RSS per 10,000 live registrations and per 1,000 concurrent calls, ours vs Kamailio, same run
(issue 19, target 7).

    python3 bench/memory.py                         # 10,000 registrations, 1,000 ringing calls
    python3 bench/memory.py --registrations 2000 --calls 300 --profile    # smaller, with tracemalloc

Registrations: sipp REGISTERs a new AOR each (Expires 3600, so every binding stays live) at one p2psip peer
(an overlay of one: it stores every binding itself, as a registrar does; in a ring each peer holds its
share plus replicas) and at Kamailio's usrloc in memory (``db_mode 0``, bench/registrar.py's config).

Calls: sipp UAC -> proxy -> sipp UAS, Record-Route; the UAS sends 180 and holds the call ringing for
``--ring`` seconds before its 200, so every call's INVITE transactions (server and client side) are open
in the proxy at once: 1,000 concurrent calls. Ours: ``p2psip proxy`` (:func:`p2psip.run.serve_proxy`, what
the command runs). Kamailio: ``tm`` (bench/proxy.py's stateful config, 2 children) and the same with the
``dialog`` module tracking every dialog (``dlg_manage``).

What is measured: the proportional set size (PSS, /proc/PID/smaps_rollup) of the process and all its
children, anonymous and shared memory (``Pss_Anon + Pss_Shmem``): Kamailio's shared memory is counted once
however many workers map it, and the file-backed pages of programs and libraries, which come and go with
the machine's memory pressure, are left out; for our one process it is its anonymous RSS. Each measurement is after a warm-up (100 registrations or calls, not counted), as the
difference between the plateau and the baseline just before, scaled to 10,000 registrations or 1,000
calls. Registrations are read once the REGISTER transactions have ended (34 s after the last: an
unreliable transport keeps a non-INVITE server transaction 32 s, RFC 3261 Timer J; Kamailio's registrar
answers statelessly and keeps none), the note gives the PSS right after the burst. Ours depends on the
REGISTER rate too: the completed transactions Timer J held (rate x 32 s of them) leave memory that Python
keeps for reuse rather than giving back to the system, so compare figures only at the
same ``--register-rate`` (the note gives it): the same code took 4,534 bytes per registration at
150/s and 6,409 at 300/s (the "regression" seen on 2026-12-07 between 10:17 and 11:11 was this). For calls, "after" is the PSS once the calls have ended: what is not given back. ``--profile`` runs our processes under tracemalloc and prints where the memory of the plateau was
allocated (by line): what is avoidable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import shutil
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from harness import ROOT, missing_tool  # first: it puts this checkout on sys.path

# isort: split
from conditions import Conditions
from conftest import free_port
from interop.kamailio import Kamailio, stateful_config
from interop.procs import children_of
from interop.sipp import UAS_RR, run_calls, uac, uas
from registrar import kamailio_config, sipp_step

DOMAIN = "p2p.example"
WARMUP = 100
SETTLE_S = 34.0  # RFC 3261 Timer J (64 * T1 = 32 s): a server transaction's last state ends by then


def pss_kb(pid: int) -> int:
    """Anonymous and shared-memory PSS of ``pid`` and its descendants in kB: the memory the data takes
    (Kamailio's shared memory counted once however many workers map it), without the file-backed pages of
    the program and its libraries, which the kernel drops and reads back as other processes need memory
    (they made the plain PSS of a process drift by a megabyte or more on this shared machine)."""
    total = 0
    for one in [pid, *children_of(pid)]:
        try:
            for line in Path(f"/proc/{one}/smaps_rollup").read_text().splitlines():
                if line.startswith(("Pss_Anon:", "Pss_Shmem:")):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


# ----------------------------------------------------------------------------------- our processes
def _serve(conn: Connection, kind: str, workdir: str, profile: bool) -> None:
    """A child process: one peer (``kind`` "peer") or one stand-alone proxy ("proxy"), answering the
    parent's commands on ``conn``: "mark" (tracemalloc baseline), "top" (allocations since the mark, by
    line) and "stop"."""
    if profile:
        tracemalloc.start(1)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        baseline: list[tracemalloc.Snapshot] = []

        def command(what: str) -> None:
            if what == "stop":
                stop.set()
            elif what == "mark":
                if profile:
                    baseline[:] = [tracemalloc.take_snapshot()]
                conn.send("ok")
            elif what == "top":
                lines: list[str] = []
                if profile and baseline:
                    diff = tracemalloc.take_snapshot().compare_to(baseline[0], "lineno")
                    total = sum(stat.size_diff for stat in diff)
                    lines.append(f"{total / 1024:10.1f} kB in all: Python objects allocated since the mark, live")
                    for stat in diff[:25]:
                        frame = stat.traceback[0]
                        where = f"{Path(frame.filename).relative_to(ROOT) if frame.filename.startswith(str(ROOT)) else frame.filename}:{frame.lineno}"
                        lines.append(f"{stat.size_diff / 1024:10.1f} kB {stat.count_diff:8d} blocks  {where}")
                conn.send(lines)

        def reader() -> None:
            while True:
                try:
                    what = conn.recv()
                except EOFError:
                    what = "stop"
                loop.call_soon_threadsafe(command, what)
                if what == "stop":
                    return

        if kind == "peer":
            from overlay.localring import quick_node_config
            from p2psip.config import HostPort, ListenSpec, PeerConfig
            from p2psip.peer import Peer
            from p2psip.ratelimit import UNLIMITED

            config = PeerConfig(
                listen=[ListenSpec("udp", "127.0.0.1", 0)],
                overlay=HostPort("127.0.0.1", 0),
                data_dir=Path(workdir) / "peer",
                cache_ttl=0.0,
                new_aors_per_source=UNLIMITED,
                new_aors_total=UNLIMITED,
                overlay_limits={k: UNLIMITED for k in ("store", "lookup", "join", "other")},
                max_pending=100_000,
            )
            peer = await Peer.start(config, node_config=quick_node_config(interval=1.0, rpc_timeout=1.0))
            host, port = peer.sip_address()
            conn.send(("ready", f"{host}:{port}"))
            threading.Thread(target=reader, daemon=True).start()
            await stop.wait()
            await peer.close(leave=False)
        else:
            from p2psip.run import serve_proxy

            def ready(stack: object) -> None:
                address = stack.addresses()[0]  # type: ignore[attr-defined]
                conn.send(("ready", address.split(":", 1)[1]))
                threading.Thread(target=reader, daemon=True).start()

            await serve_proxy(["udp:127.0.0.1:0"], ready=ready, stop=stop)

    asyncio.run(run())


class Ours:
    """One of our processes (peer or proxy) in a spawned child, driven over a pipe."""

    def __init__(self, kind: str, workdir: Path, profile: bool) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child_end = context.Pipe()
        self.proc = context.Process(target=_serve, args=(child_end, kind, str(workdir), profile), daemon=True)

    def __enter__(self) -> Ours:
        self.proc.start()
        if not self.conn.poll(120):
            raise RuntimeError("our process did not start")
        _, self.address = self.conn.recv()
        return self

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def ask(self, what: str) -> object:
        self.conn.send(what)
        if not self.conn.poll(120):
            raise RuntimeError(f"no answer to {what!r}")
        return self.conn.recv()

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.conn.send("stop")
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


# ------------------------------------------------------------------------------------------ results
@dataclass
class Figure:
    system: str
    what: str  # "registrations" or "calls"
    count: int  # how many were live at the plateau
    baseline_kb: int
    plateau_kb: int
    after_kb: int
    scale: int  # per how many (10,000 registrations, 1,000 calls)
    note: str = ""

    @property
    def per_scale_mb(self) -> float:
        return (self.plateau_kb - self.baseline_kb) / max(1, self.count) * self.scale / 1024

    @property
    def per_item_bytes(self) -> float:
        return 1024 * (self.plateau_kb - self.baseline_kb) / max(1, self.count)


Hooks = tuple[Callable[[], object], Callable[[], object]]  # at the baseline, at the plateau
NO_HOOKS: Hooks = (lambda: None, lambda: None)


def _registrations(
    system: str, workdir: Path, target: str, pid: Callable[[], int], count: int, rate: int, hooks: Hooks
) -> Figure:
    """Warm up, take the baseline, register ``count`` new AORs, take the plateau once their transactions
    have ended."""

    def register(calls: int) -> int:
        # bench/registrar.py's step (a fresh AOR prefix each): calls = int(rate * duration)
        result, _ = sipp_step(workdir, target, rate, (calls + 0.5) / rate, False)
        return result.successful

    register(WARMUP)
    time.sleep(SETTLE_S)  # the warm-up's transactions end too
    baseline = pss_kb(pid())
    hooks[0]()
    live = register(count)
    time.sleep(1.0)
    burst = pss_kb(pid())  # with the last 32 s of REGISTER transactions still held (Timer J)
    time.sleep(SETTLE_S)
    settled = pss_kb(pid())  # the bindings alone
    hooks[1]()
    held = " (our transactions held 32 s)" if system.startswith("p2psip") else ""
    note = f"at {rate}/s; {burst / 1024:.1f} MB right after the REGISTERs{held}"
    if live != count:
        note += f"; {count - live} of {count} REGISTERs failed"
    return Figure(system, "registrations", live, baseline, settled, settled, 10_000, note)


def _ringing_uas_scenario(workdir: Path, ring_s: float) -> Path:
    text = UAS_RR.read_text().replace(
        "  <send retrans=\"500\">\n    <![CDATA[\n\n      SIP/2.0 200 OK",
        f"  <pause milliseconds=\"{int(ring_s * 1000)}\"/>\n\n"
        "  <send retrans=\"500\">\n    <![CDATA[\n\n      SIP/2.0 200 OK",
        1,
    )
    if "<pause" not in text:
        raise RuntimeError("could not add the ringing pause to the UAS scenario")
    path = workdir / "uas_ringing.xml"
    path.write_text(text)
    return path


def _calls(
    system: str, workdir: Path, proxy: str, pid: Callable[[], int], count: int, ring_s: float, hooks: Hooks
) -> Figure:
    """Warm up (quick calls), baseline, then ``count`` calls at a rate that starts them all within a third
    of the ring time; the plateau is read once all are ringing, "after" once they have ended."""
    rate = max(50, int(count / (ring_s / 3)))
    quick = workdir / "quick"
    quick.mkdir(parents=True, exist_ok=True)
    uport = free_port()
    with uas(quick, uport):
        run_calls(quick, f"127.0.0.1:{uport}", calls=WARMUP, rate=100, port=free_port(), proxy=proxy)
    time.sleep(1.0)
    baseline = pss_kb(pid())
    hooks[0]()
    ringing = _ringing_uas_scenario(workdir, ring_s)
    uport = free_port()
    with uas(workdir, uport, scenario=ringing, name="uas-ringing"):
        started = time.monotonic()
        client = uac(
            workdir,
            f"127.0.0.1:{uport}",
            calls=count,
            rate=rate,
            port=free_port(),
            proxy=proxy,
            recv_timeout_ms=int((ring_s + 30) * 1000),
            timeout_s=int(ring_s + count / rate + 60),
            name="uac-ringing",
        )
        with client:
            # every call has been sent after count/rate s; read the plateau half-way to the first 200
            time.sleep(max(0.0, count / rate + (ring_s - count / rate) / 2 - (time.monotonic() - started)))
            plateau = pss_kb(pid())
            hooks[1]()
            result = client.wait(ring_s + count / rate + 60)
    time.sleep(2.0)
    after = pss_kb(pid())
    note = "" if result.successful == count else f"{result.successful} of {count} calls completed"
    return Figure(system, "calls", count, baseline, plateau, after, 1000, note)


def dialog_config(host: str, port: int, children: int) -> str:
    """bench/proxy.py's Kamailio tm config with the dialog module tracking every INVITE dialog."""
    config = stateful_config(host, port, children=children, transports=("udp",))
    config = config.replace('loadmodule "tm.so"', 'loadmodule "tm.so"\nloadmodule "dialog.so"', 1)
    config = config.replace("        record_route();", "        record_route();\n        dlg_manage();", 1)
    if "dlg_manage" not in config:
        raise RuntimeError("could not add dlg_manage() to the Kamailio config")
    return config


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--registrations", type=int, default=10_000, help="live registrations (10,000)")
    parser.add_argument("--register-rate", type=int, default=300, help="REGISTERs per second (300)")
    parser.add_argument("--calls", type=int, default=1000, help="concurrent ringing calls (1,000)")
    parser.add_argument("--ring", type=float, default=20.0, help="seconds each call rings (20)")
    parser.add_argument("--children", type=int, default=2, help="Kamailio worker processes (2)")
    parser.add_argument("--profile", action="store_true", help="tracemalloc in our processes: where it went")
    parser.add_argument("--only", choices=("registrations", "calls"), help="one part only")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if min(args.registrations, args.register_rate, args.calls, args.children) < 1 or args.ring < 3:
        print("bench/memory.py: counts and rates >= 1, --ring >= 3", file=sys.stderr)
        return 2
    if missing_tool("memory"):
        return 2
    conditions = Conditions()
    root = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    figures: list[Figure] = []
    profiles: dict[str, object] = {}
    try:
        if args.only in (None, "registrations"):
            port = free_port()
            kam = Kamailio(
                kamailio_config("127.0.0.1", port, False, args.children),
                root / "kam-reg",
                port,
                shm_mb=1024,
                transports=("udp",),
            )
            with kam:
                figures.append(
                    _registrations(
                        "Kamailio usrloc",
                        root / "kam-reg",
                        f"127.0.0.1:{port}",
                        lambda: kam.pid,
                        args.registrations,
                        max(args.register_rate, 1000),
                        NO_HOOKS,
                    )
                )
            print(f"  {figures[-1]}", flush=True)
            (root / "ours-reg").mkdir()
            with Ours("peer", root / "ours-reg", args.profile) as ours:
                hooks: Hooks = (lambda: ours.ask("mark"), lambda: profiles.update(registrations=ours.ask("top")))
                figures.append(
                    _registrations(
                        "p2psip peer",
                        root / "ours-reg",
                        ours.address,
                        lambda: ours.pid,
                        args.registrations,
                        args.register_rate,
                        hooks,
                    )
                )
            print(f"  {figures[-1]}", flush=True)
        if args.only in (None, "calls"):
            for label, build in (("Kamailio tm", None), ("Kamailio tm+dialog", dialog_config)):
                port = free_port()
                config = (
                    build("127.0.0.1", port, args.children)
                    if build is not None
                    else stateful_config("127.0.0.1", port, children=args.children, transports=("udp",))
                )
                wd = root / label.replace(" ", "-").replace("+", "-")
                kam = Kamailio(config, wd, port, shm_mb=1024, transports=("udp",))
                kam.check()
                with kam:
                    figures.append(
                        _calls(label, wd, f"127.0.0.1:{port}", lambda k=kam: k.pid, args.calls, args.ring, NO_HOOKS)
                    )
                print(f"  {figures[-1]}", flush=True)
            (root / "ours-calls").mkdir()
            with Ours("proxy", root / "ours-calls", args.profile) as ours:
                hooks = (lambda: ours.ask("mark"), lambda: profiles.update(calls=ours.ask("top")))
                figures.append(
                    _calls(
                        "p2psip proxy", root / "ours-calls", ours.address, lambda: ours.pid, args.calls, args.ring, hooks
                    )
                )
            print(f"  {figures[-1]}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print("| what | system | live at the plateau | PSS before | PSS at the plateau | MB per 10,000 registrations / 1,000 calls | bytes each | ratio to Kamailio | PSS after | note |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for fig in figures:
        reference = next(
            (f for f in figures if f.what == fig.what and f.system in ("Kamailio usrloc", "Kamailio tm")), None
        )
        ratio = f"{fig.per_scale_mb / reference.per_scale_mb:.1f}x" if reference and reference.per_scale_mb > 0 else "-"
        print(
            f"| {fig.what} | {fig.system} | {fig.count:,} | {fig.baseline_kb / 1024:.1f} MB | {fig.plateau_kb / 1024:.1f} MB"
            f" | {fig.per_scale_mb:.2f} MB | {fig.per_item_bytes:,.0f} | {ratio} | {fig.after_kb / 1024:.1f} MB | {fig.note} |"
        )
    if args.profile:
        for what, lines in profiles.items():
            print(f"\nOur {what}: tracemalloc, allocations live at the plateau since the baseline, by line:\n")
            print("\n".join(f"    {line}" for line in lines) or "    (nothing)")  # type: ignore[attr-defined]
    print(
        f"\n({conditions}; Kamailio {args.children} children; ours {args.register_rate} REGISTERs/s, Kamailio"
        f" {max(args.register_rate, 1000)}/s; ring {args.ring:g} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
