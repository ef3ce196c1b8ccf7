"""``p2psip proxy``: a stand-alone SIP proxy (no overlay), forwarding by Route and Request-URI."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from p2psip.workers import Ready, WorkerSlot

from p2psip.cli.common import add_listen_options, fail, run_server


def _cmd_proxy(args: argparse.Namespace) -> int:
    """``p2psip proxy``: a stand-alone SIP proxy (no overlay), forwarding by Route and Request-URI."""
    import asyncio

    from p2psip.address import ListenSpec
    from p2psip.errors import ConfigError
    from p2psip.run import serve_proxy

    workers = args.workers
    listen = args.listen or (["127.0.0.1:5060"] if workers == 1 else ["udp:127.0.0.1:5060"])
    try:
        for spec in listen:
            ListenSpec.parse(spec)
        if workers != 1:
            from p2psip.workers import check_workers

            check_workers(workers, listen)
        if args.tls_key and not args.tls_cert:
            raise ConfigError("--tls-key needs --tls-cert")
        if args.recurse and args.stateless:
            raise ConfigError("--recurse needs the stateful proxy (a stateless one cannot see the 3xx)")
    except ConfigError as exc:
        return fail(str(exc), 2)
    if args.verbose:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    def ready(stack: object) -> None:
        from p2psip.stack import Stack

        assert isinstance(stack, Stack)
        where = ", ".join(stack.addresses())
        print(f"p2psip proxy ({mode}) listening on {where}", flush=True)

    run: object = asyncio.run
    if args.loop in ("auto", "uvloop"):
        try:
            import uvloop  # type: ignore[import-not-found,unused-ignore]

            run = uvloop.run
        except ImportError:
            if args.loop == "uvloop":
                return fail("--loop uvloop: uvloop is not installed", 2)
    mode = "stateless" if args.stateless else "stateful"

    def serve(
        listen: Sequence[str], ready: Callable[[object], None], worker: WorkerSlot | None
    ) -> dict[str, int]:
        return run(  # type: ignore[operator,no-any-return]
            serve_proxy(
                listen,
                stateless=args.stateless,
                record_route=not args.no_record_route,
                recurse=args.recurse,
                tls_cert=args.tls_cert,
                tls_key=args.tls_key,
                tls_ca=args.tls_ca,
                verbose=args.verbose,
                trying_delay=args.trying_delay,
                ready=ready,
                worker=worker,
            )
        )

    def serve_all() -> int:
        if workers == 1:
            stats = serve(listen, ready, None)
        else:
            from p2psip.workers import Supervisor

            # Forked before any event loop: each worker runs the proxy above; the parent supervises.
            def run_worker(slot: WorkerSlot, listen: Sequence[str], report: Ready) -> dict[str, int]:
                return serve(listen, lambda stack: report(stack.addresses()), slot)  # type: ignore[attr-defined]

            stats = Supervisor(workers, listen, run_worker).serve(
                lambda addresses: print(
                    f"p2psip proxy ({mode}, {workers} workers) listening on {', '.join(addresses)}",
                    flush=True,
                )
            )
        summary = " ".join(f"{k}={v}" for k, v in stats.items() if v)
        print(f"p2psip proxy stopped: {summary}", file=sys.stderr)
        return 0

    return run_server(serve_all)


def add_commands(sub: Any) -> None:
    proxy = sub.add_parser("proxy", help="run a plain SIP proxy (no overlay), like a minimal Kamailio")
    add_listen_options(
        proxy,
        listen_help="where to listen (repeatable; no prefix = UDP and TCP; default 127.0.0.1:5060)",
        tls_ca_help="certificates trusted when forwarding over TLS (default: system's)",
    )
    proxy.add_argument("--stateless", action="store_true", help="forward statelessly (RFC 3261 §16.11)")
    proxy.add_argument("--no-record-route", action="store_true", help="do not add Record-Route")
    proxy.add_argument(
        "--recurse",
        action="store_true",
        help="follow 3xx redirects: their Contacts become new branches (RFC 3261 §16.5)",
    )
    proxy.add_argument(
        "--loop", choices=("auto", "asyncio", "uvloop"), default="auto", help="auto: uvloop if installed"
    )
    proxy.add_argument(
        "--trying-delay",
        type=float,
        default=0.2,
        metavar="S",
        help="send 100 Trying only if the INVITE is not answered within S seconds (0: at once)",
    )
    proxy.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="N worker processes sharing the UDP port (udp: listeners only; default 1)",
    )
    proxy.add_argument("-v", "--verbose", action="store_true", help="log every decision (slow)")
    proxy.set_defaults(func=_cmd_proxy)
