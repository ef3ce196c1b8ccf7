"""What every ``p2psip`` command shares: the one-line error, the text table, the data dir and the
argument checks of the phone commands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def fail(message: str, code: int) -> int:
    print(f"p2psip: error: {message}", file=sys.stderr)
    return code


def run_server(serve: Callable[[], int]) -> int:
    """Run a command that serves until stopped (``start``, ``proxy``) and give its exit code. A
    ConfigError found while starting (a port taken, a bad key file...) is a usage error: one line, exit
    2. Ctrl-C before the command's own SIGINT handling is in place is exit 130 (128 + SIGINT), as a shell
    expects and as an interrupted ``call`` says; once it is in place, a stop is a clean exit 0."""
    from p2psip.errors import ConfigError

    try:
        return serve()
    except ConfigError as exc:
        return fail(str(exc), 2)
    except KeyboardInterrupt:
        return 130


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


def check_phone_args(args: argparse.Namespace, command: str) -> tuple[str, int]:
    """The checks every phone command (``register``, ``call``, ``message``) makes of the options
    :func:`add_phone_options` gave it; returns ``--via`` as (host, port). Raises ConfigError."""
    from p2psip.errors import ConfigError

    via = parse_via(args.via)
    check_sip_uri(args.uri, command)
    if getattr(args, "from_", None):
        check_sip_uri(args.from_, "--from")
    if args.timeout <= 0:
        raise ConfigError("--timeout must be more than 0 seconds")
    return via


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


# ------------------------------------------------------------------------- options several commands take

LISTEN_METAVAR = "[udp:|tcp:|tls:|ws:|wss:]HOST:PORT"


def add_listen_options(parser: argparse.ArgumentParser, *, listen_help: str, tls_ca_help: str) -> None:
    """``--listen`` (repeatable) and the TLS files of ``start`` and ``proxy``: one spelling for both."""
    parser.add_argument("--listen", action="append", metavar=LISTEN_METAVAR, help=listen_help)
    parser.add_argument("--tls-cert", metavar="PEM", help="certificate for tls:/wss: (default: self-signed)")
    parser.add_argument("--tls-key", metavar="PEM", help="key for --tls-cert (default: same file)")
    parser.add_argument("--tls-ca", metavar="PEM", help=tls_ca_help)


def add_phone_options(
    parser: argparse.ArgumentParser,
    *,
    timeout: float,
    sender: str | None,
    via_help: str = "the peer (default 127.0.0.1:5060)",
    via_required: bool = False,
) -> None:
    """What the phone commands (``register``, ``call``, ``message``) share: the AOR, ``--via``, the
    sender's ``--from`` (``sender`` is its help; None: no such option), ``--timeout`` and ``--json``."""
    parser.add_argument("uri", metavar="SIP-URI", help="the address of record, e.g. sip:bob@p2p.example")
    if via_required:
        parser.add_argument("--via", required=True, metavar="HOST:PORT", help=via_help)
    else:
        parser.add_argument("--via", default="127.0.0.1:5060", metavar="HOST:PORT", help=via_help)
    if sender is not None:
        parser.add_argument("--from", dest="from_", metavar="SIP-URI", help=sender)
    parser.add_argument("--timeout", type=float, default=timeout, metavar="S", help="give up after S seconds")
    add_json_option(parser)


def add_data_dir_options(parser: argparse.ArgumentParser, *, data_dir_help: str, config: bool) -> None:
    """``--data-dir`` (and ``--config`` to take it from) and ``--json`` of the commands that talk to a
    peer's data dir (``status``, ``lookup``, ``user add``)."""
    parser.add_argument("--data-dir", metavar="DIR", help=data_dir_help)
    if config:
        parser.add_argument("--config", metavar="FILE", help="take the data dir from this config")
    add_json_option(parser)


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")
