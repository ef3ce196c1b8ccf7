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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="p2psip", description="A peer-to-peer SIP node.")
    parser.add_argument("--version", action="version", version=f"p2psip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="show the node at work on this machine")
    demo.set_defaults(func=_cmd_demo)
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
