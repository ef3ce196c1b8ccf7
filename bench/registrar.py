"""Registrations per second at 0 failures: sipp REGISTERs (a new AOR each) at one peer of a 5-peer overlay
vs Kamailio usrloc (in memory), without and with digest, same run (issue 19, target 3).

    python3 bench/registrar.py                      # 5 s steps, 2 repeats, both variants
    python3 bench/registrar.py --duration 3 --repeat 1 --only plain
    python3 bench/registrar.py --only plain --processes 2   # our peers in 2 processes, as Kamailio's 2

Each system climbs a bounded rate ladder; a rate passes when every REGISTER of every one of ``--repeat``
runs got its 200 and sipp kept at least 90 % of the asked rate (calls over the run's time less 1 s of
tail): a "0 failures" step that ran slower than asked is not a pass. Every run registers AORs never seen
before (a fresh prefix per run): each REGISTER is a signed write on 3 replicas here (no DHT read: the
peer holds the new AOR's only user key, ``Peer._own_record``), a usrloc insert there. With digest, every
AOR has an account (password "secret", digest user "bench") and each REGISTER is challenged once (401,
then the REGISTER with credentials); Kamailio checks the same password with ``pv_www_authenticate``.

Ours: 5 peers in this one process (one event loop, one core), or with ``--processes N`` in N worker
processes, peer i in process i mod N (bench/peer.py's workers: on separate machines every peer has a CPU
of its own; Kamailio runs ``--children`` workers); sipp sends to the first peer. The overlay rate limits
and the new-AOR bounds are lifted for the load (they are configurable: a deployment keeps them) and
``max_pending`` is raised so the bench measures throughput, not the shedding. Kamailio: ``children``
workers (default 2, the bench/peer.py registrar). Reported: the highest passing rate, the ratio to
Kamailio's, CPU ms per registration at that rate (ours: the process(es) running the peers; Kamailio: its
processes), and our overlay messages per registration (every peer's udp_out + tcp_out over the step, less
the same peers' idle maintenance traffic over as long). The footer gives date, load, CPU model and steal.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import itertools
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import COMPILED, missing_tool, own_cpu  # first: it puts this checkout on sys.path

# isort: split
from conditions import Conditions
from conftest import free_port
from interop.kamailio import Kamailio, usrloc_header
from interop.sipp import SippResult, run_calls
from peer import PeerSet, Workers, cpu_seconds, ring_of, worker

from overlay.identity import NODE_KEY_FILE, KeyPair
from overlay.localring import quick_node_config, wait_until_consistent
from p2psip.auth import DigestServer
from p2psip.config import HostPort, ListenSpec, PeerConfig, UserAccount
from p2psip.peer import Peer
from p2psip.ratelimit import UNLIMITED

DOMAIN = "p2p.example"
LADDER = [
    50,
    100,
    150,
    200,
    250,
    350,
    500,
    750,
    1000,
    1500,
    2000,
    3000,
    4000,
    6000,
    8000,
    10000,
    12000,
    16000,
    20000,
]
MIN_RATE_FRACTION = 0.9
TAIL_S = 1.0
PASSWORD = "secret"
DIGEST_USER = "bench"
_prefixes = itertools.count()

_HEAD = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="REGISTER a new AOR">
"""
_REGISTER = """  <send retrans="500">
    <![CDATA[
      REGISTER sip:{domain} SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      Max-Forwards: 70
      From: <sip:[prefix][call_number]@{domain}>;tag=[call_number]
      To: <sip:[prefix][call_number]@{domain}>
      Call-ID: [call_id]
      CSeq: {cseq} REGISTER
      Contact: <sip:[prefix][call_number]@[local_ip]:[local_port]>
      Expires: 600
{auth}      Content-Length: 0

    ]]>
  </send>
"""


def scenario(digest: bool) -> str:
    """The sipp UAC scenario: one REGISTER -> 200, or REGISTER -> 401, REGISTER with credentials -> 200."""
    if not digest:
        body = _REGISTER.format(domain=DOMAIN, cseq=1, auth="") + '  <recv response="200"/>\n'
    else:
        body = (
            _REGISTER.format(domain=DOMAIN, cseq=1, auth="")
            + '  <recv response="401" auth="true"/>\n'
            + _REGISTER.format(domain=DOMAIN, cseq=2, auth="      [authentication]\n")
            + '  <recv response="200"/>\n'
        )
    return _HEAD + body + "</scenario>\n"


def kamailio_config(host: str, port: int, digest: bool, children: int) -> str:
    auth = (
        f'if (!pv_www_authenticate("$td", "{PASSWORD}", "0")) {{ www_challenge("$td", "0"); exit; }}'
        if digest
        else ""
    )
    return (
        usrloc_header(host, port, domain=DOMAIN, children=children, modules=("auth",))
        + f"""
request_route {{
    if (!mf_process_maxfwd_header("10")) {{ sl_send_reply("483", "Too Many Hops"); exit; }}
    if (is_method("REGISTER")) {{
        {auth}
        if (!save("location")) {{ sl_reply_error(); }}
        exit;
    }}
    sl_send_reply("404", "Not Found");
}}
"""
    )


@dataclass
class Step:
    rate: int
    ok: bool
    result: SippResult
    cpu_s: float
    overlay_msgs: float | None = None


@dataclass
class Row:
    system: str
    steps: list[Step] = field(default_factory=list)
    max_rate: int = 0

    def at_max(self) -> list[Step]:
        return [s for s in self.steps if s.rate == self.max_rate and s.ok]


class EveryAorHasAnAccount(dict[str, UserAccount]):
    """The accounts table of the digest runs: every AOR has one (password ``PASSWORD``, digest user
    ``DIGEST_USER``), without building a table of every AOR the ladder registers."""

    def get(self, aor: str, default: object = None) -> UserAccount:  # type: ignore[override]
        return UserAccount(aor, PASSWORD, DIGEST_USER)

    def values(self) -> list[UserAccount]:  # type: ignore[override]
        return [UserAccount(f"sip:{DIGEST_USER}@{DOMAIN}", PASSWORD, DIGEST_USER)]


async def start_peer(
    index: int,
    join: tuple[str, int] | None,
    data_dir: Path,
    digest: bool,
    offline_messages: bool,
    full_repair: bool,
    seed: int | None,
) -> Peer:
    """One of our bench peers: the overlay rate limits and the new-AOR bounds lifted for the load (they are
    configurable: a deployment keeps them), ``max_pending`` raised (the bench measures throughput, not the
    shedding); with ``digest`` every AOR has an account at the first peer."""
    users: dict[str, UserAccount] = EveryAorHasAnAccount() if digest and index == 0 else {}
    config = PeerConfig(
        listen=[ListenSpec("udp", "127.0.0.1", 0)],
        overlay=HostPort("127.0.0.1", 0),
        join=HostPort(*join) if join else None,
        data_dir=data_dir,
        cache_ttl=0.0,
        new_aors_per_source=UNLIMITED,
        new_aors_total=UNLIMITED,
        overlay_limits={kind: UNLIMITED for kind in ("store", "lookup", "join", "other")},
        max_pending=100_000,
        users=users,
        offline_messages=offline_messages,
    )
    if seed is not None:
        # Which peer is primary or replica of each AOR decides the datagrams a registration costs
        # (7 to 10 here): a fixed layout makes runs comparable
        raw = hashlib.sha256(f"bench-node-{seed}-{index}".encode()).digest()
        data_dir.mkdir(parents=True, exist_ok=True)
        KeyPair.from_private_bytes(raw).save(data_dir / NODE_KEY_FILE)
    node_config = quick_node_config(interval=1.0, rpc_timeout=1.0)
    if full_repair:
        node_config = dataclasses.replace(node_config, digest_repair=False)
    peer = await Peer.start(config, node_config=node_config)
    if digest:
        # sipp 3.6 computes MD5 only and answers the first challenge: offer MD5 alone, as
        # Kamailio's www_challenge does (the peer's default offers SHA-256 first, then MD5)
        realm = config.realm
        peer._digest[realm] = DigestServer(realm, peer._password_lookup(realm), algorithms=("MD5",))
    return peer


def messages_out(peers: list[Peer]) -> int:
    """The overlay datagrams (and TCP frames) the peers sent so far."""
    return sum(int(p.node.stats().get("udp_out", 0)) + int(p.node.stats().get("tcp_out", 0)) for p in peers)


class RegistrarPeers(PeerSet):
    """The peers of one worker process (``--processes``): bench/peer.py's command loop, with this bench's
    peers (:func:`start_peer`) and their overlay messages."""

    async def do_start_loaded(
        self, index: int, join: list[Any] | None, data_dir: str, digest: bool, offline_messages: bool,
        full_repair: bool, seed: int | None,
    ) -> Any:  # fmt: skip
        peer = await start_peer(
            index, (join[0], join[1]) if join else None, Path(data_dir), digest, offline_messages,
            full_repair, seed,
        )  # fmt: skip
        self.peers[index] = peer
        return [list(peer.sip_address()), list(peer.overlay_address)]

    async def do_messages(self) -> int:
        return messages_out(list(self.peers.values()))


class Ours:
    """``size`` peers: in this process, one event loop (``processes`` 1), or spread over ``processes``
    worker processes, peer i in process i mod ``processes`` (bench/peer.py's layout); sipp sends to the
    first."""

    def __init__(
        self,
        workdir: Path,
        digest: bool,
        size: int,
        offline_messages: bool = True,
        *,
        full_repair: bool = False,
        seed: int | None = None,
        processes: int = 1,
    ) -> None:
        self.workdir, self.digest, self.size = workdir, digest, size
        self.offline_messages = offline_messages
        self.full_repair = full_repair  # the overlay's anti-entropy pushes whole ranges (no repair digest)
        self.seed = seed  # node keys derived from it: the same ring layout every run (A/B pairs)
        self.peers: list[Peer] = []  # the peers of this process (none with worker processes)
        self.workers = Workers(min(processes, size), workdir / "workers", __file__) if processes > 1 else None
        self.entry: tuple[str, int] = ("", 0)  # the first peer's SIP address, where sipp sends

    @property
    def description(self) -> str:
        if self.workers is None:
            return "one process"
        return f"{self.workers.count} processes"

    async def start(self) -> None:
        join: tuple[str, int] | None = None
        if self.workers is not None:
            await self.workers.start()
        for i in range(self.size):
            args = (i, join, self.workdir / f"peer{i}", self.digest, self.offline_messages, self.full_repair)
            if self.workers is None:
                peer = await start_peer(*args, self.seed)
                self.peers.append(peer)
                sip, overlay = peer.sip_address(), peer.overlay_address
            else:
                sip, overlay = await self.workers.on(
                    i, "start_loaded", index=i, join=list(join) if join else None, data_dir=str(args[2]),
                    digest=self.digest, offline_messages=self.offline_messages, full_repair=self.full_repair,
                    seed=self.seed,
                )  # fmt: skip
            if i == 0:
                self.entry, join = (sip[0], sip[1]), (overlay[0], overlay[1])
        if self.workers is None:
            await wait_until_consistent([p.node for p in self.peers], timeout=120)
        else:
            await ring_of(self.workers, self.size)

    def messages_out(self) -> int:
        """The overlay messages the peers of this process sent so far (bench/register_cpu.py's layout)."""
        return messages_out(self.peers)

    async def messages(self) -> int:
        """The overlay messages all the peers sent so far."""
        if self.workers is None:
            return messages_out(self.peers)
        return int(sum(await self.workers.each("messages")))

    async def cpu(self) -> float:
        """CPU seconds so far of the process(es) running the peers."""
        if self.workers is None:
            return own_cpu()
        return await cpu_seconds(self.workers)

    async def close(self) -> None:
        for peer in self.peers:
            await peer.close(leave=False)
        if self.workers is not None:
            await self.workers.close()


def sipp_step(workdir: Path, target: str, rate: int, duration: float, digest: bool) -> tuple[SippResult, int]:
    prefix = next(_prefixes)
    calls = max(1, int(rate * duration))
    scen = workdir / f"register-{'digest' if digest else 'plain'}.xml"
    scen.write_text(scenario(digest))
    extra = ["-key", "prefix", f"r{prefix}x"]
    if digest:
        extra += ["-au", DIGEST_USER, "-ap", PASSWORD]
    result = run_calls(
        workdir,
        target,
        calls=calls,
        rate=rate,
        port=free_port(),
        scenario=scen,
        name=f"uac-{prefix}",
        timeout=duration * 3 + 30,
        recv_timeout_ms=5000,
        extra=extra,
    )
    return result, calls


def verdict(result: SippResult, calls: int, rate: int) -> tuple[bool, float]:
    # the pass rule allows TAIL_S of the run for the last answers; the rate shown is over the whole run
    ok = (
        result.failed == 0
        and result.successful == calls
        and calls / max(result.elapsed - TAIL_S, 1e-3) >= MIN_RATE_FRACTION * rate
    )
    achieved = calls / max(result.elapsed, 1e-3)
    return ok, achieved


def report(
    system: str, rate: int, duration: float, ok: bool, result: SippResult, achieved: float, cpu: float
) -> None:
    print(
        f"  {system:28s} {rate:6d}/s x {duration:g}s: {'ok' if ok else 'FAIL':4s} "
        f"successful={result.successful} failed={result.failed} took={result.elapsed:.1f}s ({achieved:.0f}/s) "
        f"cpu={cpu:.2f}s",
        flush=True,
    )


async def ladder_ours(
    row: Row, ours: Ours, workdir: Path, duration: float, repeat: int, ladder: list[int]
) -> None:
    host, port = ours.entry
    # idle maintenance traffic, to subtract from each step's overlay messages
    m0, t0 = await ours.messages(), time.monotonic()
    await asyncio.sleep(2.0)
    idle_rate = (await ours.messages() - m0) / (time.monotonic() - t0)
    for rate in ladder:
        passed = True
        for _ in range(repeat):
            m0, c0, t0 = await ours.messages(), await ours.cpu(), time.monotonic()
            result, calls = await asyncio.to_thread(
                sipp_step, workdir, f"{host}:{port}", rate, duration, ours.digest
            )
            cpu = await ours.cpu() - c0
            msgs = await ours.messages() - m0 - idle_rate * (time.monotonic() - t0)
            ok, achieved = verdict(result, calls, rate)
            report(row.system, rate, duration, ok, result, achieved, cpu)
            row.steps.append(Step(rate, ok, result, cpu, msgs / max(result.successful, 1)))
            if not ok:
                passed = False
                break
        if not passed:
            break
        row.max_rate = rate


def ladder_kamailio(
    row: Row, workdir: Path, digest: bool, duration: float, repeat: int, children: int, ladder: list[int]
) -> None:
    port = free_port()
    kam = Kamailio(
        kamailio_config("127.0.0.1", port, digest, children), workdir, port, shm_mb=1024, transports=("udp",)
    )
    kam.check()
    with kam:
        for rate in ladder:
            passed = True
            for _ in range(repeat):
                c0 = kam.cpu_seconds()
                result, calls = sipp_step(workdir, f"127.0.0.1:{port}", rate, duration, digest)
                cpu = kam.cpu_seconds() - c0
                ok, achieved = verdict(result, calls, rate)
                report(row.system, rate, duration, ok, result, achieved, cpu)
                row.steps.append(Step(rate, ok, result, cpu))
                if not ok:
                    passed = False
                    break
            if not passed:
                break
            row.max_rate = rate


def fmt_range(values: list[float], spec: str) -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return format(lo, spec) if lo == hi else f"{format(lo, spec)}-{format(hi, spec)}"


def main() -> int:
    if sys.argv[1:2] == ["--worker"]:
        return asyncio.run(worker(RegistrarPeers))
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per step (default 5)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per rate, all must pass (default 2)")
    parser.add_argument("--size", type=int, default=5, help="peers in our overlay (default 5)")
    parser.add_argument("--children", type=int, default=2, help="Kamailio worker processes (default 2)")
    parser.add_argument(
        "--processes", type=int, default=1,
        help="run our peers in N worker processes (peer i in process i mod N; default 1: all in this one)",
    )  # fmt: skip
    parser.add_argument("--only", choices=("plain", "digest"), help="one variant only")
    parser.add_argument("--no-kamailio", action="store_true", help="our rows only (no ratio)")
    parser.add_argument(
        "--offline-messages",
        choices=("on", "off"),
        default="on",
        help="our peers' offline-message inboxes (on by default: each new AOR also publishes its inbox key)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--compiled", action="store_true", help="our peers run the compiled build (tools/build_compiled.py)"
    )
    args = parser.parse_args()
    if args.duration <= 0 or min(args.repeat, args.size, args.children, args.processes) < 1:
        print(
            "bench/registrar.py: --duration > 0, --repeat, --size, --children and --processes >= 1",
            file=sys.stderr,
        )
        return 2
    if missing_tool("registrar"):
        return 2
    conditions = Conditions()
    root = Path(tempfile.mkdtemp(prefix="bench-registrar-"))
    variants = [v for v in (False, True) if args.only is None or args.only == ("digest" if v else "plain")]
    rows: list[tuple[Row, Row]] = []
    try:
        for digest in variants:
            what = "digest" if digest else "no auth"
            inbox = "" if args.offline_messages == "on" else ", offline messages off"
            layout = "" if args.processes == 1 else f" in {min(args.processes, args.size)} processes"
            ours_row = Row(f"p2psip {args.size} peers{layout}, {what}{inbox}")
            kam_row = Row(f"Kamailio usrloc, {what}")
            wd = root / ("digest" if digest else "plain")
            wd.mkdir()
            if not args.no_kamailio:
                ladder_kamailio(
                    kam_row, wd / "kamailio", digest, args.duration, args.repeat, args.children, LADDER
                )
            ours = Ours(
                wd / "ours", digest, args.size, args.offline_messages == "on", processes=args.processes
            )
            ladder = [r for r in LADDER if args.no_kamailio or r <= max(kam_row.max_rate, LADDER[0])]

            async def run_ours(
                ours: Ours = ours, row: Row = ours_row, ladder: list[int] = ladder, wd: Path = wd
            ) -> None:
                await ours.start()
                try:
                    await ladder_ours(row, ours, wd, args.duration, args.repeat, ladder)
                finally:
                    await ours.close()

            asyncio.run(run_ours())
            rows.append((ours_row, kam_row))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    header = "| system | max REGISTER/s (0 failed, every repeat) | ratio to Kamailio | CPU ms/registration at max | overlay messages/registration |"
    print()
    print(header)
    print("|---|---:|---:|---:|---:|")
    for ours_row, kam_row in rows:
        for row in (ours_row, kam_row) if kam_row.steps else (ours_row,):
            at = row.at_max()
            calls = [s.result.successful for s in at]
            cpu = [1000 * s.cpu_s / c for s, c in zip(at, calls, strict=True) if c]
            msgs = [s.overlay_msgs for s in at if s.overlay_msgs is not None]
            ratio = f"{row.max_rate / kam_row.max_rate:.2f}x" if kam_row.max_rate else "-"
            print(
                f"| {row.system} | {row.max_rate or 'below ladder'} | {ratio} | {fmt_range(cpu, '.3f')} | {fmt_range(msgs, '.1f')} |"
            )
    print(
        f"\n({conditions}; {args.duration:g} s steps, {args.repeat} repeats; "
        f"p2psip {'compiled build' if COMPILED else 'pure Python'}; target: ours >= 0.25x Kamailio)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
