"""``p2psip enroll``: the enrollment authority of an overlay of the ``enrolled`` policy (docs/security.md).

``init DIR`` makes the authority's key pair (``DIR/ca.key``, private, 0600; ``DIR/ca.pub``, the public key
in hex, what every peer's ``--ca FILE`` names). ``user AOR`` and ``node`` sign certificates into a peer's
data dir: the user key of the AOR (``users/<name>.key``, created if new) gets ``users/<name>.cert``, the
node key gets ``node.cert``. The authority's private key never leaves the machine it runs on.
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


def _cmd_user(args: argparse.Namespace) -> int:
    from overlay.errors import OverlayError
    from p2psip.config import default_data_dir
    from p2psip.errors import P2PSIPError
    from p2psip.peer import USERS_DIR, UserKeys, enroll_user_into

    if not 0 < args.days <= 3650:
        return fail("--days is 1 to 3650", 2)
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    try:
        cert = enroll_user_into(data_dir, _load_ca(args), args.aor, days=args.days)
    except (OverlayError, P2PSIPError) as exc:
        return fail(str(exc), 2)
    except OSError as exc:
        return fail(f"cannot write into {data_dir}: {exc.strerror or exc}", 1)
    where = UserKeys(data_dir / USERS_DIR).path_for(cert.subject).with_suffix(".cert")
    _report(args, "user", cert, str(where))
    return 0


def _cmd_node(args: argparse.Namespace) -> int:
    from overlay.errors import OverlayError
    from overlay.identity import NODE_CERT_FILE
    from p2psip.config import default_data_dir
    from p2psip.peer import enroll_node_into

    if not 0 < args.days <= 3650:
        return fail("--days is 1 to 3650", 2)
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    try:
        cert = enroll_node_into(data_dir, _load_ca(args), days=args.days)
    except OverlayError as exc:
        return fail(str(exc), 2)
    except OSError as exc:
        return fail(f"cannot write into {data_dir}: {exc.strerror or exc}", 1)
    _report(args, "node", cert, str(data_dir / NODE_CERT_FILE))
    return 0


def add_commands(sub: Any) -> None:
    enroll = sub.add_parser("enroll", help="the enrollment authority: make it, enroll users and nodes")
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
        p.add_argument("--ca-key", metavar="FILE", required=True, help="the authority's ca.key")
        p.add_argument(
            "--data-dir", metavar="DIR", help="the peer's data dir (default ~/.local/share/p2psip)"
        )
        p.add_argument("--days", type=float, default=365.0, help="validity in days (default 365)")
        add_json_option(p)
        p.set_defaults(func=func)
