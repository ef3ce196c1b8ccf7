"""The ``p2psip`` command.

Sub-commands are added as the layers they need exist; see docs/cli.md. Usage errors print one line and
exit 2, runtime failures exit 1, so scripts can tell a typo from a network problem.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from p2psip import __version__


class UsageError(Exception):
    """A bad argument: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _cmd_proxy(args: argparse.Namespace) -> int:
    """``p2psip proxy``: a stand-alone SIP proxy (no overlay), forwarding by Route and Request-URI."""
    import asyncio

    from p2psip.errors import ConfigError
    from p2psip.proxy import serve
    from p2psip.transport import ListenSpec

    listen = args.listen or ["127.0.0.1:5060"]
    try:
        for spec in listen:
            ListenSpec.parse(spec)
        if args.tls_key and not args.tls_cert:
            raise ConfigError("--tls-key needs --tls-cert")
        if args.recurse and args.stateless:
            raise ConfigError("--recurse needs the stateful proxy (a stateless one cannot see the 3xx)")
    except ConfigError as exc:
        print(f"p2psip: error: {exc}", file=sys.stderr)
        return 2
    if args.verbose:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    def ready(stack: object) -> None:
        from p2psip.stack import Stack

        assert isinstance(stack, Stack)
        where = ", ".join(
            f"{t}:{'[' + h + ']' if ':' in h else h}:{p}"
            for t, addrs in stack.transport.listening.items()
            for h, p in addrs
        )
        mode = "stateless" if args.stateless else "stateful"
        print(f"p2psip proxy ({mode}) listening on {where}", flush=True)

    run: object = asyncio.run
    if args.loop in ("auto", "uvloop"):
        try:
            import uvloop  # type: ignore[import-not-found,unused-ignore]

            run = uvloop.run
        except ImportError:
            if args.loop == "uvloop":
                print("p2psip: error: --loop uvloop: uvloop is not installed", file=sys.stderr)
                return 2
    try:
        stats = run(  # type: ignore[operator]
            serve(
                listen,
                stateless=args.stateless,
                record_route=not args.no_record_route,
                recurse=args.recurse,
                tls_cert=args.tls_cert,
                tls_key=args.tls_key,
                tls_ca=args.tls_ca,
                verbose=args.verbose,
                trying_delay=args.trying_delay,
                ready=ready,
            )
        )
    except ConfigError as exc:
        print(f"p2psip: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    summary = " ".join(f"{k}={v}" for k, v in stats.items() if v)
    print(f"p2psip proxy stopped: {summary}", file=sys.stderr)
    return 0


# --- peer commands: start, demo, call, register, lookup, status (docs/cli.md) ------------------------------


def _peer_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The ``start`` flags as config settings (None = not given, so the config file's value stays)."""
    return {
        "listen": args.listen,
        "overlay": args.overlay,
        "join": args.join,
        "overlay_name": args.overlay_name,
        "data_dir": args.data_dir,
        "script": args.script,
        "scripts": args.scripts,
        "routes": args.route,
        "dns": True if args.dns else None,
        "verbose": True if args.verbose else None,
    }


def _fail(message: str, code: int) -> int:
    print(f"p2psip: error: {message}", file=sys.stderr)
    return code


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "  ") -> None:
    """A plain aligned text table (what `status`, `lookup` and `demo` print for humans)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            print(indent + "  ".join("-" * w for w in widths))


def _data_dir_of(args: argparse.Namespace) -> Path:
    from p2psip.config import default_data_dir, load_config

    if getattr(args, "data_dir", None):
        return Path(args.data_dir).expanduser()
    if getattr(args, "config", None):
        return load_config(Path(args.config)).data_dir
    return default_data_dir()


def _cmd_start(args: argparse.Namespace) -> int:
    from p2psip.config import load_config
    from p2psip.errors import ConfigError

    try:
        config = load_config(Path(args.config) if args.config else None, _peer_flags(args))
    except ConfigError as exc:
        return _fail(str(exc), 2)
    if config.scripts is not None and not config.scripts.is_dir():
        return _fail(
            f"--scripts {config.scripts}: not a directory (create it, then put user@domain.py files in it)", 2
        )
    if config.script is not None and not config.script.is_file():
        return _fail(f"--script {config.script}: no such file", 2)
    from p2psip.peer import Peer, run_foreground

    def install_scripts(peer: Peer) -> Any:
        if config.script is None and config.scripts is None:
            return None
        from sipapi.scripts import install

        scripting = install(peer, scripts=config.scripts, script=config.script)
        peer._event("scripts", ", ".join(str(p) for p in (config.scripts, config.script) if p))
        return scripting.close

    try:
        return asyncio.run(run_foreground(config, extension=install_scripts))
    except ConfigError as exc:
        return _fail(str(exc), 2)
    except KeyboardInterrupt:
        return 130


def _cmd_status(args: argparse.Namespace) -> int:
    from p2psip import control
    from p2psip.errors import P2PSIPError

    try:
        status = asyncio.run(control.request(_data_dir_of(args), "status"))
    except P2PSIPError as exc:
        return _fail(str(exc), 1)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    _print_status(status)
    return 0


def _print_status(status: dict[str, Any]) -> None:
    print(
        f"peer {status.get('node_id', '?')}  overlay {status.get('overlay_name')} at {status.get('overlay')}"
    )
    print(f"  SIP: {', '.join(status.get('sip', []))}   up {status.get('uptime_s', 0):.0f} s")
    pred = status.get("predecessor")
    print(f"  predecessor: {pred['id'] + ' ' + pred['addr'] if pred else '(none)'}")
    print("  successors:")
    _print_table(
        ["#", "node", "address"],
        [(i + 1, s["id"], s["addr"]) for i, s in enumerate(status.get("successors", []))],
        "    ",
    )
    fingers = status.get("fingers", [])
    if fingers:
        print("  fingers:")
        _print_table(
            ["#", "node", "address"], [(i + 1, f["id"], f["addr"]) for i, f in enumerate(fingers)], "    "
        )
    stored = status.get("stored", [])
    print(f"  stored entries: {sum(s['entries'] for s in stored)} under {len(stored)} keys")
    if stored:
        _print_table(
            ["key", "name", "entries", "owner key"],
            [(s["key"], s.get("name") or "", s["entries"], s.get("owner", "")) for s in stored[:20]],
            "    ",
        )
    counters = status.get("counters", {})
    if counters:
        print("  counters:")
        _print_table(["counter", "value"], sorted(counters.items()), "    ")


def _cmd_lookup(args: argparse.Namespace) -> int:
    from p2psip import control
    from p2psip.errors import P2PSIPError

    try:
        result = asyncio.run(control.request(_data_dir_of(args), "lookup", uri=args.uri))
    except P2PSIPError as exc:
        return _fail(str(exc), 1)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0 if result.get("bindings") else 1
    _print_lookup(result)
    return 0 if result.get("bindings") else 1


def _print_lookup(result: dict[str, Any]) -> None:
    print(f"{result['aor']}  key {result['key']}")
    responsible = result.get("responsible") or {"id": "?", "addr": "?"}
    print(
        f"  lookup: {result.get('hops')} hop(s) to {responsible['id'][:8]} ({responsible['addr']}), "
        f"the node responsible; {result.get('lookup_ms')} ms with the fetch"
    )
    holders = result.get("holders", [])
    if holders:
        print("  stored at: " + ", ".join(f"{h['id'][:8]} ({h['addr']})" for h in holders))
    bindings = result.get("bindings", [])
    if not bindings:
        print("  nobody is registered")
        return
    _print_table(
        ["contact", "expires in", "q", "instance"],
        [(b["contact"], f"{b['expires_in']} s", b.get("q") or "", b.get("instance") or "") for b in bindings],
    )


# --- a small phone (a UA core on a Stack) for demo, call and register ----------------------------------


class _Phone:
    """A minimal SIP phone: REGISTER (with digest), INVITE/ACK/BYE as caller, auto-answer as callee.

    A UA core on its own :class:`~p2psip.stack.Stack`, so retransmissions and timeouts are the transaction
    layer's. Responses to our requests arrive on per-transaction queues.
    """

    stateful = True

    def __init__(self, stack: Any, aor: str, *, answer: bool) -> None:
        from p2psip.message import new_tag

        self.stack = stack
        self.aor = aor
        self.answer = answer
        self.tag = new_tag()
        self.queues: dict[int, asyncio.Queue[Any]] = {}
        self.answered = asyncio.Event()
        self.acked = asyncio.Event()
        self.hung_up = asyncio.Event()
        self.ack: Any = None
        self.ack_target: Any = None
        stack.attach(self)

    @classmethod
    async def open(cls, aor: str, *, answer: bool = False, host: str = "127.0.0.1", port: int = 0) -> _Phone:
        from p2psip.stack import Stack

        shown = f"[{host}]" if ":" in host else host
        stack = await Stack.start([f"udp:{shown}:{port}"])
        return cls(stack, aor, answer=answer)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.stack.local_address("udp")
        return (str(host), int(port))

    @property
    def contact(self) -> str:
        user = self.aor.partition(":")[2].partition("@")[0]
        return str(self.stack.local_uri("udp", user=user))

    async def close(self) -> None:
        await self.stack.close()

    # core callbacks ------------------------------------------------------------------------------
    def on_request(self, request: Any, transaction: Any, source: Any) -> None:
        from p2psip.message import Response

        method = request.method
        if method == "ACK":
            self.acked.set()
            return
        if transaction is None:
            return
        if method == "INVITE" and self.answer:
            ringing = Response.for_request(request, 180, to_tag=self.tag)
            ok = Response.for_request(request, 200, to_tag=self.tag)
            ok.set("Contact", f"<{self.contact}>")
            for response in (ringing, ok):
                for rr in request.get_all("Record-Route"):
                    response.add("Record-Route", rr)
                self.stack.respond(transaction, response)
            self.answered.set()
        elif method == "INVITE":
            self.stack.respond(transaction, Response.for_request(request, 486, to_tag=self.tag))
        elif method in ("BYE", "CANCEL", "OPTIONS"):
            self.stack.respond(transaction, Response.for_request(request, 200))
            if method == "BYE":
                self.hung_up.set()
        else:
            self.stack.respond(transaction, Response.for_request(request, 501))

    def on_response(self, response: Any, transaction: Any, source: Any) -> None:
        if transaction is None:
            if 200 <= response.status < 300 and self.ack is not None:
                self.stack.send_stateless(self.ack, self.ack_target)  # a retransmitted 2xx
            return
        queue = self.queues.get(id(transaction))
        if queue is not None:
            queue.put_nowait(response)

    def _synthetic(self, transaction: Any, status: int, reason: str) -> None:
        from p2psip.message import Response

        queue = self.queues.get(id(transaction))
        if queue is not None:
            queue.put_nowait(Response.for_request(transaction.request, status, reason))

    def on_timeout(self, transaction: Any, timer: str) -> None:
        self._synthetic(transaction, 408, f"Request Timeout (timer {timer})")

    def on_transport_failure(self, transaction: Any, error: str) -> None:
        self._synthetic(transaction, 503, f"Service Unavailable ({error})")

    def on_terminated(self, transaction: Any) -> None:
        pass

    # requests ------------------------------------------------------------------------------------
    async def _transact(self, request: Any, target: Any, timeout: float) -> Any:
        tx = self.stack.send_request(request, target)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self.queues[id(tx)] = queue
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                response = await asyncio.wait_for(queue.get(), max(0.01, deadline - loop.time()))
                if response.status >= 200:
                    return response
        finally:
            self.queues.pop(id(tx), None)

    async def register(
        self,
        via: tuple[str, int],
        *,
        contact: str | None = None,
        expires: int = 3600,
        password: str | None = None,
        timeout: float = 10.0,
    ) -> Any:
        from p2psip.auth import answer_challenge
        from p2psip.message import Request
        from p2psip.transport import Target
        from p2psip.uri import URI

        domain = URI(self.aor).host
        request = Request.create(
            "REGISTER",
            f"sip:{domain}",
            from_=f"<{self.aor}>;tag={self.tag}",
            to=f"<{self.aor}>",
            contact=contact or f"<{self.contact}>",
            headers=[("Expires", str(expires))],
        )
        target = Target("udp", via[0], via[1])
        response = await self._transact(request.copy(), target, timeout)
        if response.status in (401, 407) and password is not None:
            user = URI(self.aor).user or ""
            retry = answer_challenge(response, request, user, password)
            retry.remove("Via")
            response = await self._transact(retry, target, timeout)
        return response

    async def call(self, uri: str, via: tuple[str, int], *, timeout: float = 30.0) -> tuple[Any, Any]:
        """INVITE ``uri`` (no SDP) through ``via``; ACK a 2xx. Returns (final response, dialog or None).

        The ``call`` command uses the UserAgent (with audio); this stays for the demo's ladder and the
        tests' stand-in phones."""
        from p2psip.dialog import Dialog
        from p2psip.message import Request
        from p2psip.transport import Target, target_from_uri

        invite = Request.create(
            "INVITE", uri, from_=f"<{self.aor}>;tag={self.tag}", to=f"<{uri}>", contact=f"<{self.contact}>"
        )
        final = await self._transact(invite, Target("udp", via[0], via[1]), timeout)
        if not 200 <= final.status < 300:
            return final, None
        dialog = Dialog.uac(invite, final)
        ack = dialog.create_ack(final)
        hop = dialog.route_set[0].uri if dialog.route_set else dialog.remote_target
        self.ack_target = target_from_uri(hop)
        self.stack.push_via(ack, self.ack_target)
        self.ack = ack
        self.stack.send_stateless(ack, self.ack_target)
        return final, dialog

    async def hang_up(self, dialog: Any, timeout: float = 10.0) -> Any:
        from p2psip.transport import target_from_uri

        bye = dialog.create_request("BYE")
        hop = dialog.route_set[0].uri if dialog.route_set else dialog.remote_target
        return await self._transact(bye, target_from_uri(hop), timeout)


# --- p2psip demo --------------------------------------------------------------------------------------


def _ladder_label(data: bytes) -> str:
    first = data.split(b"\r\n", 1)[0].decode("utf-8", "replace")
    if first.startswith("SIP/2.0 "):
        status = first[8:]
        method = ""
        for line in data.split(b"\r\n"):
            if line.lower().startswith(b"cseq:"):
                method = line.decode("utf-8", "replace").split()[-1]
        return f"{status} ({method})" if method and method != "INVITE" else status
    return first.split(" ", 1)[0]


class _Ladder:
    """Collects the messages the call's participants send and draws them as a SIP ladder."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.where: dict[tuple[str, int], int] = {}
        self.rows: list[tuple[int, int, str]] = []

    def sink_for(self, column: int) -> Callable[[str, Any, bytes], None]:
        def sink(direction: str, where: Any, data: bytes) -> None:
            if direction != "out" or where is None:
                return
            to = self.where.get((where[1], where[2]))
            if to is not None:
                self.rows.append((column, to, _ladder_label(data)))

        return sink

    def draw(self, width: int = 24) -> list[str]:
        pos = [6 + i * width for i in range(len(self.names))]
        size = pos[-1] + 2
        head = list(" " * (size + 12))
        for p, name in zip(pos, self.names, strict=True):
            start = max(0, p - len(name) // 2)
            head[start : start + len(name)] = name
        lines = ["".join(head).rstrip()]
        for a, b, label in self.rows:
            row = list(" " * size)
            for p in pos:
                row[p] = "|"
            lo, hi = min(pos[a], pos[b]), max(pos[a], pos[b])
            for i in range(lo + 1, hi):
                row[i] = "-"
            text = f" {label} "
            if len(text) > hi - lo - 3:
                text = text[: hi - lo - 3]
            if pos[a] < pos[b]:
                row[hi - 1] = ">"
                row[lo + 2 : lo + 2 + len(text)] = text
            else:
                row[lo + 1] = "<"
                row[hi - 1 - len(text) : hi - 1] = text
            lines.append("".join(row).rstrip())
        return lines


async def _demo(peer_count: int) -> int:
    import tempfile
    import time

    from p2psip.config import HostPort, ListenSpec, PeerConfig
    from p2psip.peer import Peer, SipTrace, quick_node_config, wait_until_settled

    began = time.perf_counter()
    alice_aor, bob_aor = "sip:alice@p2p.example", "sip:bob@p2p.example"
    print(f"p2psip demo: {peer_count} peers on 127.0.0.1 form an overlay; no server anywhere.\n")
    peers: list[Peer] = []
    phones: list[_Phone] = []
    with tempfile.TemporaryDirectory(prefix="p2psip-demo-") as tmp:
        try:
            # 1. the overlay
            print("1. Starting the peers (each: an overlay node + a SIP registrar/proxy)")
            for i in range(peer_count):
                config = PeerConfig(
                    listen=[ListenSpec("udp", "127.0.0.1", 0)],
                    overlay=HostPort("127.0.0.1", 0),
                    join=HostPort(*peers[0].overlay_address) if peers else None,
                    overlay_name="p2psip-demo",
                    data_dir=Path(tmp) / f"P{i + 1}",
                    cache_ttl=0.0,
                )
                peers.append(await Peer.start(config, node_config=quick_node_config()))
            name = {p.node.node_id: f"P{i + 1}" for i, p in enumerate(peers)}
            _print_table(
                ["peer", "node id", "overlay", "SIP", "joined via"],
                [
                    (
                        name[p.node.node_id],
                        f"{p.node.node_id:032x}"[:12],
                        p.overlay_address_text,
                        p.sip_addresses()[0],
                        "(created the ring)" if i == 0 else "P1",
                    )
                    for i, p in enumerate(peers)
                ],
                "   ",
            )
            settle = await wait_until_settled(peers, timeout=15)
            ring = sorted(peers, key=lambda p: p.node.node_id)
            order = " -> ".join(name[p.node.node_id] for p in ring)
            first = name[ring[0].node.node_id]
            print(f"   ring (by node id): {order} -> {first}  (settled in {settle:.1f} s)\n")

            # 2. registrations
            # Pick the phones' peers among those that do NOT store bob's registration, so that both the
            # REGISTER and the lookup cross the overlay (an AOR's key is fixed, node ids are not).
            bob_key = Peer.key_of(bob_aor)
            by_distance = sorted(ring, key=lambda p: (p.node.node_id - bob_key) % (1 << 128))
            outsiders = [p for p in peers if p not in by_distance[:3]]
            if len(outsiders) >= 2:
                alice_peer, bob_peer = outsiders[0], outsiders[1]
            else:
                alice_peer, bob_peer = by_distance[-1], by_distance[-2]
            alice = await _Phone.open(alice_aor)
            bob = await _Phone.open(bob_aor, answer=True)
            phones += [alice, bob]
            print("2. Registering two users at different peers")
            for who, phone, peer in (("alice", alice, alice_peer), ("bob", bob, bob_peer)):
                response = await phone.register(peer.sip_address(), expires=600)
                pname = name[peer.node.node_id]
                print(f"   {who}'s phone {phone.contact} -> REGISTER {phone.aor} at {pname}: "
                      f"{response.status} {response.reason}")  # fmt: skip
                if response.status != 200:
                    return 1
            print(
                "\n   Who stores what (one signed entry per contact, on the key's node and its successors):"
            )
            rows = []
            for aor in (alice_aor, bob_aor):
                key = Peer.key_of(aor)
                holders = []
                # in ring order from the key: the primary first, then its successors (the replicas)
                for p in sorted(ring, key=lambda p: (p.node.node_id - key) % (1 << 128)):
                    stored, primary = p.holds(aor)
                    if stored:
                        holders.append(name[p.node.node_id] + (" (primary)" if primary else ""))
                rows.append((aor, f"{key:032x}"[:12], ", ".join(holders)))
            _print_table(["AOR", "key", "stored at"], rows, "   ")

            # 3. lookup
            print(f"\n3. {name[alice_peer.node.node_id]} (alice's peer) looks bob up in the overlay")
            found = await alice_peer.lookup(bob_aor)
            path, hops = await alice_peer.lookup_path(bob_aor)
            by_ep = {p.overlay_address: name[p.node.node_id] for p in peers}
            responsible = name.get(found.responsible[0], "?") if found.responsible else "?"
            here = name[alice_peer.node.node_id]
            route = " -> ".join([here, *(by_ep.get(ep, f"{ep[0]}:{ep[1]}") for ep in path)])
            print(f"   key {found.key:032x}"[:19] + f"...: responsible node {responsible}")
            if responsible == here:
                print(f"   lookup path: {here} is itself responsible for the key (0 hops)")
            else:
                print(f"   lookup path: {route}  ({hops} hop(s); {here} asks each node itself, iteratively)")
            print(f"   lookup + fetch took {found.seconds * 1000:.1f} ms")
            for b in found.bindings:
                print(f"   contact: {b.contact} (expires in {b.remaining(time.time())} s)")

            # 4. the call
            via_name = name[alice_peer.node.node_id]
            print(f"\n4. alice calls {bob_aor} through {via_name}; the SIP ladder:")
            ladder = _Ladder(["alice", via_name, "bob"])
            ladder.where[alice.address] = 0
            ladder.where[tuple(alice_peer.sip_address())] = 1  # type: ignore[index]
            ladder.where[bob.address] = 2
            traces = [
                SipTrace(alice.stack, ladder.sink_for(0)),
                SipTrace(alice_peer.stack, ladder.sink_for(1)),
                SipTrace(bob.stack, ladder.sink_for(2)),
            ]
            t0 = time.perf_counter()
            final, dialog = await alice.call(bob_aor, alice_peer.sip_address(), timeout=10)
            setup_ms = (time.perf_counter() - t0) * 1000
            ok = dialog is not None
            bye_status = None
            if ok:
                await asyncio.wait_for(bob.acked.wait(), 5)
                bye = await alice.hang_up(dialog)
                bye_status = bye.status
                await asyncio.wait_for(bob.hung_up.wait(), 5)
            for trace in traces:
                trace.enabled = False
            for line in ladder.draw():
                print("   " + line)
            print()
            if ok and bye_status == 200:
                print(f"Call answered in {setup_ms:.1f} ms and hung up cleanly; "
                      f"demo took {time.perf_counter() - began:.1f} s.")  # fmt: skip
                return 0
            print(f"The call failed: {final.status} {final.reason}; BYE: {bye_status}")
            return 1
        finally:
            for phone in phones:
                await phone.close()
            for peer in peers:
                await peer.close(leave=False)


def _cmd_demo(args: argparse.Namespace) -> int:
    if not 3 <= args.peers <= 20:
        return _fail("--peers must be between 3 and 20", 2)
    from p2psip.errors import P2PSIPError

    try:
        return asyncio.run(asyncio.wait_for(_demo(args.peers), 60))
    except TimeoutError:
        return _fail("the demo did not finish within 60 s (is the machine overloaded?)", 1)
    except (P2PSIPError, OSError) as exc:
        return _fail(f"the demo failed: {exc}", 1)
    except KeyboardInterrupt:
        return 130


# --- p2psip register / call ---------------------------------------------------------------------------


def _parse_via(text: str) -> tuple[str, int]:
    from p2psip.config import parse_hostport

    hp = parse_hostport(text, "--via", default_port=5060)
    return hp.host, hp.port


def _check_sip_uri(text: str, what: str) -> str:
    from p2psip.errors import ConfigError, ParseError
    from p2psip.uri import URI

    try:
        uri = URI(text)
    except ParseError as exc:
        raise ConfigError(f"{what}: {text!r} is not a SIP URI ({exc})") from None
    if uri.scheme not in ("sip", "sips") or not uri.user:
        raise ConfigError(f"{what}: {text!r} is not a SIP address of record (write sip:user@domain)")
    return text


def _local_ip_toward(host: str) -> str:
    """The local address the kernel would use to reach ``host`` (a UDP connect sends nothing)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, 9))
            return str(probe.getsockname()[0])
        except OSError:
            return "::1" if family == socket.AF_INET6 else "127.0.0.1"


async def _register(args: argparse.Namespace, via: tuple[str, int]) -> dict[str, Any]:
    phone = await _Phone.open(args.uri, host=_local_ip_toward(via[0]))
    try:
        response = await phone.register(
            via, contact=args.contact, expires=args.expires, password=args.password, timeout=args.timeout
        )
    finally:
        await phone.close()
    return {
        "aor": args.uri,
        "via": f"{via[0]}:{via[1]}",
        "status": response.status,
        "reason": response.reason,
        "contacts": [
            {"contact": str(c.uri), "expires": c.expires}
            for c in (response.contacts if response.status == 200 else [])
        ],
    }


def _cmd_register(args: argparse.Namespace) -> int:
    from p2psip.errors import ConfigError, P2PSIPError

    try:
        via = _parse_via(args.via)
        _check_sip_uri(args.uri, "register")
        if args.contact is not None:
            from p2psip.uri import Address

            Address(args.contact)
        if args.expires < 0:
            raise ConfigError("--expires must be 0 or more seconds")
    except P2PSIPError as exc:
        return _fail(str(exc), 2)
    try:
        result = asyncio.run(_register(args, via))
    except TimeoutError:
        return _fail(f"no answer from {args.via} within {args.timeout:g} s", 1)
    except P2PSIPError as exc:
        return _fail(str(exc), 1)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"REGISTER {result['aor']} via {result['via']}: {result['status']} {result['reason']}")
        if result["contacts"]:
            _print_table(["contact", "expires"], [(c["contact"], c["expires"]) for c in result["contacts"]])
    return 0 if result["status"] == 200 else 1


async def _call(
    args: argparse.Namespace, via: tuple[str, int], duration: float, show: Callable[[str], None]
) -> dict[str, Any]:
    """One call through the UserAgent (with ``--play``/``--record`` its audio is p2psip.callaudio's)."""
    import time

    from p2psip.stack import Stack
    from p2psip.transport import Target
    from p2psip.useragent import CallFailed, UserAgent

    local_ip = _local_ip_toward(via[0])
    stack = await Stack.start([f"udp:{'[' + local_ip + ']' if ':' in local_ip else local_ip}:0"])
    ua = UserAgent(stack, args.from_ or "sip:p2psip@invalid", outbound=Target("udp", via[0], via[1]))
    statuses: list[str] = []
    with_audio = bool(args.play or args.record)

    def provisional(response: Any) -> None:
        statuses.append(f"{response.status} {response.reason}")
        show(f"  {response.status} {response.reason}")

    result: dict[str, Any] = {"uri": args.uri, "via": f"{via[0]}:{via[1]}", "answered": False}
    call: Any = None
    try:
        started = time.perf_counter()
        show(f"INVITE {args.uri} via {via[0]}:{via[1]}")
        try:
            if with_audio:
                call = await ua.call(
                    args.uri,
                    play=args.play,
                    record=args.record,
                    timeout=args.timeout,
                    on_provisional=provisional,
                )
            else:
                call = await ua.call(args.uri, timeout=args.timeout, on_provisional=provisional)
            status, reason = call.response.status, call.response.reason
        except CallFailed as failed:  # a failure response, or 408/503 made up for a timeout/transport error
            status, reason = failed.status, failed.reason
        result["setup_ms"] = round((time.perf_counter() - started) * 1000, 1)
        statuses.append(f"{status} {reason}")
        show(f"  {status} {reason}")
        result["responses"] = statuses
        result["status"] = status
        if call is not None:
            result["answered"] = True
            if call.media is not None and call.media.params is not None:
                params = call.media.params
                result["codec"] = params.codec
                show(f"  audio: {params.codec} to {params.remote[0]}:{params.remote[1]}")
            show(f"  call up; hanging up in {duration:g} s")
            try:
                ended = await call.wait_ended(duration)  # the call's requested length, unless they hang up
                show(f"  the call ended: {ended}")
            except TimeoutError:
                bye = await call.bye(timeout=args.timeout)
                result["bye_status"] = bye.status
                show(f"BYE: {bye.status} {bye.reason}")
    finally:
        if call is not None and call.media is not None:
            await call.wait_ended(args.timeout)  # the media is closed (a recording complete) after this
            stats = call.media.session.stats
            result["rtp_sent"] = stats.packets_sent
            result["rtp_received"] = stats.packets_received
            show(f"RTP: {stats.packets_sent} packets sent, {stats.packets_received} received")
        await ua.close()
        await stack.close()
    return result


def _cmd_call(args: argparse.Namespace) -> int:
    from p2psip.errors import ConfigError, P2PSIPError

    try:
        via = _parse_via(args.via)
        _check_sip_uri(args.uri, "call")
        if args.from_:
            _check_sip_uri(args.from_, "--from")
        if (args.duration is not None and args.duration < 0) or args.timeout <= 0:
            raise ConfigError("--duration must be >= 0 and --timeout > 0")
        duration = 1.0 if args.duration is None else args.duration
        if args.play:
            from p2psip.media.sources import WavSource

            wav = WavSource(args.play)  # a missing or unreadable file is a usage error
            wav.close()
            if args.duration is None:
                duration = wav.duration + 0.5  # the whole file, and its last packets' way over
    except P2PSIPError as exc:
        return _fail(str(exc), 2)

    def show(line: str) -> None:
        if not args.json:
            print(line, flush=True)

    try:
        result = asyncio.run(_call(args, via, duration, show))
    except TimeoutError:
        return _fail(f"no final answer within {args.timeout:g} s", 1)
    except P2PSIPError as exc:
        return _fail(str(exc), 1)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0 if result["answered"] else 1


def _add_peer_commands(sub: Any) -> None:
    start = sub.add_parser("start", help="run a peer in the foreground")
    start.add_argument(
        "--listen",
        action="append",
        metavar="[udp:|tcp:|tls:]HOST:PORT",
        help="SIP listener (repeatable; default UDP and TCP on 127.0.0.1:5060)",
    )
    start.add_argument("--overlay", metavar="HOST:PORT", help="overlay address (default 127.0.0.1:7060)")
    start.add_argument("--join", metavar="HOST:PORT", help="a peer of the overlay to join through")
    start.add_argument(
        "--overlay-name", metavar="NAME", help="overlay name (peers of another name are ignored)"
    )
    start.add_argument(
        "--data-dir",
        metavar="DIR",
        help="identity, user keys and control socket (default ~/.local/share/p2psip)",
    )
    start.add_argument("--config", metavar="FILE", help="TOML config holding any of these settings")
    start.add_argument("--script", metavar="FILE", help="a sipapi script run for every request")
    start.add_argument("--scripts", metavar="DIR", help="per-user sipapi scripts")
    start.add_argument(
        "--route",
        action="append",
        metavar="DOMAIN=HOST:PORT",
        help="static next hop for a domain (repeatable)",
    )
    start.add_argument("--dns", action="store_true", help="resolve non-overlay domains with DNS")
    start.add_argument("-v", "--verbose", action="store_true", help="print a SIP trace")
    start.set_defaults(func=_cmd_start)

    for name, helptext, func in (
        ("status", "show a running peer: ring neighbours, fingers, stored entries, counters", _cmd_status),
        ("lookup", "look an AOR up through a running peer", _cmd_lookup),
    ):
        p = sub.add_parser(name, help=helptext)
        if name == "lookup":
            p.add_argument("uri", metavar="SIP-URI")
        p.add_argument("--data-dir", metavar="DIR", help="the running peer's data dir")
        p.add_argument("--config", metavar="FILE", help="take the data dir from this config")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=func)

    register = sub.add_parser("register", help="send one REGISTER for an AOR to a peer")
    register.add_argument("uri", metavar="SIP-URI", help="the address of record, e.g. sip:alice@p2p.example")
    register.add_argument("--via", required=True, metavar="HOST:PORT", help="the peer to register at")
    register.add_argument(
        "--contact", metavar="URI", help="the contact to bind (default: this command's address)"
    )
    register.add_argument("--expires", type=int, default=3600, metavar="S", help="seconds (0 removes)")
    register.add_argument("--password", metavar="P", help="answer a digest challenge with this password")
    register.add_argument("--timeout", type=float, default=10.0, metavar="S", help="give up after S seconds")
    register.add_argument("--json", action="store_true", help="machine-readable output")
    register.set_defaults(func=_cmd_register)

    call = sub.add_parser("call", help="call a SIP URI through a peer, then hang up")
    call.add_argument("uri", metavar="SIP-URI")
    call.add_argument(
        "--via", default="127.0.0.1:5060", metavar="HOST:PORT", help="the peer (default 127.0.0.1:5060)"
    )
    call.add_argument("--from", dest="from_", metavar="SIP-URI", help="the caller's address")
    call.add_argument(
        "--duration",
        type=float,
        metavar="S",
        help="seconds to stay up (default 1, or the length of --play's file)",
    )
    call.add_argument("--timeout", type=float, default=30.0, metavar="S", help="give up after S seconds")
    call.add_argument("--play", metavar="WAV", help="audio to send (a WAV file, any rate)")
    call.add_argument("--record", metavar="WAV", help="where to record the audio received (a WAV file)")
    call.add_argument("--json", action="store_true", help="machine-readable output")
    call.set_defaults(func=_cmd_call)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="p2psip", description="A peer-to-peer SIP node.")
    parser.add_argument("--version", action="version", version=f"p2psip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="show the node at work on this machine")
    demo.add_argument("--peers", type=int, default=5, metavar="N", help="overlay size (3-20, default 5)")
    demo.set_defaults(func=_cmd_demo)
    proxy = sub.add_parser("proxy", help="run a plain SIP proxy (no overlay), like a minimal Kamailio")
    proxy.add_argument(
        "--listen",
        action="append",
        metavar="[udp:|tcp:|tls:]HOST:PORT",
        help="where to listen (repeatable; no prefix = UDP and TCP; default 127.0.0.1:5060)",
    )
    proxy.add_argument("--stateless", action="store_true", help="forward statelessly (RFC 3261 §16.11)")
    proxy.add_argument("--no-record-route", action="store_true", help="do not add Record-Route")
    proxy.add_argument(
        "--recurse",
        action="store_true",
        help="follow 3xx redirects: their Contacts become new branches (RFC 3261 §16.5)",
    )
    proxy.add_argument("--tls-cert", metavar="PEM", help="certificate for tls: (default: self-signed)")
    proxy.add_argument("--tls-key", metavar="PEM", help="key for --tls-cert (default: same file)")
    proxy.add_argument(
        "--tls-ca", metavar="PEM", help="certificates trusted when forwarding over TLS (default: system's)"
    )
    proxy.add_argument(
        "--loop", choices=("auto", "asyncio", "uvloop"), default="auto", help="auto: uvloop if installed"
    )
    proxy.add_argument(
        "--trying-delay",
        type=float,
        default=0.2,
        metavar="S",
        help="send 100 Trying only if the INVITE is not answered within S seconds (0: at once)",
    )
    proxy.add_argument("-v", "--verbose", action="store_true", help="log every decision (slow)")
    proxy.set_defaults(func=_cmd_proxy)
    _add_peer_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(f"p2psip: error: {exc}", file=sys.stderr)
        return 2
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
