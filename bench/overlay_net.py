"""Overlay on loopback: put/get latency and success of p2psip vs kademlia (bmuller) vs OpenDHT vs p2psip's
directory on OpenDHT (``--dht opendht``: signed, enrolled entries, reader-side checks), same run.

    python bench/overlay_net.py                 # N = 20, 50, 100; 2 rounds of 200 puts + 200 gets each
    python bench/overlay_net.py --sizes 20 --ops 50 --rounds 1

For each N, each system gets N nodes on 127.0.0.1 in this process, the same settling rule (until its
routing state has converged: p2psip every first successor true, kademlia and OpenDHT every node knowing at
least min(N - 1, k) others with the totals unchanged for ``STABLE_S``; bounded by ``SETTLE_TIMEOUT_S``; the
time is the table's setup column), then ``ops`` puts of
distinct names from random nodes, then one get per name from another random node (sequential, so each
latency is one operation alone). Success: the put reported success and the get returned the value.
Every (system, N) run is a fresh process and starts with 10 unmeasured put+get pairs; rounds rotate the
order of systems and their samples are pooled.
kademlia runs with a small k (``--kad-k``, default 4) so its lookups are really multi-hop; OpenDHT
(C++, ``pip install opendht``) runs its own threads. Everything is loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conditions import Conditions

from overlay.node import Node, NodeConfig

HOST = "127.0.0.1"
SYSTEMS = ("p2psip", "kademlia", "opendht", "p2psip-on-opendht")
WARMUP = 10  # unmeasured put+get pairs per run, the same for every system
SETTLE_TIMEOUT_S = 120.0  # settling is bounded for every system alike
STABLE_S = 1.0  # a routing state unchanged this long (and full enough) counts as settled


async def settle_counts(counts: Callable[[], list[int]], floor: int) -> bool:
    """Wait (bounded) until every node's routing table holds at least ``floor`` others and the tables
    stopped changing for ``STABLE_S``: the peers' equivalent of our "every successor is true" (they have
    no ring to check). Whether it settled before ``SETTLE_TIMEOUT_S``."""
    deadline = time.perf_counter() + SETTLE_TIMEOUT_S
    last: list[int] = []
    since = time.perf_counter()
    while time.perf_counter() < deadline:
        now = counts()
        if now != last:
            last, since = now, time.perf_counter()
        elif min(now, default=0) >= floor and time.perf_counter() - since >= STABLE_S:
            return True
        await asyncio.sleep(0.2)
    return False


@dataclass
class Result:
    system: str
    n: int
    put_ms: list[float]
    get_ms: list[float]
    put_ok: int
    get_ok: int
    ops: int
    setup_s: float
    note: str = ""
    counters: dict[str, int] = field(default_factory=dict)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(
    res: Result,
    ops: int,
    put: Callable[[str], Awaitable[bool]],
    get: Callable[[str], Awaitable[bool]],
) -> list[str]:
    """Time a put of each of ``ops`` distinct names, then a get of each (sequential, so each latency is one
    operation alone): the one loop every system is measured with. An operation that raises counts as failed.
    Returns the names."""
    names = [f"sip:user{i}@bench.example" for i in range(ops)]
    for name in names:
        t = time.perf_counter()
        with contextlib.suppress(Exception):
            if await put(name):
                res.put_ok += 1
        res.put_ms.append((time.perf_counter() - t) * 1000)
    for name in names:
        t = time.perf_counter()
        with contextlib.suppress(Exception):
            if await get(name):
                res.get_ok += 1
        res.get_ms.append((time.perf_counter() - t) * 1000)
    return names


async def bench_p2psip(n: int, ops: int, rng: random.Random) -> Result:
    # NodeConfig's defaults (stabilize 1 s, fingers and predecessor checks 2 s, RPC timeout 1 s), with
    # the anti-entropy push moved out of the measured window
    cfg = NodeConfig(op_timeout=10.0, repair_interval=300.0)
    t0 = time.perf_counter()
    first = await Node.start(bind=(HOST, 0), join=None, overlay_name="bench", config=cfg)
    nodes = [first]
    while len(nodes) < n:
        batch = min(10, n - len(nodes))
        nodes += await asyncio.gather(
            *(
                Node.start(bind=(HOST, 0), join=rng.choice(nodes).endpoint, overlay_name="bench", config=cfg)
                for _ in range(batch)
            )
        )
    # settle: wait (bounded) until every node's first successor is the true one
    ids = sorted(x.node_id for x in nodes)
    succ_of = {ids[i]: ids[(i + 1) % len(ids)] for i in range(len(ids))}
    deadline = time.perf_counter() + 120
    while time.perf_counter() < deadline:
        if all(x.core and x.core.successors and x.core.successors[0].id == succ_of[x.node_id] for x in nodes):
            break
        await asyncio.sleep(0.2)
    setup = time.perf_counter() - t0
    res = Result("p2psip", n, [], [], 0, 0, ops, setup)
    for i in range(WARMUP):  # first operations warm caches and code paths; not measured
        with contextlib.suppress(Exception):
            await rng.choice(nodes).put(f"warmup{i}", b"w")
            await rng.choice(nodes).get(f"warmup{i}")

    async def put(name: str) -> bool:
        await rng.choice(nodes).put(name, name.encode())
        return True

    async def get(name: str) -> bool:
        return [e.value for e in await rng.choice(nodes).get(name)] == [name.encode()]

    names = await measure(res, ops, put, get)
    hops = []
    for name in names[:50]:
        from overlay.ids import key_for

        _, h = await rng.choice(nodes).lookup(key_for(name))
        hops.append(h)
    res.note = f"mean lookup hops {statistics.mean(hops):.2f}"
    totals: dict[str, int] = {}
    for x in nodes:
        st = x.stats()
        for k, v in [*st.items(), *(("chord." + ck, cv) for ck, cv in st.get("chord", {}).items())]:
            if isinstance(v, int) and any(
                w in k for w in ("retrans", "timeouts", "not_responsible", "declared_dead")
            ):
                totals[k] = totals.get(k, 0) + v
    res.counters = totals
    await asyncio.gather(*(x.close() for x in nodes))
    return res


async def bench_kademlia(n: int, ops: int, rng: random.Random, k: int) -> Result:
    from kademlia.network import Server

    logging.getLogger("kademlia").setLevel(logging.CRITICAL)
    logging.getLogger("rpcudp").setLevel(logging.CRITICAL)
    t0 = time.perf_counter()
    servers: list[Server] = []
    ports: list[int] = []
    for i in range(n):
        s = Server(ksize=k, alpha=3)
        await s.listen(0, interface=HOST)
        servers.append(s)
        ports.append(s.transport.get_extra_info("sockname")[1])
        if i:
            await s.bootstrap([(HOST, ports[rng.randrange(i)])])
    # a second bootstrap round so early nodes learn about later ones (kademlia refreshes hourly otherwise)
    for s in servers:
        await s.bootstrap([(HOST, ports[rng.randrange(n)]) for _ in range(2)])

    def known() -> list[int]:
        return [sum(len(b.get_nodes()) for b in s.protocol.router.buckets) for s in servers]

    settled = await settle_counts(known, min(n - 1, k))
    setup = time.perf_counter() - t0
    note = f"k={k}, alpha=3" + ("" if settled else ", did not settle")
    res = Result("kademlia", n, [], [], 0, 0, ops, setup, note=note)
    for i in range(WARMUP):
        with contextlib.suppress(Exception):
            await rng.choice(servers).set(f"warmup{i}", "w")
            await rng.choice(servers).get(f"warmup{i}")

    async def put(name: str) -> bool:
        return bool(await rng.choice(servers).set(name, name))

    async def get(name: str) -> bool:
        return bool(await rng.choice(servers).get(name) == name)

    await measure(res, ops, put, get)
    for s in servers:
        s.stop()
    return res


def bench_opendht(n: int, ops: int, rng: random.Random) -> Result:
    try:
        import opendht as dht
    except ImportError as exc:
        return Result("opendht", n, [], [], 0, 0, ops, 0.0, note=f"not installed: {exc}")
    t0 = time.perf_counter()
    runners = []
    for i in range(n):
        r = dht.DhtRunner()
        r.run(ipv4=HOST, ipv6="::1", port=0)
        if i:
            r.bootstrap(HOST, str(runners[rng.randrange(i)].getBound().getPort()))
        runners.append(r)

    def known() -> list[int]:  # nodes in each runner's IPv4 routing table (its log: "... count: N ...")
        return [
            sum(int(c) for c in re.findall(r"count: (\d+)", r.getRoutingTablesLog(socket.AF_INET)))
            for r in runners
        ]

    settled = asyncio.run(settle_counts(known, min(n - 1, 8)))
    setup = time.perf_counter() - t0
    note = f"v{dht.version()}" if hasattr(dht, "version") else ""
    res = Result("opendht", n, [], [], 0, 0, ops, setup, note=note + ("" if settled else ", did not settle"))
    for i in range(WARMUP):
        with contextlib.suppress(Exception):
            rng.choice(runners).put(dht.InfoHash.get(f"warmup{i}"), dht.Value(b"w"))
            rng.choice(runners).get(dht.InfoHash.get(f"warmup{i}"))

    async def put(name: str) -> bool:  # OpenDHT's calls block until done: timed the same way
        return bool(rng.choice(runners).put(dht.InfoHash.get(name), dht.Value(name.encode())))

    async def get(name: str) -> bool:
        return any(v.data == name.encode() for v in rng.choice(runners).get(dht.InfoHash.get(name)))

    asyncio.run(measure(res, ops, put, get))
    for r in runners:
        r.join()
    return res


def bench_p2psip_on_opendht(n: int, ops: int, rng: random.Random) -> Result:
    """Our directory on the OpenDHT engine (``p2psip start --dht opendht``): the same N OpenDHT nodes, but
    every put is one of our signed entries with its user certificate and every get keeps only validly
    signed, enrolled, newest entries (overlay.directory.select_entries): OpenDHT's row plus our crypto."""
    try:
        import opendht  # noqa: F401
    except ImportError as exc:
        return Result("p2psip-on-opendht", n, [], [], 0, 0, ops, 0.0, note=f"not installed: {exc}")
    from overlay.identity import KeyPair, enroll_user
    from overlay.opendht_directory import OpenDhtDirectory

    async def run() -> Result:
        ca, user = KeyPair.generate(), KeyPair.generate()
        t0 = time.perf_counter()
        nodes: list[OpenDhtDirectory] = []
        for i in range(n):
            boot = nodes[rng.randrange(i)].endpoint if i else None
            nodes.append(await OpenDhtDirectory.start((HOST, 0), ca.public_key, bootstrap=boot, ipv6="::1"))

        def known() -> list[int]:
            return [
                sum(int(c) for c in re.findall(r"count: (\d+)", d.runner.getRoutingTablesLog(socket.AF_INET)))
                for d in nodes
            ]

        settled = await settle_counts(known, min(n - 1, 8))
        setup = time.perf_counter() - t0
        res = Result("p2psip-on-opendht", n, [], [], 0, 0, ops, setup,
                     note="signed, enrolled entries" + ("" if settled else ", did not settle"))  # fmt: skip

        async def put(name: str) -> bool:
            node = rng.choice(nodes)
            node.add_certificate(enroll_user(ca, name, user.public_key))
            try:
                await node.put(name, name.encode(), key=user)
            except Exception:
                return False
            return True

        async def get(name: str) -> bool:
            return any(e.value == name.encode() for e in await rng.choice(nodes).get(name))

        for i in range(WARMUP):
            with contextlib.suppress(Exception):
                await put(f"warmup{i}")
                await get(f"warmup{i}")
        await measure(res, ops, put, get)
        await asyncio.gather(*(d.close() for d in nodes))
        return res

    return asyncio.run(run())


def table(results: list[Result]) -> str:
    lines = [
        "| N | system | put p50 ms | put p99 ms | get p50 ms | get p99 ms | put ok | get ok | setup s | p99 vs p2psip (put/get) | notes |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    base: dict[int, Result] = {r.n: r for r in results if r.system == "p2psip"}
    for r in results:
        b = base.get(r.n)
        if r.put_ms and b and b.put_ms:
            ratio = f"{pct(r.put_ms, 0.99) / pct(b.put_ms, 0.99):.2f} / {pct(r.get_ms, 0.99) / pct(b.get_ms, 0.99):.2f}"
        else:
            ratio = "-"
        if not r.put_ms:
            lines.append(f"| {r.n} | {r.system} | - | - | - | - | - | - | - | - | {r.note} |")
            continue
        lines.append(
            f"| {r.n} | {r.system} | {pct(r.put_ms, 0.5):.1f} | {pct(r.put_ms, 0.99):.1f} | "
            f"{pct(r.get_ms, 0.5):.1f} | {pct(r.get_ms, 0.99):.1f} | "
            f"{100 * r.put_ok / r.ops:.1f}% | {100 * r.get_ok / r.ops:.1f}% | {r.setup_s:.1f} | {ratio} | {r.note} |"
        )
    return "\n".join(lines)


def run_one(system: str, n: int, ops: int, seed: int, kad_k: int) -> Result:
    rng = random.Random(seed)
    if system == "p2psip":
        return asyncio.run(bench_p2psip(n, ops, rng))
    if system == "kademlia":
        return asyncio.run(bench_kademlia(n, ops, rng, kad_k))
    if system == "p2psip-on-opendht":
        return bench_p2psip_on_opendht(n, ops, rng)
    return bench_opendht(n, ops, rng)


def merge(parts: list[Result]) -> Result:
    """Pool the samples of several rounds (percentiles over all of them, success summed)."""
    first = parts[0]
    out = Result(first.system, first.n, [], [], 0, 0, 0, 0.0, first.note)
    for r in parts:
        out.put_ms += r.put_ms
        out.get_ms += r.get_ms
        out.put_ok += r.put_ok
        out.get_ok += r.get_ok
        out.ops += r.ops
        out.setup_s = max(out.setup_s, r.setup_s)
        for k, v in r.counters.items():
            out.counters[k] = out.counters.get(k, 0) + v
    notes = sorted({r.note for r in parts if r.note})
    out.note = "; ".join(notes[:2]) + (" ..." if len(notes) > 2 else "")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument("--ops", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2, help="repeat, rotating the order of systems")
    parser.add_argument("--kad-k", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--skip", nargs="*", default=[], choices=SYSTEMS)
    parser.add_argument("--one", choices=SYSTEMS, help=argparse.SUPPRESS)  # child mode: one run, JSON out
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(asdict(run_one(args.one, args.n, args.ops, args.seed, args.kad_k))))
        return
    systems = [s for s in SYSTEMS if s not in args.skip]
    conditions = Conditions()
    runs: dict[tuple[int, str], list[Result]] = {}
    for rnd in range(args.rounds):
        for n in args.sizes:
            order = systems[rnd % len(systems) :] + systems[: rnd % len(systems)]
            for system in order:
                # each run in a fresh process: no garbage, threads or sockets left over from the last one
                cmd = [
                    sys.executable,
                    __file__,
                    "--one",
                    system,
                    "--n",
                    str(n),
                    "--ops",
                    str(args.ops),
                    "--seed",
                    str(args.seed + 1000 * rnd + n),
                    "--kad-k",
                    str(args.kad_k),
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
                if proc.returncode != 0 or not lines:
                    reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                    result = Result(system, n, [], [], 0, 0, args.ops, 0.0, note=f"failed: {reason[:120]}")
                else:
                    result = Result(**json.loads(lines[-1]))
                runs.setdefault((n, system), []).append(result)
                print(f"# round {rnd + 1}: {system} N={n} done", file=sys.stderr, flush=True)
    results = [merge(runs[(n, s)]) for n in args.sizes for s in systems if (n, s) in runs]
    print(table(results))
    print(f"# {conditions}; {args.rounds} rounds per cell, pooled")
    for r in results:
        if r.counters:
            print(f"# {r.system} N={r.n} retry counters over all rounds: {r.counters}")


if __name__ == "__main__":
    main()
