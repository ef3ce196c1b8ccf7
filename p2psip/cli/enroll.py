"""``p2psip enroll``: the enrollment authority of an overlay of the ``enrolled`` policy (docs/security.md).

``init DIR`` makes the authority's key pair (``DIR/ca.key``, private, 0600; ``DIR/ca.pub``, the public key
in hex, what every peer's ``--ca FILE`` names). ``user AOR`` and ``node`` sign certificates into a peer's
data dir: the user key of the AOR (``users/<name>.key``, created if new) gets ``users/<name>.cert``, the
node key gets ``node.cert``. The authority's private key never leaves the machine it runs on: with
``--ca-key`` the command runs there (the peer's data dir with it); ``serve DIR`` runs the authority as a
small HTTP service instead, which ``user``/``node`` ask with ``--server URL --token T`` (one-time tokens
from ``token``), so the peer's keys stay on the peer (``p2psip.cli.enroll_service``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from p2psip.cli.common import add_json_option, fail

CA_KEY = "ca.key"
CA_PUB = "ca.pub"


def _cmd_init(args: argparse.Namespace) -> int:
    from overlay.identity import KeyPair

    directory = Path(args.dir).expanduser()
    key_file, pub_file = directory / CA_KEY, directory / CA_PUB
    if key_file.exists():
        return fail(f"{key_file} exists already (an authority is made once; keep its key safe)", 2)
    try:
        ca = KeyPair.generate()
        ca.save(key_file)
        pub_file.write_text(ca.public_key.hex() + "\n")
    except OSError as exc:
        return fail(f"cannot write the authority into {directory}: {exc.strerror or exc}", 1)
    if args.json:
        print(
            json.dumps({"ca_key": str(key_file), "ca_pub": str(pub_file), "public_key": ca.public_key.hex()})
        )
    else:
        print(f"enrollment authority: private key {key_file} (keep it here), public key {pub_file}")
        print(f"start every peer with --policy enrolled --ca {pub_file}")
    return 0


def _load_ca(args: argparse.Namespace) -> Any:
    from overlay.identity import KeyPair

    return KeyPair.load(Path(args.ca_key).expanduser())


def _report(args: argparse.Namespace, what: str, cert: Any, where: str) -> None:
    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(cert.not_after))
    if args.json:
        print(
            json.dumps(
                {"kind": cert.kind, "subject": cert.subject, "not_after": cert.not_after, "file": where}
            )
        )
    else:
        print(f"{what} {cert.subject} enrolled until {until}: {where}")


def _signer(args: argparse.Namespace, kind: str) -> Any:
    """Who signs: the authority's key (``--ca-key``) or the enrollment service (``--server`` and
    ``--token``); a ``Signer`` for p2psip.peer, or the exit code after a one-line error."""
    from overlay.identity import enroll_node, enroll_user

    if bool(args.ca_key) == bool(args.server):
        return fail("give --ca-key FILE (the authority's key) or --server URL --token T (its service)", 2)
    if args.server:
        if not args.token:
            return fail("--server needs --token (from p2psip enroll token at the authority)", 2)
        from p2psip.cli.enroll_service import request_certificate

        return lambda subject, key: request_certificate(args.server, args.token, kind, subject, key)
    try:
        ca = _load_ca(args)
    except Exception as exc:  # OverlayError (a bad key file) or OSError
        return fail(f"--ca-key {args.ca_key}: {exc}", 2)
    if kind == "user":
        return lambda subject, key: enroll_user(ca, subject, key, days=args.days)
    return lambda _subject, key: enroll_node(ca, key, days=args.days)


def _cmd_user(args: argparse.Namespace) -> int:
    from p2psip.config import default_data_dir
    from p2psip.errors import P2PSIPError
    from p2psip.peer import USERS_DIR, UserKeys, enroll_user_with

    if not 0 < args.days <= 3650:
        return fail("--days is 1 to 3650", 2)
    sign = _signer(args, "user")
    if isinstance(sign, int):
        return sign
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    try:
        cert = enroll_user_with(data_dir, args.aor, sign)
    except P2PSIPError as exc:
        return fail(str(exc), 2 if not args.server else 1)
    except OSError as exc:
        return fail(f"cannot write into {data_dir}: {exc.strerror or exc}", 1)
    where = UserKeys(data_dir / USERS_DIR).path_for(cert.subject).with_suffix(".cert")
    _report(args, "user", cert, str(where))
    return 0


def _cmd_node(args: argparse.Namespace) -> int:
    from overlay.identity import NODE_CERT_FILE
    from p2psip.config import default_data_dir
    from p2psip.errors import P2PSIPError
    from p2psip.peer import enroll_node_with

    if not 0 < args.days <= 3650:
        return fail("--days is 1 to 3650", 2)
    sign = _signer(args, "node")
    if isinstance(sign, int):
        return sign
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    try:
        cert = enroll_node_with(data_dir, sign)
    except P2PSIPError as exc:
        return fail(str(exc), 2 if not args.server else 1)
    except OSError as exc:
        return fail(f"cannot write into {data_dir}: {exc.strerror or exc}", 1)
    _report(args, "node", cert, str(data_dir / NODE_CERT_FILE))
    return 0


def _cmd_token(args: argparse.Namespace) -> int:
    from p2psip.cli.enroll_service import issue_token
    from p2psip.errors import P2PSIPError

    if bool(args.aor) == bool(args.node):
        return fail("name what the token enrolls: a SIP-URI (a user) or --node", 2)
    if not 0 < args.valid_days <= 365:
        return fail("--valid-days is up to 365", 2)
    ca_dir = Path(args.ca_dir).expanduser()
    if not (ca_dir / CA_KEY).exists():
        return fail(f"--ca-dir {ca_dir}: no {CA_KEY} there (p2psip enroll init makes it)", 2)
    kind = "node" if args.node else "user"
    try:
        token = issue_token(ca_dir, kind, args.aor or "", now=time.time(), days=args.valid_days)
    except P2PSIPError as exc:
        return fail(str(exc), 2)
    except OSError as exc:
        return fail(f"cannot write into {ca_dir}: {exc.strerror or exc}", 1)
    if args.json:
        print(json.dumps({"token": token, "kind": kind, "subject": args.aor or ""}))
    else:
        print(token)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from p2psip.address import parse_hostport
    from p2psip.cli.enroll_service import EnrollmentDesk, serve
    from p2psip.errors import ConfigError
    from p2psip.run import until_stopped

    if not 0 < args.days <= 3650:
        return fail("--days is 1 to 3650", 2)
    try:
        where = parse_hostport(args.listen, "--listen")
    except ConfigError as exc:
        return fail(str(exc), 2)
    ca_dir = Path(args.dir).expanduser()
    try:
        ca = _load_ca(argparse.Namespace(ca_key=str(ca_dir / CA_KEY)))
    except Exception as exc:  # OverlayError (a bad key file) or OSError
        return fail(f"{ca_dir / CA_KEY}: {exc}", 2)
    desk = EnrollmentDesk(ca, ca_dir, days=args.days)

    async def run() -> int:
        try:
            server = await serve(desk, where.host, where.port, time.time)
        except OSError as exc:
            return fail(f"--listen {args.listen}: cannot listen: {exc.strerror or exc}", 1)
        host, port = server.sockets[0].getsockname()[:2]

        def ready() -> None:
            print(
                f"enrollment service for {ca_dir / CA_PUB} on http://{host}:{port}/enroll ready", flush=True
            )

        try:
            await until_stopped(ready)
        finally:
            server.close()
            await server.wait_closed()
        print(
            f"stopped: {desk.counts['issued']} certificates issued, {desk.counts['refused']} refused",
            flush=True,
        )
        return 0

    return asyncio.run(run())


def add_commands(sub: Any) -> None:
    enroll = sub.add_parser("enroll", help="the enrollment authority: make it, enroll users and nodes, serve")
    actions = enroll.add_subparsers(dest="enroll_command", metavar="ACTION", required=True)
    init = actions.add_parser("init", help="make the authority's key pair in DIR (ca.key, ca.pub)")
    init.add_argument("dir", metavar="DIR")
    add_json_option(init)
    init.set_defaults(func=_cmd_init)
    for name, helptext, func in (
        ("user", "sign a user certificate for AOR into a peer's data dir", _cmd_user),
        ("node", "sign a node certificate for a peer's node key (its data dir)", _cmd_node),
    ):
        p = actions.add_parser(name, help=helptext)
        if name == "user":
            p.add_argument(
                "aor", metavar="SIP-URI", help="the address of record, e.g. sip:alice@corp.example"
            )
        p.add_argument("--ca-key", metavar="FILE", help="the authority's ca.key (on this machine)")
        p.add_argument("--server", metavar="URL", help="or the authority's service (p2psip enroll serve)")
        p.add_argument("--token", metavar="T", help="the one-time token for --server (p2psip enroll token)")
        p.add_argument(
            "--data-dir", metavar="DIR", help="the peer's data dir (default ~/.local/share/p2psip)"
        )
        p.add_argument("--days", type=float, default=365.0, help="validity in days (default 365)")
        add_json_option(p)
        p.set_defaults(func=func)
    token = actions.add_parser("token", help="a one-time token the service enrolls one user or node for")
    token.add_argument("aor", metavar="SIP-URI", nargs="?", help="the user's address of record")
    token.add_argument("--node", action="store_true", help="a token for a node certificate instead")
    token.add_argument("--ca-dir", metavar="DIR", required=True, help="the authority's DIR (enroll init)")
    token.add_argument("--valid-days", type=float, default=7.0, help="how long it may be used (default 7)")
    add_json_option(token)
    token.set_defaults(func=_cmd_token)
    serve = actions.add_parser("serve", help="serve enrollments over HTTP (POST /enroll) for tokens")
    serve.add_argument("dir", metavar="DIR", help="the authority's DIR (ca.key, tokens.json)")
    serve.add_argument(
        "--listen", metavar="HOST:PORT", required=True, help="where to serve, e.g. 127.0.0.1:7443"
    )
    serve.add_argument("--days", type=float, default=365.0, help="validity of what it signs (default 365)")
    serve.set_defaults(func=_cmd_serve)
