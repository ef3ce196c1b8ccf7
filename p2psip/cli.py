"""The ``p2psip`` command.

Sub-commands are added as the layers they need exist; see docs/cli.md. Usage errors print one line and
exit 2, runtime failures exit 1, so scripts can tell a typo from a network problem.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

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
