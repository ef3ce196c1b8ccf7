"""The peer commands: ``start`` runs a peer in the foreground, ``status`` and ``lookup`` ask a running one
through its control socket (docs/cli.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from p2psip.cli.common import (
    add_data_dir_options,
    add_listen_options,
    check_sip_uri,
    data_dir_of,
    fail,
    print_table,
    run_server,
)


def _peer_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The ``start`` flags as config settings (None = not given, so the config file's value stays)."""
    return {
        "listen": args.listen,
        "overlay": args.overlay,
        "advertise": args.advertise,
        "turn": args.turn,
        "join": args.join,
        "overlay_name": args.overlay_name,
        "data_dir": args.data_dir,
        "script": args.script,
        "scripts": args.scripts,
        "routes": args.route,
        "overlay_limits": args.overlay_limit,
        "policy": args.policy,
        "ca": args.ca,
        "enrolled_nodes": True if args.enrolled_nodes else None,
        "client": True if args.client else None,
        "dht": args.dht,
        "dns": True if args.dns else None,
        "verbose": True if args.verbose else None,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_ca": args.tls_ca,
        "ws_origins": args.ws_origin,
        "http": args.http,
        "http_tls": True if args.http_tls else None,
        "http_token": args.http_token,
    }


def _cmd_start(args: argparse.Namespace) -> int:
    from p2psip.config import load_config
    from p2psip.errors import ConfigError

    try:
        config = load_config(Path(args.config) if args.config else None, _peer_flags(args))
    except ConfigError as exc:
        return fail(str(exc), 2)
    if config.scripts is not None and not config.scripts.is_dir():
        return fail(
            f"--scripts {config.scripts}: not a directory (create it, then put user@domain.py files in it)", 2
        )
    if config.script is not None and not config.script.is_file():
        return fail(f"--script {config.script}: no such file", 2)
    from p2psip.peer import Peer, run_foreground

    def install_scripts(peer: Peer) -> Any:
        if config.script is None and config.scripts is None:
            return None
        from sipapi.scripts import install

        scripting = install(peer, scripts=config.scripts, script=config.script)
        peer._event("scripts", ", ".join(str(p) for p in (config.scripts, config.script) if p))
        return scripting.close

    return run_server(lambda: asyncio.run(run_foreground(config, extension=install_scripts)))


def _ask(args: argparse.Namespace, cmd: str, **request: Any) -> tuple[int, Any]:
    """Ask the running peer named by ``--data-dir``/``--config``: (0, result), or the exit code after the
    error line (2 for a bad ``--config``, 1 when no peer answers)."""
    from p2psip import control
    from p2psip.errors import ConfigError, P2PSIPError

    try:
        data_dir = data_dir_of(args)
    except ConfigError as exc:
        return fail(str(exc), 2), None
    try:
        return 0, asyncio.run(control.request(data_dir, cmd, **request))
    except P2PSIPError as exc:
        return fail(str(exc), 1), None


def _cmd_status(args: argparse.Namespace) -> int:
    code, status = _ask(args, "status")
    if code:
        return code
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
    if status.get("engine") == "opendht":
        _print_opendht(status["opendht"])
    else:
        _print_ring(status)
    flows = status.get("flows", [])
    routing = "through home peers" if status.get("home_routing", True) else "direct (home routing off)"
    print(f"  flows of phones this peer is home for: {len(flows)}; calls go {routing}")
    if flows:
        print_table(
            ["flow", "outbound", "bindings", "silent s"],
            [
                (f["flow"], "yes" if f["outbound"] else "NAT pings", f["bindings"], f["silent_s"])
                for f in flows[:20]
            ],
            "    ",
        )
    counters = status.get("counters", {})
    if counters:
        print("  counters:")
        print_table(["counter", "value"], sorted(counters.items()), "    ")


def _print_ring(status: dict[str, Any]) -> None:
    """The Chord part of ``status``: reachability, neighbours, fingers, stored entries, disagreements."""
    reach = status.get("reach")
    client = status.get("client")
    if client:
        node = (client.get("node") or "?")[:8]
        print(f"  client peer, attached to {client['attached_to']} ({node}), because: {client['because']}")
        flow = client.get("sip_flow") or {}
        problem = flow.get("problem") or "waiting"
        state = f"Path {flow['path']}" if flow.get("path") else f"not made yet ({problem})"
        print(f"  SIP flow to the attach peer {flow.get('sip') or '?'}: {state}")
    elif reach:
        by = f", probed by {reach['probed_by']}" if reach.get("probed_by") else ""
        print(f"  {reach['mode']} peer at {reach['endpoint']}: {reach['reason']}{by}")
    clients = status.get("clients")
    if clients and not client:
        flows = len(clients.get("sip", []))
        print(f"  attached client peers: {clients.get('overlay', 0)} ({flows} with a SIP flow)")
    pred = status.get("predecessor")
    print(f"  predecessor: {pred['id'] + ' ' + pred['addr'] if pred else '(none)'}")
    print("  successors:")
    print_table(
        ["#", "node", "address"],
        [(i + 1, s["id"], s["addr"]) for i, s in enumerate(status.get("successors", []))],
        "    ",
    )
    fingers = status.get("fingers", [])
    if fingers:
        print("  fingers:")
        print_table(
            ["#", "node", "address"], [(i + 1, f["id"], f["addr"]) for i, f in enumerate(fingers)], "    "
        )
    stored = status.get("stored", [])
    print(f"  stored entries: {sum(s['entries'] for s in stored)} under {len(stored)} keys")
    if stored:
        print_table(
            ["key", "name", "entries", "owner key"],
            [(s["key"], s.get("name") or "", s["entries"], s.get("owner", "")) for s in stored[:20]],
            "    ",
        )
    outvoted = status.get("disagreements", {})
    misroutes = status.get("misroutes", {})
    if outvoted or misroutes:
        print("  neighbours that disagreed (reads they lost, wrong routing answers):")
        rows = [(n, outvoted.get(n, 0), misroutes.get(n, 0)) for n in sorted(set(outvoted) | set(misroutes))]
        print_table(["node", "reads outvoted", "misroutes"], rows, "    ")
    limits = status.get("overlay_limits", {})
    if any(v.get("refused") for v in limits.values()):
        print("  overlay requests refused by the per-source limits:")
        rows = [(k, v["rate"], v["refused"]) for k, v in limits.items()]
        print_table(["kind", "rate", "refused"], rows, "    ")


def _print_opendht(dht: dict[str, Any]) -> None:
    """The OpenDHT part of ``status``: the node, its bootstrap, the nodes it knows, what it keeps alive."""
    state = "connected" if dht.get("connected") else "not connected (no node answers yet)"
    print(
        f"  engine: OpenDHT node {dht.get('node_id')}, bootstrap {dht.get('bootstrap') or '(none)'}: {state}"
    )
    print(
        f"  nodes known: {dht.get('known_nodes', 0)}, answering: {dht.get('good_nodes', 0)}; "
        f"entries kept alive: {dht.get('kept_alive', 0)} (re-put every {dht.get('refresh_s', 0):.0f} s), "
        f"tombstones: {dht.get('tombstones_kept', 0)}"
    )


def _cmd_lookup(args: argparse.Namespace) -> int:
    from p2psip.errors import ConfigError

    try:
        check_sip_uri(args.uri, "lookup")
    except ConfigError as exc:
        return fail(str(exc), 2)
    code, result = _ask(args, "lookup", uri=args.uri)
    if code:
        return code
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        _print_lookup(result)
    return 0 if result.get("bindings") else 1


def _print_lookup(result: dict[str, Any]) -> None:
    print(f"{result['aor']}  key {result['key']}")
    if result.get("engine") == "opendht":
        print(f"  OpenDHT get: {result.get('lookup_ms')} ms (OpenDHT does not say which nodes store it)")
    elif result.get("engine") == "client":
        print(f"  read by the attach peer of this client peer: {result.get('lookup_ms')} ms")
    else:
        responsible = result.get("responsible") or {"id": "?", "addr": "?"}
        print(
            f"  lookup: {result.get('hops')} hop(s) to {responsible['id'][:8]} ({responsible['addr']}), "
            f"the node responsible; {result.get('lookup_ms')} ms with the fetch"
        )
    bindings = result.get("bindings", [])
    if not bindings:
        print("  nobody is registered")
        return
    holders = result.get("holders", [])
    if holders:
        print("  stored at: " + ", ".join(f"{h['id'][:8]} ({h['addr']})" for h in holders))
    print_table(
        ["contact", "expires in", "q", "instance"],
        [(b["contact"], f"{b['expires_in']} s", b.get("q") or "", b.get("instance") or "") for b in bindings],
    )


def _cmd_user_add(args: argparse.Namespace) -> int:
    from p2psip.errors import P2PSIPError
    from p2psip.peer import add_account

    try:
        password = add_account(data_dir_of(args), args.aor, username=args.username)
    except P2PSIPError as exc:
        return fail(str(exc), 2)
    except OSError as exc:
        return fail(f"cannot write the account into {data_dir_of(args)}: {exc.strerror or exc}", 1)
    username = args.username or args.aor.partition(":")[2].partition("@")[0]
    if args.json:
        print(json.dumps({"aor": args.aor, "username": username, "password": password}))
    else:
        print(f"account {args.aor}: user name {username}, password {password}")
        print("(shown once: give it to the phone; REGISTERs for this address now need it)")
    return 0


def _cmd_user_key(args: argparse.Namespace) -> int:
    from p2psip.errors import P2PSIPError
    from p2psip.peer import export_user_key

    try:
        path = export_user_key(data_dir_of(args), args.aor)
    except P2PSIPError as exc:
        return fail(str(exc), 2)
    except OSError as exc:
        return fail(f"cannot write the key into {data_dir_of(args)}: {exc.strerror or exc}", 1)
    if args.json:
        print(json.dumps({"aor": args.aor, "key": str(path), "inbox": str(path.with_suffix(".inbox"))}))
    else:
        print(f"user key of {args.aor}: {path} (inbox key beside it: {path.with_suffix('.inbox').name})")
        print("(copy both into another peer's users/ directory to serve a second device from there)")
    return 0


def add_commands(sub: Any) -> None:
    start = sub.add_parser("start", help="run a peer in the foreground")
    add_listen_options(
        start,
        listen_help="SIP listener (repeatable; default UDP and TCP on 127.0.0.1:5060; ws:/wss: for browsers)",
        tls_ca_help="certificates trusted connecting out over TLS/WSS (default: system)",
    )
    start.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="serve the ring page (/) and the softphone (/phone) here (off by default; loopback advised)",
    )
    start.add_argument("--http-tls", action="store_true", help="serve --http over HTTPS (with --tls-cert)")
    start.add_argument("--http-token", metavar="TOKEN", help="pages token off loopback (default random)")
    start.add_argument(
        "--ws-origin",
        action="append",
        metavar="ORIGIN",
        help="web origin (https://host[:port]) whose pages may use ws:/wss: besides loopback (repeatable)",
    )
    start.add_argument("--overlay", metavar="HOST:PORT", help="overlay address (default 127.0.0.1:7060)")
    start.add_argument(
        "--advertise", metavar="HOST:PORT",
        help="the overlay address other peers reach this one at (a port a NAT router forwards here); "
        "its host is also the SIP address in Path and Record-Route",
    )  # fmt: skip
    start.add_argument("--join", metavar="HOST:PORT", help="a peer of the overlay to join through")
    start.add_argument(
        "--turn", metavar="HOST:PORT",
        help="run a TURN server (UDP) there: relayed candidates for the call audio of phones behind NATs",
    )  # fmt: skip
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
    start.add_argument(
        "--overlay-limit",
        action="append",
        metavar="KIND=RATE",
        help="per-source limit on the overlay port: KIND store, lookup, join or other; RATE like 100/s:500"
        " (rate:burst) or off (repeatable)",
    )
    start.add_argument(
        "--policy",
        metavar="POLICY",
        help="who may write an AOR: first-claim (default: the first user key) or enrolled (a user"
        " certificate of the authority given by --ca; see p2psip enroll)",
    )
    start.add_argument(
        "--dht",
        metavar="ENGINE",
        help="the directory engine: chord (default, our overlay) or opendht (an OpenDHT network; --join"
        " names an OpenDHT bootstrap; needs --policy enrolled)",
    )
    start.add_argument("--ca", metavar="FILE", help="the enrollment authority's public key (its ca.pub)")
    start.add_argument(
        "--enrolled-nodes",
        action="store_true",
        help="admit only peers holding a node certificate of --ca (this peer's: DATA_DIR/node.cert)",
    )
    start.add_argument(
        "--client", action="store_true",
        help="join as a client peer through --join (no ring responsibility; its phones' calls go through"
        " that peer); a peer others cannot reach does so by itself (docs/nat.md)",
    )  # fmt: skip
    start.add_argument("--dns", action="store_true", help="resolve non-overlay domains with DNS")
    start.add_argument("-v", "--verbose", action="store_true", help="print a SIP trace")
    start.set_defaults(func=_cmd_start)

    user = sub.add_parser("user", help="manage accounts of a peer's data dir")
    user_sub = user.add_subparsers(dest="user_command", metavar="ACTION", required=True)
    add = user_sub.add_parser("add", help="create an account (digest) for an AOR and print its password")
    add.add_argument("aor", metavar="SIP-URI", help="the address of record, e.g. sip:alice@p2p.example")
    add.add_argument("--username", metavar="NAME", help="digest user name (default: the AOR's user part)")
    add_data_dir_options(
        add, data_dir_help="the peer's data dir (default ~/.local/share/p2psip)", config=False
    )
    add.set_defaults(func=_cmd_user_add)
    key = user_sub.add_parser("key", help="write an AOR's user key (and inbox key) as files, to copy them")
    key.add_argument("aor", metavar="SIP-URI", help="the address of record, e.g. sip:alice@p2p.example")
    add_data_dir_options(
        key, data_dir_help="the peer's data dir (default ~/.local/share/p2psip)", config=False
    )
    key.set_defaults(func=_cmd_user_key)

    for name, helptext, func in (
        ("status", "show a running peer: ring (or OpenDHT node), stored entries, counters", _cmd_status),
        ("lookup", "look an AOR up through a running peer", _cmd_lookup),
    ):
        p = sub.add_parser(name, help=helptext)
        if name == "lookup":
            p.add_argument("uri", metavar="SIP-URI")
        add_data_dir_options(p, data_dir_help="the running peer's data dir", config=True)
        p.set_defaults(func=func)
