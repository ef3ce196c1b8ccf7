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

DEMO_MESSAGE = (
    b"INVITE sip:bob@p2p.example SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-demo-1;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b'From: "Alice" <sip:alice@p2p.example>;tag=1928301774\r\n'
    b"To: <sip:bob@p2p.example>\r\n"
    b"Call-ID: a84b4c76e66710@127.0.0.1\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Contact: <sip:alice@127.0.0.1:5070>\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)


class UsageError(Exception):
    """A bad argument: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _cmd_demo(args: argparse.Namespace) -> int:
    from p2psip.message import Request, parse

    msg = parse(DEMO_MESSAGE)
    assert isinstance(msg, Request)
    print(f"parsed {msg.method} for {msg.uri}")
    print(f"  from {msg.from_} to {msg.to}")
    print(f"  AOR key name: {msg.uri.aor()}")
    print(bytes(msg).decode())
    return 0


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
                tls_cert=args.tls_cert,
                tls_key=args.tls_key,
                verbose=args.verbose,
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
    from p2psip.peer import run_foreground

    try:
        return asyncio.run(run_foreground(config))
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
    path = result.get("path", [])
    print(f"  lookup: {result.get('hops', len(path))} hops: " + " -> ".join(p["id"][:8] for p in path))
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="p2psip", description="A peer-to-peer SIP node.")
    parser.add_argument("--version", action="version", version=f"p2psip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="show the node at work on this machine")
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
    proxy.add_argument("--tls-cert", metavar="PEM", help="certificate for tls: (default: self-signed)")
    proxy.add_argument("--tls-key", metavar="PEM", help="key for --tls-cert (default: same file)")
    proxy.add_argument(
        "--loop", choices=("auto", "asyncio", "uvloop"), default="auto", help="auto: uvloop if installed"
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
