"""Kamailio as a child process: three small configurations and a runner that always cleans up.

Kamailio is the reference SIP proxy our proxy is compared with and must interoperate with. The configs are
minimal on purpose, each one showing one role:

- ``stateful_config``: a transaction-stateful proxy (``tm``'s ``t_relay``) with Record-Route — the
  configuration the benchmark compares our stateful proxy against;
- ``stateless_config``: stateless forwarding (``forward``), the fastest a proxy can be;
- ``registrar_config``: a registrar with digest authentication (``auth``'s ``pv_auth_check`` with
  passwords written into the config, so no database is needed) and an in-memory location table
  (``usrloc`` with ``db_mode`` 0); it proxies INVITEs to registered users, to static domain routes, and to
  IP-literal Request-URIs, and can challenge INVITEs from its users with 407.

Each configuration can also listen on TLS (``tls=KamailioTLS(port, certificate, private_key, ca_list)``,
which needs Debian's ``kamailio-tls-modules``: ``tls.so``); static domain routes can send over TLS
(``DomainRoute(..., transport="tls")``).

``Kamailio`` runs ``kamailio -f CFG -DD -E -m SHM -M 16 -Y RUNDIR -P PIDFILE`` in the foreground; on exit it
sends SIGTERM, waits, and SIGKILLs the worker children that survived (their PIDs are collected first).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .procs import ChildError, children_of, cpu_seconds, stop, wait_for_ports

MODULES = "/usr/lib/x86_64-linux-gnu/kamailio/modules/"
TLS_MODULE = Path(MODULES) / "tls.so"


def has_tls_module() -> bool:
    """Whether Kamailio's TLS module is installed (Debian ships it apart: ``kamailio-tls-modules``)."""
    return TLS_MODULE.is_file()


@dataclass(frozen=True)
class KamailioTLS:
    """Kamailio's TLS side: a ``tls:`` listener on ``port`` (TLS is over TCP, so it cannot share the
    TCP port) presenting ``certificate``/``private_key`` (PEM files, absolute paths). When Kamailio
    connects out over TLS it checks the server's certificate against ``ca_list`` if ``verify`` (it refuses
    an unverified peer); with ``verify=False`` it accepts any. As a server it asks clients for a
    certificate only with ``verify_clients`` (mutual TLS: then a client must show one ``ca_list`` trusts).
    """

    port: int
    certificate: str
    private_key: str
    ca_list: str | None = None
    verify: bool = True
    verify_clients: bool = False

    def config(self) -> str:
        """The ``tls`` module and its parameters, for after ``mpath`` in a Kamailio config (the core's
        ``enable_tls`` and ``listen=tls:`` lines are written by ``_header``). Kamailio's module parameters
        apply to its server and client sides alike, so the two are written as the ``[server:default]``
        and ``[client:default]`` profiles of a ``tls.cfg`` beside the certificate."""
        for path in (self.certificate, self.private_key, self.ca_list or ""):
            if '"' in path or "\n" in path or "]" in path:
                raise ValueError(f"unsafe character in TLS file name {path!r}")
        if (self.verify or self.verify_clients) and not self.ca_list:
            raise ValueError("verifying needs a ca_list (Kamailio verifies nothing against an empty one)")

        def profile(section: str, verify: bool) -> str:
            yes = "yes" if verify else "no"
            lines = [
                f"[{section}:default]",
                "method = TLSv1.2+",
                f"certificate = {self.certificate}",
                f"private_key = {self.private_key}",
                f"verify_certificate = {yes}",
                f"require_certificate = {yes}",
            ]
            if self.ca_list:
                lines.append(f"ca_list = {self.ca_list}")
            return "\n".join(lines) + "\n"

        tls_cfg = Path(self.certificate).with_name(f"kamailio-tls-{self.port}.cfg")
        tls_cfg.write_text(profile("server", self.verify_clients) + "\n" + profile("client", self.verify))
        return f'loadmodule "tls.so"\nmodparam("tls", "config", "{tls_cfg}")\n'


def _header(
    host: str,
    port: int,
    children: int,
    transports: tuple[str, ...],
    tls: KamailioTLS | None = None,
    *,
    extra_listens: tuple[str, ...] = (),
) -> str:
    """Global settings every Kamailio here shares: no DNS, logs on stderr, big UDP buffers, the listens,
    and the core modules; each config adds its own modules and routes below."""
    listens = "\n".join([*(f"listen={t}:{host}:{port}" for t in transports), *extra_listens])
    if tls is not None:
        listens += f"\nenable_tls=yes\nlisten=tls:{host}:{tls.port}"
    return f"""#!KAMAILIO
debug=1
log_stderror=yes
memdbg=5
memlog=5
children={children}
tcp_children={children}
auto_aliases=no
dns=no
rev_dns=no
use_dns_cache=no
tcp_connection_lifetime=3605
# UDP receive buffers up to 4 MB (the kernel's rmem_max here), like sipp and our proxy: a burst must
# not be lost in the kernel while a worker waits for a CPU on a loaded machine
maxbuffer=4194304
{listens}
mpath="{MODULES}"
loadmodule "pv.so"
loadmodule "sl.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"
loadmodule "siputils.so"
""" + (tls.config() if tls is not None else "")


def usrloc_header(
    host: str, port: int, *, domain: str, children: int = 2, modules: tuple[str, ...] = ()
) -> str:
    """The global part of Kamailio as an in-memory registrar (usrloc ``db_mode`` 0, no auth unless
    ``modules`` adds it) on UDP ``host:port``, serving ``domain``: the benches' central peer. ``modules``
    are loaded after the registrar; the caller appends their modparams and the routes."""
    extra = "".join(f'loadmodule "{name}.so"\n' for name in modules)
    return f"""#!KAMAILIO
debug=1
log_stderror=yes
children={children}
auto_aliases=no
dns=no
rev_dns=no
listen=udp:{host}:{port}
alias="{domain}"
mpath="{MODULES}"
loadmodule "pv.so"
loadmodule "sl.so"
loadmodule "tm.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
{extra}modparam("usrloc", "db_mode", 0)
"""


def stateful_config(
    host: str,
    port: int,
    *,
    children: int = 2,
    transports: tuple[str, ...] = ("udp", "tcp"),
    tls: KamailioTLS | None = None,
) -> str:
    """A transaction-stateful proxy: ``t_relay`` to the Request-URI, Record-Route, loose routing."""
    return (
        _header(host, port, children, transports, tls)
        + """
loadmodule "tm.so"
loadmodule "rr.so"
modparam("rr", "enable_full_lr", 1)

request_route {
    if (!mf_process_maxfwd_header("10")) {
        sl_send_reply("483", "Too Many Hops");
        exit;
    }
    if (is_method("CANCEL")) {
        if (t_check_trans()) {
            t_relay();
        }
        exit;
    }
    if (has_totag()) {
        loose_route();
        if (is_method("ACK") && !t_check_trans()) {
            forward();
            exit;
        }
        t_relay();
        exit;
    }
    if (is_method("INVITE|SUBSCRIBE")) {
        record_route();
    }
    if (!t_relay()) {
        sl_reply_error();
    }
}
"""
    )


def stateless_config(
    host: str,
    port: int,
    *,
    children: int = 2,
    transports: tuple[str, ...] = ("udp", "tcp"),
    tls: KamailioTLS | None = None,
) -> str:
    """Stateless forwarding to the Request-URI (``forward``), no transaction, no Record-Route."""
    return (
        _header(host, port, children, transports, tls)
        + """
request_route {
    if (!mf_process_maxfwd_header("10")) {
        sl_send_reply("483", "Too Many Hops");
        exit;
    }
    forward();
}
"""
    )


def registrar_config(
    host: str,
    port: int,
    *,
    realm: str,
    users: Mapping[str, str],
    domain_routes: Mapping[str, DomainRoute] | None = None,
    challenge_invites: bool = True,
    children: int = 2,
    transports: tuple[str, ...] = ("udp", "tcp"),
    tls: KamailioTLS | None = None,
    branch_timeout_ms: int | None = None,
) -> str:
    """A registrar with digest auth for ``users`` (name → password) in ``realm``, plus a proxy.

    REGISTERs are challenged with 401 (qop=auth) and saved in memory; INVITEs from the realm are
    challenged with 407 when ``challenge_invites``; requests for a domain in ``domain_routes`` go to its
    next hop (``$du``), with the Request-URI's host rewritten to the route's target when it has one (so a
    next-hop proxy without DNS can forward it); requests for registered users go to their contact;
    anything else to its Request-URI. ``branch_timeout_ms`` is ``tm``'s ``fr_timer`` (default 30 s): how
    long a branch may go without any response before Kamailio answers 408 itself.
    """
    for name, secret in users.items():
        for text in (name, secret, realm):
            if '"' in text or "\\" in text or "\n" in text:
                raise ValueError(f"unsafe character in registrar setting {text!r}")
    passwords = "\n".join(
        f'    if ($au == "{name}") {{ $var(password) = "{secret}"; }}' for name, secret in users.items()
    )
    routes = "\n".join(_route_line(domain, route) for domain, route in (domain_routes or {}).items())
    invite_auth = (
        f"""    if (is_method("INVITE") && $fd == "{realm}") {{
        route(PASSWORD);
        if (!pv_proxy_authenticate("{realm}", "$var(password)", "0")) {{
            auth_challenge("{realm}", "1");
            exit;
        }}
        consume_credentials();
    }}"""
        if challenge_invites
        else ""
    )
    fr_timer = "" if branch_timeout_ms is None else f'modparam("tm", "fr_timer", {int(branch_timeout_ms)})\n'
    return (
        _header(host, port, children, transports, tls)
        + f"""
loadmodule "tm.so"
loadmodule "rr.so"
loadmodule "auth.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
modparam("usrloc", "db_mode", 0)
modparam("auth", "nonce_expire", 60)
modparam("rr", "enable_full_lr", 1)
{fr_timer}
route[PASSWORD] {{
    $var(password) = "";
{passwords}
}}

request_route {{
    if (!mf_process_maxfwd_header("10")) {{
        sl_send_reply("483", "Too Many Hops");
        exit;
    }}
    if (is_method("CANCEL")) {{
        if (t_check_trans()) {{
            t_relay();
        }}
        exit;
    }}
    if (has_totag()) {{
        loose_route();
        if (is_method("ACK") && !t_check_trans()) {{
            forward();
            exit;
        }}
        t_relay();
        exit;
    }}
    if (is_method("REGISTER")) {{
        route(PASSWORD);
        if (!pv_www_authenticate("{realm}", "$var(password)", "0")) {{
            auth_challenge("{realm}", "1");
            exit;
        }}
        consume_credentials();
        if (!save("location")) {{
            sl_reply_error();
        }}
        exit;
    }}
{invite_auth}
{routes}
    # Record-Route before lookup (as Kamailio's default config does): rr writes a sips: Record-Route when
    # the Request-URI is sips at that moment, on both sides of a double Record-Route, so after a lookup
    # that found a sips: contact a caller on UDP would be told to reach our UDP side over TLS
    if (is_method("INVITE")) {{
        record_route();
    }}
    if ($rd == "{realm}") {{
        if (!lookup("location")) {{
            sl_send_reply("404", "Not Found");
            exit;
        }}
    }}
    if (!t_relay()) {{
        sl_reply_error();
    }}
}}
"""
    )


@dataclass(frozen=True)
class DomainRoute:
    """A static route: requests for a domain go to ``next_hop``; with ``target``, the Request-URI's
    host:port becomes ``target`` (the final destination the next hop forwards to)."""

    next_hop: tuple[str, int]
    target: tuple[str, int] | None = None
    transport: str = "udp"
    """How Kamailio reaches ``next_hop``: ``udp``, ``tcp`` or ``tls`` (its TLS client side)."""


def _route_line(domain: str, route: DomainRoute) -> str:
    if route.transport not in ("udp", "tcp", "tls"):
        raise ValueError(f"unknown transport {route.transport!r} in the route for {domain}")
    rewrite = "" if route.target is None else f'$rd = "{route.target[0]}"; $rp = {route.target[1]}; '
    param = "" if route.transport == "udp" else f";transport={route.transport}"
    hop = f"sip:{route.next_hop[0]}:{route.next_hop[1]}{param}"
    return f'    if ($rd == "{domain}") {{ {rewrite}$du = "{hop}"; record_route(); t_relay(); exit; }}'


def kamailio_path() -> str:
    path = shutil.which("kamailio")
    if path is None:
        raise ChildError("kamailio is not installed")
    return path


class Kamailio:
    """One Kamailio child running ``config`` from ``workdir``; a context manager that always ends it.

    It is ready once it listens on ``port`` for each of ``transports`` and, when given, on ``tls_port``
    (the ``KamailioTLS.port`` of its config)."""

    def __init__(
        self,
        config: str,
        workdir: Path,
        port: int,
        *,
        shm_mb: int = 128,
        name: str = "kamailio",
        transports: tuple[str, ...] = ("udp", "tcp"),
        tls_port: int | None = None,
    ) -> None:
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = self.dir / "kamailio.cfg"
        self.cfg.write_text(config)
        self.pidfile = self.dir / "kamailio.pid"
        self.log = self.dir / "kamailio.log"
        self.port = port
        self.transports = transports
        self.tls_port = tls_port
        self.args = [
            kamailio_path(),
            "-f",
            str(self.cfg),
            "-DD",
            "-E",
            "-m",
            str(shm_mb),
            "-M",
            "16",
            "-Y",
            str(self.dir),
            "-P",
            str(self.pidfile),
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def check(self) -> None:
        """Kamailio's own syntax check of the config (``-c``); raises with its output on error."""
        done = subprocess.run([kamailio_path(), "-c", "-f", str(self.cfg)], capture_output=True, timeout=30)
        if done.returncode != 0:
            raise ChildError(f"kamailio rejected {self.cfg}:\n{done.stderr.decode(errors='replace')[-3000:]}")

    def start(self, timeout: float = 20.0) -> Kamailio:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                self.args, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        kinds = [(self.port, t) for t in self.transports if t in ("udp", "tcp")]
        if self.tls_port is not None:
            kinds.append((self.tls_port, "tcp"))  # a TLS listener is a listening TCP socket
        try:
            wait_for_ports(self.proc, kinds, timeout, what="kamailio")
        except ChildError as exc:
            self.stop()
            raise ChildError(f"{exc}\n{self.log_tail()}") from None
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """CPU time of Kamailio's main process and all its workers so far."""
        return cpu_seconds(self.pid)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is None:
            return
        workers = children_of(self.proc.pid)
        stop(self.proc, grace=5.0, children=workers)

    def __enter__(self) -> Kamailio:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


WS_MODULE = Path(MODULES) / "websocket.so"


def has_websocket_module() -> bool:
    """Whether Kamailio's websocket module is installed (Debian: ``kamailio-websocket-modules``)."""
    return WS_MODULE.is_file()


def websocket_config(host: str, port: int, ws_port: int, *, children: int = 2) -> str:
    """Kamailio as a SIP WebSocket server (RFC 7118; ``xhttp`` takes the HTTP upgrade, ``websocket`` the
    frames) and registrar without authentication, also on UDP ``port``. Clients behind WS are NATed by
    nature: ``nathelper``'s ``fix_nated_register`` stores where the REGISTER really came from (the WS
    connection's address), so ``lookup`` sends requests for them back over that same connection, and
    ``add_contact_alias``/``handle_ruri_alias`` do the same for dialogs. Everything else is proxied
    statefully with Record-Route (double, when the transport changes)."""
    return (
        _header(host, port, children, ("udp",), extra_listens=(f"tcp:{host}:{ws_port}",))
        + "tcp_accept_no_cl=yes\n"
        + """loadmodule "tm.so"
loadmodule "rr.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "nathelper.so"
loadmodule "xhttp.so"
loadmodule "websocket.so"
modparam("usrloc", "db_mode", 0)
modparam("rr", "enable_full_lr", 1)
modparam("rr", "enable_double_rr", 2)
modparam("nathelper", "received_avp", "$avp(RECEIVED)")
modparam("registrar", "received_avp", "$avp(RECEIVED)")
modparam("websocket", "keepalive_mechanism", 0)

event_route[xhttp:request] {
    if ($hdr(Upgrade) =~ "websocket" && $hdr(Connection) =~ "Upgrade" && $rm =~ "GET") {
        if (ws_handle_handshake()) {
            exit;
        }
    }
    xhttp_reply("404", "Not Found", "", "");
}

request_route {
    if (!mf_process_maxfwd_header("10")) {
        sl_send_reply("483", "Too Many Hops");
        exit;
    }
    if (nat_uac_test("64")) {
        force_rport();
        if (is_method("REGISTER")) {
            fix_nated_register();
        } else if (is_first_hop()) {
            add_contact_alias();
        }
    }
    if (is_method("CANCEL")) {
        if (t_check_trans()) {
            t_relay();
        }
        exit;
    }
    if (has_totag()) {
        if (loose_route()) {
            handle_ruri_alias();
        }
        if (is_method("ACK") && !t_check_trans()) {
            forward();
            exit;
        }
        t_relay();
        exit;
    }
    if (is_method("REGISTER")) {
        if (!save("location")) {
            sl_reply_error();
        }
        exit;
    }
    remove_hf("Route");
    if (is_method("INVITE|SUBSCRIBE")) {
        record_route();
    }
    if (lookup("location")) {
        t_relay();
        exit;
    }
    if (!t_relay()) {
        sl_reply_error();
    }
}

onreply_route {
    if (nat_uac_test("64")) {
        add_contact_alias();
    }
}
"""
    )
