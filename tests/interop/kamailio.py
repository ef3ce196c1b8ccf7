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


def _header(host: str, port: int, children: int, transports: tuple[str, ...]) -> str:
    listens = "\n".join(f"listen={t}:{host}:{port}" for t in transports)
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
"""


def stateful_config(
    host: str, port: int, *, children: int = 2, transports: tuple[str, ...] = ("udp", "tcp")
) -> str:
    """A transaction-stateful proxy: ``t_relay`` to the Request-URI, Record-Route, loose routing."""
    return (
        _header(host, port, children, transports)
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
    host: str, port: int, *, children: int = 2, transports: tuple[str, ...] = ("udp", "tcp")
) -> str:
    """Stateless forwarding to the Request-URI (``forward``), no transaction, no Record-Route."""
    return (
        _header(host, port, children, transports)
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
) -> str:
    """A registrar with digest auth for ``users`` (name → password) in ``realm``, plus a proxy.

    REGISTERs are challenged with 401 (qop=auth) and saved in memory; INVITEs from the realm are
    challenged with 407 when ``challenge_invites``; requests for a domain in ``domain_routes`` go to its
    next hop (``$du``), with the Request-URI's host rewritten to the route's target when it has one (so a
    next-hop proxy without DNS can forward it); requests for registered users go to their contact;
    anything else to its Request-URI.
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
    return (
        _header(host, port, children, transports)
        + f"""
loadmodule "tm.so"
loadmodule "rr.so"
loadmodule "auth.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
modparam("usrloc", "db_mode", 0)
modparam("auth", "nonce_expire", 60)
modparam("rr", "enable_full_lr", 1)

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
    if ($rd == "{realm}") {{
        if (!lookup("location")) {{
            sl_send_reply("404", "Not Found");
            exit;
        }}
    }}
    if (is_method("INVITE")) {{
        record_route();
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


def _route_line(domain: str, route: DomainRoute) -> str:
    rewrite = "" if route.target is None else f'$rd = "{route.target[0]}"; $rp = {route.target[1]}; '
    hop = f"sip:{route.next_hop[0]}:{route.next_hop[1]}"
    return f'    if ($rd == "{domain}") {{ {rewrite}$du = "{hop}"; record_route(); t_relay(); exit; }}'


def kamailio_path() -> str:
    path = shutil.which("kamailio")
    if path is None:
        raise ChildError("kamailio is not installed")
    return path


class Kamailio:
    """One Kamailio child running ``config`` from ``workdir``; a context manager that always ends it."""

    def __init__(
        self,
        config: str,
        workdir: Path,
        port: int,
        *,
        shm_mb: int = 128,
        name: str = "kamailio",
        transports: tuple[str, ...] = ("udp", "tcp"),
    ) -> None:
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = self.dir / "kamailio.cfg"
        self.cfg.write_text(config)
        self.pidfile = self.dir / "kamailio.pid"
        self.log = self.dir / "kamailio.log"
        self.port = port
        self.transports = transports
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
