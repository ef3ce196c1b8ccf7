"""What every ``p2psip`` command shares: the one-line error, the text table, the data dir and the
argument checks of the phone commands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def fail(message: str, code: int) -> int:
    print(f"p2psip: error: {message}", file=sys.stderr)
    return code


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "  ") -> None:
    """A plain aligned text table (what `status`, `lookup` and `demo` print for humans)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            print(indent + "  ".join("-" * w for w in widths))


def data_dir_of(args: argparse.Namespace) -> Path:
    from p2psip.config import default_data_dir, load_config

    if getattr(args, "data_dir", None):
        return Path(args.data_dir).expanduser()
    if getattr(args, "config", None):
        return load_config(Path(args.config)).data_dir
    return default_data_dir()


def parse_via(text: str) -> tuple[str, int]:
    """``--via HOST:PORT``: an IP address (``localhost`` is 127.0.0.1). Host names are not resolved: a phone
    command that looked one up would wait for DNS, and a typo would look like a peer that does not answer."""
    from p2psip.address import split_hostport

    host, port = split_hostport(text, "--via", default_port=5060, numeric=True)
    assert port is not None
    return host, port


def via_text(via: tuple[str, int]) -> str:
    from p2psip.address import format_hostport

    return format_hostport(*via)


def check_sip_uri(text: str, what: str) -> str:
    from p2psip.errors import ConfigError, ParseError
    from p2psip.uri import URI

    try:
        uri = URI(text)
    except ParseError as exc:
        raise ConfigError(f"{what}: {text!r} is not a SIP URI ({exc})") from None
    if uri.scheme not in ("sip", "sips") or not uri.user:
        raise ConfigError(f"{what}: {text!r} is not a SIP address of record (write sip:user@domain)")
    return text
