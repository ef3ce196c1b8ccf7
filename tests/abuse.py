"""A mixed abuse of one running peer, at bounded rates, on loopback only (no tests here).

Shared by ``tests/test_abuse_soak.py`` (60 s in the suite) and ``bench/abuse.py`` (10 minutes, one command,
a table). Five kinds of abuse run at once, each from its own loopback address so per-source defences see
distinct sources:

- *fuzz*: mutated SIP datagrams (valid start lines, mutated headers, a malformed second Via, ``Via: , , ,``,
  over-long lines, 300 headers) — every one must be answered or dropped, none may leave state behind;
- *slowloris*: TCP connections that trickle a never-ending header, reopened when the peer cuts them;
- *REGISTER flood*: REGISTERs for ever new AORs (each would create a user key and DHT entries);
- *wrong digests*: guessers answering the account's challenges with wrong passwords;
- *scan*: INVITEs for AORs nobody registered (svwar-style).

A legitimate phone (bob) is registered before and must still be callable after. :func:`live_state` is what
"the peer's live state returns to baseline" compares; :func:`traced_kib` the peer's traced allocations.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import socket
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peer_phone import Phone

from overlay.localring import quick_node_config
from p2psip.auth import answer_challenge
from p2psip.config import HostPort, ListenSpec, PeerConfig
from p2psip.message import Request, new_branch, new_tag
from p2psip.peer import Peer, add_account
from p2psip.timers import TimerConfig

DOMAIN = "p2p.example"
ALICE = f"sip:alice@{DOMAIN}"  # the account the guessers attack
BOB = f"sip:bob@{DOMAIN}"  # the legitimate user who must survive it all
TIMERS = TimerConfig(t1=0.05, t2=0.4, t4=0.5, timer_c=3.0)  # Timers H/J = 3.2 s: transactions end fast


@dataclass
class Rates:
    """How hard each kind pushes (all bounded)."""

    fuzz: float = 100.0  # datagrams per second
    slow: int = 24  # slowloris connections held at once (over the per-source cap of 16 on purpose)
    register: float = 40.0  # REGISTERs for new AORs per second, spread over 4 source addresses
    guessers: int = 2  # wrong-digest guessers, each waiting for its answer before the next guess
    scan: float = 20.0  # INVITEs per second for AORs nobody registered


@dataclass
class Tally:
    """What the attackers did and what came back."""

    sent: Counter[str] = field(default_factory=Counter)
    answers: Counter[str] = field(default_factory=Counter)


async def start_target(data_dir: Path) -> Peer:
    """The peer under attack: UDP and TCP on one port, short timers and sweeps so the test sees the state
    go back within seconds; the defences at their defaults except a 2 s message deadline."""
    password = add_account(data_dir, ALICE)
    config = PeerConfig(
        listen=[ListenSpec(None, "127.0.0.1", 0)],
        overlay=HostPort("127.0.0.1", 0),
        data_dir=data_dir,
        cache_ttl=0.0,
        min_expires=1,
        message_timeout=2.0,
        max_connections_per_source=16,
    )
    peer = await Peer.start(config, node_config=quick_node_config(), stack_options={"timers": TIMERS})
    peer.key_sweep_interval = 1.0
    peer.node.store.memory_s = 2.0  # expired records are forgotten soon (they refuse replays meanwhile)
    peer.throttle.forget_after = 5.0
    peer.throttle.ceiling = 4.0
    peer.alice_password = password  # type: ignore[attr-defined]
    return peer


def live_state(peer: Peer) -> dict[str, int]:
    """The peer's state that abuse could leave behind: it must return to its baseline."""
    now = time.time()
    return {
        "transactions": len(peer.stack.transactions),
        "connections": peer.stack.transport.connection_count(),
        "stored entries": peer.node.store.live_count(now),
        "stored records": len(peer.node.store),
        "user keys": peer.users.on_disk(),
        "register locks": len(peer._aor_locks),
        "throttled pairs": len(peer.throttle),
        "core tasks": len(peer.core._tasks),
        "stream slots": peer.stack.transport.guard.total,
        "calls": len(peer.core.calls),
        "home registrations": sum(len(b) for _aor, b in peer.home.items()),
        "names": len(peer.names),
        "flows": len(peer.flows.snapshot(asyncio.get_running_loop().time())),
    }


def forget_memos(peer: Peer) -> None:
    """Empty the memo tables that are bounded by construction and hold texts or proofs already seen, not
    state: the parser's vetted URIs and name-addrs (4,096 each), IP literals (4,096), ``is_local`` answers
    (4,096) and the overlay's verified signatures (4,096). What the soak measures is everything else."""
    from p2psip import address, uri
    from p2psip.message import values

    uri._VETTED.clear()
    uri._VETTED_URIS.clear()
    values._VETTED_VIAS.clear()
    address._NUMERIC_CACHE.clear()
    peer.stack._is_local_cache.clear()
    peer.node.cache._facts.clear()


def traced_kib(peer: Peer | None = None) -> int:
    """KiB currently allocated by the peer's own code (p2psip and overlay), as tracemalloc traces it;
    with ``peer``, after :func:`forget_memos`."""
    if peer is not None:
        forget_memos(peer)
    gc.collect()
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(True, "*/p2psip/*"), tracemalloc.Filter(True, "*/overlay/*")]
    )
    return sum(stat.size for stat in snapshot.statistics("filename")) // 1024


# --------------------------------------------------------------------------------------------- the kinds


def _fuzz_corpus(port: int) -> list[bytes]:
    via = f"Via: SIP/2.0/UDP 127.0.0.8:{port};branch=z9hG4bKf{{n}};rport\r\n"
    head = "OPTIONS sip:u{n}@" + DOMAIN + " SIP/2.0\r\n" + via
    tail = "From: <sip:f@x>;tag={n}\r\nTo: <sip:u@" + DOMAIN + ">\r\nCall-ID: fz{n}\r\nCSeq: 1 OPTIONS\r\n"
    return [
        (head + tail + "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode(),
        (head + "Via: SIP/2.0/UDP 127.0.0.1;branch=\r\n" + tail + "Content-Length: 0\r\n\r\n").encode(),
        (head + "Via: , , ,\r\n" + tail + "Content-Length: 0\r\n\r\n").encode(),
        (head + tail + "X-Long: " + "y" * 9000 + "\r\nContent-Length: 0\r\n\r\n").encode(),
        (head + tail + "".join(f"X-{i}: v\r\n" for i in range(300)) + "Content-Length: 0\r\n\r\n").encode(),
        (head.replace("OPTIONS", "INVITE") + tail.replace("1 OPTIONS", "1 INVITE")
         + "Content-Length: 9\r\n\r\nv=0\r\nx=").encode(),
    ]  # fmt: skip


def _mutate(data: bytes, rng: random.Random) -> bytes:
    """Mutate everything after the start line and the first Via (so every answer comes back to us)."""
    first = data.index(b"\r\n", data.index(b"\r\n") + 2) + 2
    body = bytearray(data[first:])
    for _ in range(rng.randrange(0, 5)):
        pos = rng.randrange(len(body) + 1)
        kind = rng.randrange(4)
        if kind == 0 and pos < len(body):
            body[pos] = rng.randrange(256)
        elif kind == 1:
            body[pos:pos] = rng.choice([b",", b";", b"<", b'"', b"\r\n", b":", b"\x00", b"="])
        elif kind == 2:
            del body[pos : pos + rng.randrange(1, 6)]
        else:
            body[pos:pos] = body[pos : pos + rng.randrange(1, 30)]
    return data[:first] + bytes(body)


async def _paced(rate: float, until: float, step: Any) -> None:
    """Call ``step(n)`` ``rate`` times a second until ``until`` (loop time), in 20 ms ticks."""
    loop = asyncio.get_running_loop()
    n = 0
    started = loop.time()
    while loop.time() < until:
        due = int((loop.time() - started) * rate)
        while n < due:
            step(n)
            n += 1
        await asyncio.sleep(0.02)


async def fuzz(peer: Peer, until: float, rate: float, tally: Tally) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.8", 0))
    sock.setblocking(False)
    corpus = _fuzz_corpus(sock.getsockname()[1])
    rng = random.Random(17)
    target = peer.sip_address("udp")

    def step(n: int) -> None:
        data = rng.choice(corpus).replace(b"{n}", str(n).encode())
        data = _mutate(data, rng) if rng.random() < 0.7 else data
        with contextlib.suppress(OSError):
            sock.sendto(data, target)
            tally.sent["fuzz"] += 1
        with contextlib.suppress(OSError):
            while True:  # drain what came back (answers to the fuzz)
                sock.recv(65535)
                tally.answers["fuzz"] += 1

    try:
        await _paced(rate, until, step)
    finally:
        sock.close()


async def slowloris(peer: Peer, until: float, count: int, tally: Tally) -> None:
    loop = asyncio.get_running_loop()
    host, port = peer.sip_address("tcp")
    via = "Via: SIP/2.0/TCP 127.0.0.9:9;branch=z9hG4bKs"
    trickle = f"OPTIONS sip:u@{DOMAIN} SIP/2.0\r\n{via}\r\nX: ".encode()

    async def one() -> None:
        while loop.time() < until:
            tally.sent["slowloris connections"] += 1
            try:
                reader, writer = await asyncio.open_connection(host, port, local_addr=("127.0.0.9", 0))
            except OSError:
                await asyncio.sleep(0.2)
                continue
            try:
                i = 0
                while loop.time() < until:
                    writer.write(trickle[i : i + 1] if i < len(trickle) else b"y")
                    i += 1
                    await writer.drain()
                    with contextlib.suppress(TimeoutError):
                        if await asyncio.wait_for(reader.read(100), 0.5) == b"":
                            tally.answers["slowloris cut"] += 1
                            break
            except OSError:
                tally.answers["slowloris cut"] += 1
            finally:
                writer.close()
            await asyncio.sleep(0.2)

    await asyncio.gather(*(one() for _ in range(count)))


def _register(phone: Phone, aor: str, n: int) -> Request:
    return Request.create(
        "REGISTER", f"sip:{DOMAIN}", from_=f"<{aor}>;tag={new_tag()}", to=f"<{aor}>",
        call_id=f"fl{phone.port}-{n}", cseq=1, via=phone._via(), contact=f"<{phone.contact}>",
        headers=[("Expires", "2")],
    )  # fmt: skip


async def register_flood(peer: Peer, until: float, rate: float, tally: Tally) -> None:
    phones = [await Phone.open("flood", host=f"127.0.0.{2 + i}") for i in range(4)]
    target = peer.sip_address("udp")

    def step(n: int) -> None:
        phone = phones[n % len(phones)]
        phone.send(_register(phone, f"sip:flood{n}@{DOMAIN}", n), target)
        tally.sent["register flood"] += 1

    try:
        await _paced(rate, until, step)
    finally:
        for phone in phones:
            phone.close()


async def guessers(peer: Peer, until: float, count: int, tally: Tally) -> None:
    loop = asyncio.get_running_loop()
    target = peer.sip_address("udp")

    async def one(i: int) -> None:
        phone = await Phone.open("guess", host=f"127.0.0.{20 + i}")
        try:
            n = 0
            while loop.time() < until:
                n += 1
                call_id = f"g{i}-{n}"
                try:
                    challenge = await phone.register(target, aor=ALICE, call_id=call_id, timeout=10)
                except (TimeoutError, ValueError, KeyError):
                    continue
                if challenge.status == 503:
                    # Shed before auth (overload, too many delayed attempts): no challenge, nothing to guess.
                    tally.answers["wrong digests unchallenged"] += 1
                    continue
                request = _register(phone, ALICE, n)
                request.set("Call-ID", call_id)
                request.set("CSeq", "2 REGISTER")
                guess = answer_challenge(challenge, request, "alice", f"{n:04d}")
                tally.sent["wrong digests"] += 1
                try:
                    answer = await phone.request(guess, target, timeout=10)
                except TimeoutError:
                    # The peer may have checked (and counted) it; the answer just came too late.
                    tally.answers["wrong digests unanswered"] += 1
                    continue
                tally.answers[f"wrong digests {answer.status}"] += 1
                if answer.status == 503 and answer.get("Retry-After") is None:
                    tally.answers["wrong digests 503-without-Retry-After"] += 1
        finally:
            phone.close()

    await asyncio.gather(*(one(i) for i in range(count)))


async def scan(peer: Peer, until: float, rate: float, tally: Tally) -> None:
    phone = await Phone.open("scanner", host="127.0.0.6")
    target = peer.sip_address("udp")

    def step(n: int) -> None:
        uri = f"sip:nobody{n}@{DOMAIN}"
        invite = Request.create(
            "INVITE", uri, from_=f"<sip:scanner@{DOMAIN}>;tag={new_tag()}", to=f"<{uri}>",
            call_id=f"sc{n}", cseq=1, via=f"SIP/2.0/UDP 127.0.0.6:{phone.port};branch={new_branch()};rport",
            contact=f"<{phone.contact}>",
        )  # fmt: skip
        phone.send(invite, target)
        tally.sent["scan"] += 1

    try:
        await _paced(rate, until, step)
    finally:
        phone.close()


async def abuse(peer: Peer, seconds: float, rates: Rates | None = None) -> Tally:
    """Run every kind at once for ``seconds``; returns what was sent and answered."""
    rates = rates or Rates()
    tally = Tally()
    until = asyncio.get_running_loop().time() + seconds
    await asyncio.gather(
        fuzz(peer, until, rates.fuzz, tally),
        slowloris(peer, until, rates.slow, tally),
        register_flood(peer, until, rates.register, tally),
        guessers(peer, until, rates.guessers, tally),
        scan(peer, until, rates.scan, tally),
    )
    return tally


async def quiet(peer: Peer, timeout: float = 15.0) -> dict[str, int]:
    """The baseline: :func:`live_state` once the warm-up's transactions have ended (bounded wait)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while live_state(peer)["transactions"] and loop.time() < deadline:
        await asyncio.sleep(0.1)
    return live_state(peer)


async def settle(peer: Peer, baseline: dict[str, int], timeout: float) -> tuple[dict[str, int], float]:
    """Wait (bounded) until :func:`live_state` equals ``baseline``; returns the last state and the seconds
    it took. The peer raises no "back to normal" event, so the state is polled."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    state = live_state(peer)
    while state != baseline and loop.time() - started < timeout:
        await asyncio.sleep(0.25)
        state = live_state(peer)
    return state, loop.time() - started
