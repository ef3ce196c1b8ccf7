"""The NAT lab: an "internet" and two home networks behind real NAT routers (nftables masquerade), all in
network namespaces the test creates and always deletes.

    internet 10.99.0.0/24 (a bridge in its own namespace)
      p1 10.99.0.1      p2 10.99.0.2      (full peers, public addresses)
      ra 10.99.0.11 ── NAT A: plain masquerade (one outer port for every destination; port-restricted
         10.98.1.1        filtering: only the exact address:port a host sent to gets in)
           └─ ha 10.98.1.2
      rb 10.99.0.12 ── NAT B: masquerade fully-random (a new outer port per destination)
         10.98.2.1
           └─ hb 10.98.2.2

The public hosts have no route to 10.98.x: a private address in a Contact is unreachable from there, as on
the internet. Nothing is added to the machine's own network; processes started with :meth:`NatLab.popen`
are ended by PID on :meth:`NatLab.close`, before the namespaces are deleted. ``conntrack -F`` in a router
forgets its mappings; :meth:`NatLab.udp_timeout` shortens its conntrack UDP timeouts (per namespace here).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any

from .netns import NetnsUnavailable, _ip, teardown

P1, P2 = "10.99.0.1", "10.99.0.2"
RA_OUT, RB_OUT = "10.99.0.11", "10.99.0.12"
RA_IN, RB_IN = "10.98.1.1", "10.98.2.1"
HA, HB = "10.98.1.2", "10.98.2.2"
PUBLIC = {"p1": P1, "p2": P2, "ra": RA_OUT, "rb": RB_OUT}
TOOLS = ("ip", "nft", "conntrack")


def why_unavailable() -> str | None:
    """None when the lab can be built here, else the reason (for a clear skip message)."""
    if os.geteuid() != 0:
        return "the NAT lab needs root (network namespaces, nftables)"
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"the NAT lab needs {tool} (apt-get install iproute2 nftables conntrack)"
    return None


class NatLab:
    """The topology above. Names: p1, p2 (public peers), ra, rb (routers), ha, hb (hosts behind them)."""

    def __init__(self) -> None:
        self.prefix = f"nat{os.getpid() % 100000}"
        self.procs: list[subprocess.Popen[Any]] = []
        self._made: list[str] = []

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def _add(self, name: str) -> None:
        _ip("netns", "add", self.ns(name))
        self._made.append(self.ns(name))
        _ip("-n", self.ns(name), "link", "set", "lo", "up")

    def _sh(self, name: str, *argv: str) -> None:
        done = subprocess.run(["ip", "netns", "exec", self.ns(name), *argv], capture_output=True, timeout=20)
        if done.returncode != 0:
            why = done.stderr.decode(errors="replace").strip()
            raise NetnsUnavailable(f"{name}: {' '.join(argv)}: {why}")

    def open(self) -> NatLab:
        try:
            for name in ("sw", "p1", "p2", "ra", "rb", "ha", "hb"):
                self._add(name)
            sw = self.ns("sw")
            _ip("-n", sw, "link", "add", "br0", "type", "bridge")
            _ip("-n", sw, "link", "set", "br0", "up")
            for i, (name, address) in enumerate(PUBLIC.items()):
                port = f"port{i}"
                _ip("link", "add", "name", "eth0", "netns", self.ns(name), "type", "veth", "peer", "name",
                    port, "netns", sw)  # fmt: skip
                _ip("-n", sw, "link", "set", port, "master", "br0")
                _ip("-n", sw, "link", "set", port, "up")
                _ip("-n", self.ns(name), "addr", "add", f"{address}/24", "dev", "eth0")
                _ip("-n", self.ns(name), "link", "set", "eth0", "up")
            for router, host, inside, address, random in (
                ("ra", "ha", RA_IN, HA, False),
                ("rb", "hb", RB_IN, HB, True),
            ):
                _ip("link", "add", "name", "lan0", "netns", self.ns(router), "type", "veth", "peer", "name",
                    "eth0", "netns", self.ns(host))  # fmt: skip
                _ip("-n", self.ns(router), "addr", "add", f"{inside}/24", "dev", "lan0")
                _ip("-n", self.ns(router), "link", "set", "lan0", "up")
                _ip("-n", self.ns(host), "addr", "add", f"{address}/24", "dev", "eth0")
                _ip("-n", self.ns(host), "link", "set", "eth0", "up")
                _ip("-n", self.ns(host), "route", "add", "default", "via", inside)
                self._sh(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
                self._sh(router, "nft", "add", "table", "ip", "nat")
                self._sh(router, "nft", "add", "chain", "ip", "nat", "post",
                         "{ type nat hook postrouting priority 100; }")  # fmt: skip
                self._sh(router, "nft", "add", "rule", "ip", "nat", "post", "oifname", "eth0", "masquerade",
                         *(["fully-random"] if random else []))  # fmt: skip
        except BaseException:
            self.close()
            raise
        return self

    # ------------------------------------------------------------------------------------ the routers

    def forward_port(
        self, router: str, port: int, to: str, protocols: Sequence[str] = ("udp", "tcp")
    ) -> None:
        """A port-forwarding (DNAT) rule on ``router``'s outer address, as a home router does."""
        self._sh(router, "nft", "add", "chain", "ip", "nat", "pre",
                 "{ type nat hook prerouting priority -100; }")  # fmt: skip
        for proto in protocols:
            self._sh(router, "nft", "add", "rule", "ip", "nat", "pre", "iifname", "eth0", proto, "dport",
                     str(port), "dnat", "to", f"{to}:{port}")  # fmt: skip

    def flush_mappings(self, router: str) -> None:
        """``conntrack -F``: the router forgets every NAT mapping."""
        self._sh(router, "conntrack", "-F")

    def udp_timeout(self, router: str, seconds: int) -> None:
        """Shorten the router's conntrack UDP timeouts (unreplied and replied: ``nf_conntrack_udp_timeout``
        and ``_stream``), per namespace on these kernels, so an idle mapping dies within a test."""
        self._sh(router, "sysctl", "-qw", f"net.netfilter.nf_conntrack_udp_timeout={seconds}")
        self._sh(router, "sysctl", "-qw", f"net.netfilter.nf_conntrack_udp_timeout_stream={seconds}")

    def link(self, host: str, up: bool) -> None:
        """Cut (or restore) ``host``'s only link: its flows die as if its route dropped."""
        self._sh(host, "ip", "link", "set", "eth0", "up" if up else "down")
        if up and host in ("ha", "hb"):
            inside = RA_IN if host == "ha" else RB_IN
            with contextlib.suppress(NetnsUnavailable):
                self._sh(host, "ip", "route", "add", "default", "via", inside)

    # ------------------------------------------------------------------------------------ processes

    def popen(self, name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside namespace ``name``; it is ended by PID on close()."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns(name), *argv], **kwargs)
        self.procs.append(proc)
        return proc

    def run(
        self, name: str, argv: Sequence[str], timeout: float = 60, **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        return subprocess.run(["ip", "netns", "exec", self.ns(name), *argv], timeout=timeout, **kwargs)

    def close(self) -> None:
        teardown(self.procs, self._made)

    def __enter__(self) -> NatLab:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
