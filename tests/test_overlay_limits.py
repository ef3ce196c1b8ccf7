"""Per-source limits on the overlay port, on real sockets: a flood from one source costs that source only.

A ring of 4 nodes on loopback; a separate process floods node A with valid, signed ``store`` (replica)
and ``find_successor`` requests from one UDP port, 5-15x over the default limits, for a bounded time.
Meanwhile ring members read keys A is responsible for, and a second stranger on another port of the same
host (127.0.0.1) asks A for lookups at a modest rate. They all succeed, before and during the flood, and no
source but the flooder is refused anything; the flooder's requests are refused and counted, and what it got
through is bounded by the limit's burst plus its rate times the span of the limiter's decisions on it (the
bucket's own clock, so the bound holds however slowly a loaded machine drains the flood).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Hashable
from pathlib import Path

import pytest
from overlay_support import started_ring

from overlay.chord import ChordConfig
from overlay.ids import key_for
from overlay.node import DEFAULT_LIMITS, Node, NodeConfig
from overlay.wire import Codec, Message
from p2psip.ratelimit import RateLimiter

ROOT = Path(__file__).resolve().parent.parent
OVERLAY = "limits"
FLOOD_RATE = 3000.0  # requests per second, half stores, half lookups: 15x and 5x the default limits
FLOOD_S = 3.0

CFG = NodeConfig(
    chord=ChordConfig(
        successors=3, stabilize_interval=0.25, fix_fingers_interval=0.5, check_predecessor_interval=0.5
    ),
    rpc_timeout=0.5,
    rpc_retries=2,
    op_timeout=10.0,
    repair_interval=30.0,
)

FLOODER = r"""
import os, socket, sys, time
sys.path.insert(0, sys.argv[1])
from overlay.identity import KeyPair
from overlay.ids import key_for
from overlay.storage import Entry
from overlay.wire import Codec, Message
host, port, name = sys.argv[2], int(sys.argv[3]), sys.argv[6]
rate, seconds = float(sys.argv[4]), float(sys.argv[5])
codec = Codec(name)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((host, 0))
me = sock.getsockname()
src = int.from_bytes(os.urandom(16), "big")
total = int(rate * seconds)
datagrams = []
for i in range(total):
    if i % 2 == 0:
        # a fresh user key per entry: no per-owner quota stops it, every one costs a verification
        entry = Entry.create(KeyPair.generate(), key_for(f"flood-{i}"), b"e", b"x" * 600, 1, 7 * 24 * 3600)
        body = {"entry": entry, "replica": True}
        datagrams.append(codec.encode(Message("store", i + 1, src, me, body)))
    else:
        datagrams.append(codec.encode(Message("find_successor", i + 1, src, me, {"key": key_for(f"k{i}")})))
print("ready", flush=True)
sys.stdin.readline()
start = time.monotonic()
sent = 0
while sent < total and time.monotonic() - start < seconds + 2.0:
    due = min(total, int((time.monotonic() - start) * rate) + 1)
    while sent < due:
        sock.sendto(datagrams[sent], (host, port))
        sent += 1
    time.sleep(0.002)
print(sent, round(time.monotonic() - start, 3), flush=True)
"""


class _Stranger(asyncio.DatagramProtocol):
    """An honest non-member asking one node find_successor, one request at a time."""

    def __init__(self) -> None:
        self.waiting: dict[int, asyncio.Future[None]] = {}

    def datagram_received(self, data: bytes, addr: object) -> None:
        msg = Codec(OVERLAY).decode(data)
        fut = self.waiting.pop(msg.id, None)
        if fut is not None and not fut.done() and msg.type == "ok":
            fut.set_result(None)


async def _ask(
    transport: asyncio.DatagramTransport, proto: _Stranger, target: Node, mid: int
) -> tuple[float | None, int]:
    """One find_successor from the stranger, retransmitted every 0.5 s up to 3 times as a node would (a
    datagram the kernel dropped from a full buffer is lost for everyone, flood or not). Returns its
    latency (None without an answer) and the number of retransmissions."""
    loop = asyncio.get_running_loop()
    me = transport.get_extra_info("sockname")
    fut: asyncio.Future[None] = loop.create_future()
    proto.waiting[mid] = fut
    data = Codec(OVERLAY).encode(
        Message("find_successor", mid, 12345, (me[0], me[1]), {"key": key_for(f"q{mid}")})
    )
    started = loop.time()
    for attempt in range(4):
        transport.sendto(data, target.endpoint)
        try:
            await asyncio.wait_for(asyncio.shield(fut), CFG.rpc_timeout)
        except TimeoutError:
            continue
        return loop.time() - started, attempt
    proto.waiting.pop(mid, None)
    return None, 3


async def _honest_round(
    readers: list[Node],
    names: list[str],
    transport: asyncio.DatagramTransport,
    proto: _Stranger,
    target: Node,
    first_id: int,
    count: int,
) -> tuple[list[float], int, list[float], int, int]:
    """``count`` member reads (through the ring, of keys ``target`` holds) and stranger lookups, paced
    at 50 per second each. Returns (member latencies, member failures, stranger latencies, misses,
    stranger retransmissions)."""
    loop = asyncio.get_running_loop()
    member: list[float] = []
    stranger: list[float] = []
    failures = misses = resent = 0

    async def read(i: int) -> None:
        nonlocal failures
        started = loop.time()
        try:
            entries = await asyncio.wait_for(readers[i % len(readers)].get(names[i % len(names)]), 5.0)
        except Exception:
            failures += 1
            return
        if len(entries) != 1:
            failures += 1
            return
        member.append(loop.time() - started)

    async def look(i: int) -> None:
        nonlocal misses, resent
        latency, again = await _ask(transport, proto, target, first_id + i)
        resent += again
        if latency is None:
            misses += 1
        else:
            stranger.append(latency)

    tasks = []
    for i in range(count):
        tasks.append(asyncio.ensure_future(read(i)))
        tasks.append(asyncio.ensure_future(look(i)))
        await asyncio.sleep(0.02)
    await asyncio.gather(*tasks)
    return member, failures, stranger, misses, resent


class _Ledger:
    """Records every admission decision of a node's real limiter (the call goes through unchanged), per
    (kind, source): the limiter's own ``now`` of the first and last decision and how many it allowed and
    refused. The token bucket's promise is stated on that clock, so checking it does not depend on how
    fast a loaded machine drained the flood from the socket."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter
        self.real_allow = limiter.allow
        self.recording = False
        self.seen: dict[tuple[str, Hashable], list[float]] = {}  # [first now, last now, allowed, refused]

    def allow(self, kind: str, key: Hashable, now: float, cost: float = 1.0) -> bool:
        ok = self.real_allow(kind, key, now, cost)
        if self.recording:
            record = self.seen.setdefault((kind, key), [now, now, 0, 0])
            record[1] = now
            record[2 if ok else 3] += 1
        return ok


@pytest.mark.asyncio
async def test_a_flood_from_one_source_degrades_only_that_source(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    async with started_ring(4, overlay_name=OVERLAY, config=CFG) as nodes:
        target = nodes[0]
        await _settled(nodes)
        names = [n for n in (f"sip:user{i}@limits.example" for i in range(400)) if _responsible(target, n)]
        names = names[:10]
        assert names, "no key of node A among 400 names"
        for name in names:
            await nodes[1].put(name, b"contact", entry_id=b"phone")
        ledger = _Ledger(target.limiter)
        monkeypatch.setattr(target.limiter, "allow", ledger.allow)
        transport, proto = await loop.create_datagram_endpoint(_Stranger, local_addr=("127.0.0.1", 0))
        flooder = subprocess.Popen(
            [sys.executable, "-c", FLOODER, str(ROOT), *target.endpoint[:1], str(target.endpoint[1]),
             str(FLOOD_RATE), str(FLOOD_S), OVERLAY],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert flooder.stdout is not None and flooder.stdin is not None
            ready = await asyncio.wait_for(loop.run_in_executor(None, flooder.stdout.readline), 60.0)
            assert ready.strip() == "ready"
            readers = nodes[1:]
            before = await _honest_round(readers, names, transport, proto, target, 1, 60)
            ledger.recording = True
            flooder.stdin.write("go\n")
            flooder.stdin.flush()
            during = await _honest_round(readers, names, transport, proto, target, 10_000, 120)
            done = await asyncio.wait_for(loop.run_in_executor(None, flooder.stdout.readline), 30.0)
        finally:
            if flooder.poll() is None:
                flooder.kill()
            flooder.wait(10)
            transport.close()
        sent = int(done.split()[0])
        assert sent >= FLOOD_RATE * FLOOD_S * 0.9, f"the flooder sent only {sent}"
        # Everyone else is served: every member read (through the ring, of keys the flooded node holds)
        # returned its entry within the read's timeout, every stranger lookup was answered.
        for label, (_, failures, _, misses, resent) in (("before", before), ("during", during)):
            assert failures == 0, f"{label} the flood: {failures} member reads failed"
            assert misses == 0, f"{label} the flood: {misses} stranger lookups unanswered"
            # A retransmission means the kernel dropped a datagram from a full buffer: rare, or the
            # flood would be costing everyone.
            assert resent <= 6, f"{label} the flood: {resent} of 120 stranger lookups needed a retransmission"
        # The flood from one source is limited: the flooder's source is the one that sent the most; the
        # limiter let through no more than its burst plus its rate times the span between its first and
        # last decision on that source (the bucket's own clock), and refused the rest.
        flood_key = max({key for _, key in ledger.seen}, key=lambda k: sum(
            r[2] + r[3] for (_, key), r in ledger.seen.items() if key == k
        ))  # fmt: skip
        limited: dict[str, int] = {}
        for kind, count in (("store", (sent + 1) // 2), ("lookup", sent // 2)):
            first, last, allowed, refused = ledger.seen[(kind, flood_key)]
            rate = DEFAULT_LIMITS[kind]
            bound = rate.burst + rate.per_second * (last - first) + 1
            assert allowed <= bound, (
                f"{kind}: {allowed:.0f} allowed in {last - first:.2f} s, bound {bound:.0f}"
            )
            assert allowed + refused <= count
            # Refused and counted; stores come at 15x their rate, so most of them are refused.
            assert refused > (allowed if kind == "store" else 0), (
                f"{kind}: {refused:.0f} refused, {allowed:.0f} allowed"
            )
            limited[kind] = int(refused)
        # ... and it cost that source only: no other source was refused anything during the flood.
        others = {
            f"{kind} {key}": r[3] for (kind, key), r in ledger.seen.items() if key != flood_key and r[3]
        }
        assert not others, f"honest sources refused during the flood: {others}"
        assert target.stats()["dropped_rate_limited"] >= sum(limited.values())


async def _settled(nodes: list[Node]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20.0
    while not all(n.core is not None and n.core.predecessor is not None for n in nodes):
        assert loop.time() < deadline, "ring did not settle"
        await asyncio.sleep(0.05)


def _responsible(node: Node, name: str) -> bool:
    return node.core is not None and node.core.is_responsible(key_for(name))


def test_limits_from_the_config_file_and_flags(tmp_path: Path) -> None:
    from overlay.node import LIMIT_KINDS
    from p2psip.config import OVERLAY_LIMIT_KINDS, load_config
    from p2psip.errors import ConfigError
    from p2psip.peer import _node_config
    from p2psip.ratelimit import UNLIMITED, Rate

    assert OVERLAY_LIMIT_KINDS == LIMIT_KINDS
    # the example of docs/overlay.md, as written
    doc = (ROOT / "docs" / "overlay.md").read_text()
    example = doc.split("```toml\n[overlay_limits]\n", 1)[1].split("```", 1)[0]
    toml = tmp_path / "peer.toml"
    toml.write_text("[overlay_limits]\n" + example)
    config = load_config(toml, {"overlay_limits": ["join=1/s:2"]})
    assert config.overlay_limits == {"store": Rate(100.0, 500.0), "lookup": UNLIMITED, "join": Rate(1.0, 2.0)}
    node_config = _node_config(None, config)
    assert node_config is not None
    assert node_config.limits == {**DEFAULT_LIMITS, **config.overlay_limits}
    for bad in (["nope=1/s"], ["store=fast"], ["store"]):
        with pytest.raises(ConfigError) as info:
            load_config(None, {"overlay_limits": bad})
        assert "overlay_limits" in str(info.value) and "\n" not in str(info.value)


def test_start_with_a_bad_overlay_limit_exits_2_with_one_line(tmp_path: Path) -> None:
    args = ["start", "--overlay-limit", "store=lots", "--data-dir", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "-m", "p2psip.cli", *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "overlay_limits.store" in proc.stderr
