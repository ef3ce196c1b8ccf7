"""``p2psip demo``: an overlay of N peers on this machine, two phones, a lookup and a call drawn as a SIP
ladder."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2psip.cli.common import fail, print_table
from p2psip.cli.phone import close_phone, open_phone


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


async def _demo(peer_count: int, keep: bool = False) -> int:
    """The demo; with ``keep``, the overlay then stays up until Ctrl-C so a person can open the ring page
    and the softphone (which registers over P1's WebSocket listener)."""
    import tempfile
    import time

    from overlay.localring import quick_node_config, wait_until_consistent
    from p2psip.config import HostPort, ListenSpec, PeerConfig
    from p2psip.peer import Peer
    from p2psip.trace import SipTrace
    from p2psip.useragent import CallFailed, IncomingCall, UserAgent

    began = time.perf_counter()
    alice_aor, bob_aor = "sip:alice@p2p.example", "sip:bob@p2p.example"
    print(f"p2psip demo: {peer_count} peers on 127.0.0.1 form an overlay; no server anywhere.\n")
    peers: list[Peer] = []
    phones: list[UserAgent] = []
    with tempfile.TemporaryDirectory(prefix="p2psip-demo-") as tmp:
        try:
            # 1. the overlay
            print("1. Starting the peers (each: an overlay node + a SIP registrar/proxy)")
            for i in range(peer_count):
                listen = [ListenSpec("udp", "127.0.0.1", 0)]
                if i == 0:  # P1 also serves the ring page and the browser softphone (over WebSocket)
                    listen = [ListenSpec(None, "127.0.0.1", 0), ListenSpec("ws", "127.0.0.1", 0)]
                config = PeerConfig(
                    listen=listen,
                    overlay=HostPort("127.0.0.1", 0),
                    join=HostPort(*peers[0].overlay_address) if peers else None,
                    overlay_name="p2psip-demo",
                    data_dir=Path(tmp) / f"P{i + 1}",
                    cache_ttl=0.0,
                    http=HostPort("127.0.0.1", 0) if i == 0 else None,
                )
                peers.append(await Peer.start(config, node_config=quick_node_config()))
            name = {p.node.node_id: f"P{i + 1}" for i, p in enumerate(peers)}
            print_table(
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
            settle = await wait_until_consistent([p.node for p in peers], timeout=15)
            ring = sorted(peers, key=lambda p: p.node.node_id)
            order = " -> ".join(name[p.node.node_id] for p in ring)
            first = name[ring[0].node.node_id]
            print(f"   ring (by node id): {order} -> {first}  (settled in {settle:.1f} s)")
            print(f"   ring page (live, in a browser): {peers[0].web.url}\n", flush=True)

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
            answered: list[IncomingCall] = []

            def answer(incoming: IncomingCall) -> None:
                incoming.ring()
                incoming.accept()
                answered.append(incoming)

            alice = await open_phone(alice_aor, via=alice_peer.sip_address())
            bob = await open_phone(bob_aor, via=bob_peer.sip_address(), on_call=answer)
            phones += [alice, bob]
            print("2. Registering two users at different peers")
            for who, phone, peer in (("alice", alice, alice_peer), ("bob", bob, bob_peer)):
                try:
                    response = await phone.register("sip:p2p.example", expires=600, refresh=False)
                except CallFailed as failed:
                    print(f"   {who}'s REGISTER failed: {failed.status} {failed.reason}")
                    return 1
                pname = name[peer.node.node_id]
                host, port = phone.stack.local_address("udp")
                print(f"   {who}'s phone sip:{who}@{host}:{port} -> REGISTER {phone.aor} at {pname}: "
                      f"{response.status} {response.reason}")  # fmt: skip
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
            print_table(["AOR", "key", "stored at"], rows, "   ")

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
            # bob's home peer (the one that took his REGISTER) relays the call to him: its own column
            columns = [("alice", alice.stack), (via_name, alice_peer.stack)]
            if bob_peer is not alice_peer:
                columns.append((name[bob_peer.node.node_id], bob_peer.stack))
            columns.append(("bob", bob.stack))
            ladder = _Ladder([label for label, _ in columns])
            traces = []
            for column, (_, stack) in enumerate(columns):
                for transport in ("udp", "tcp"):
                    for address in stack.transport.listening.get(transport, []):
                        ladder.where[tuple(address)] = column  # type: ignore[index]
                traces.append(SipTrace(stack, ladder.sink_for(column)))
            t0 = time.perf_counter()
            failure = ""
            bye_status = None
            try:
                call = await alice.call(bob_aor, timeout=10)
                setup_ms = (time.perf_counter() - t0) * 1000
                await asyncio.wait_for(answered[0].confirmed.wait(), 5)  # bob has the ACK
                bye = await call.bye(timeout=10)
                bye_status = bye.status
                await answered[0].wait_ended(5)  # bob has the BYE
            except CallFailed as failed:
                failure = f"{failed.status} {failed.reason}"
            for trace in traces:
                trace.enabled = False
            for line in ladder.draw():
                print("   " + line)
            print()
            if not failure and bye_status == 200:
                print(f"Call answered in {setup_ms:.1f} ms and hung up cleanly; "
                      f"demo took {time.perf_counter() - began:.1f} s.")  # fmt: skip
                if keep:
                    web = peers[0].web
                    print(f"\n--keep: the overlay stays up until Ctrl-C. Ring page: {web.url}  softphone: "
                          f"{web.origin}/phone (register sip:carol@p2p.example, call sip:bob@p2p.example)",
                          flush=True)  # fmt: skip
                    await asyncio.Event().wait()
                return 0
            print(f"The call failed: {failure}; BYE: {bye_status}")
            return 1
        finally:
            for phone in phones:
                await close_phone(phone)
            for peer in peers:
                await peer.close(leave=False)


def _cmd_demo(args: argparse.Namespace) -> int:
    if not 3 <= args.peers <= 20:
        return fail("--peers must be between 3 and 20", 2)
    from p2psip.errors import P2PSIPError

    try:
        if args.keep:  # up until Ctrl-C: no time bound
            return asyncio.run(_demo(args.peers, keep=True))
        return asyncio.run(asyncio.wait_for(_demo(args.peers), 60))
    except TimeoutError:
        return fail("the demo did not finish within 60 s (is the machine overloaded?)", 1)
    except (P2PSIPError, OSError) as exc:
        return fail(f"the demo failed: {exc}", 1)
    except KeyboardInterrupt:
        return 0 if args.keep else 130


def add_commands(sub: Any) -> None:
    demo = sub.add_parser("demo", help="show the node at work on this machine")
    demo.add_argument("--peers", type=int, default=5, metavar="N", help="overlay size (3-20, default 5)")
    demo.add_argument(
        "--keep", action="store_true", help="leave the overlay up (ring page, softphone) until Ctrl-C"
    )
    demo.set_defaults(func=_cmd_demo)
