"""The ``p2psip`` argument parser and entry point: each command family adds its sub-commands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from p2psip import __version__
from p2psip.cli import call, demo, enroll, message, peer, proxy


class UsageError(Exception):
    """A bad argument: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="p2psip", description="A peer-to-peer SIP node.")
    parser.add_argument("--version", action="version", version=f"p2psip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo.add_commands(sub)
    proxy.add_commands(sub)
    peer.add_commands(sub)
    enroll.add_commands(sub)
    call.add_commands(sub)
    message.add_commands(sub)
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
