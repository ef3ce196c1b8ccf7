"""Run sipp as a child process and read its verdict.

sipp is the reference load generator: its UAC counts a call as successful only when the whole exchange
(INVITE, provisional, 200, ACK, BYE, 200) went as its scenario says. We start it with ``-trace_stat`` so it
writes a CSV whose last row holds ``SuccessfulCall(C)`` and ``FailedCall(C)``, and optionally with
``-trace_rtt`` so each call's setup time (INVITE sent → 200 received) is logged for latency percentiles.
Every run is bounded: if sipp does not end by itself in time it is killed by PID and the call counts what
it wrote so far, so a stuck call fails a test instead of hanging it.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .procs import ChildError, stop, wait_for_ports

SCENARIOS = Path(__file__).resolve().parent / "scenarios"
UAC_RR = SCENARIOS / "uac_rr.xml"
UAS_RR = SCENARIOS / "uas_rr.xml"
UAC_DOMAIN = SCENARIOS / "uac_domain.xml"
UAC_TXN = SCENARIOS / "uac_txn.xml"
UAS_TIMER_J = SCENARIOS / "uas_timer_j.xml"
# 4 MB socket buffers (sipp's default is 64 kB): on a loaded machine a burst of datagrams must wait in the
# kernel rather than be dropped while sipp waits for a CPU
BUFFERS = ("-buff_size", "4194304")


def sipp_path() -> str:
    path = shutil.which("sipp")
    if path is None:
        raise ChildError("sipp is not installed (Debian package sip-tester)")
    return path


@dataclass
class SippResult:
    """What one sipp run reported."""

    returncode: int | None
    successful: int
    failed: int
    retransmissions: int
    call_rate: float = 0.0
    """sipp's ``CallRate(C)``: calls over its whole run time, including the last calls' tail."""
    elapsed: float = 0.0
    """Wall-clock seconds the run took (set by ``run_calls``): well above calls/rate when sipp, the
    proxy or the machine could not keep up."""
    setup_ms: list[float] = field(default_factory=list)
    """Call-setup times (INVITE → 200) in ms, one per call, when the run traced them."""
    log: str = ""
    """The tail of sipp's own output and error log, to show when an assertion fails."""

    def percentile(self, p: float) -> float:
        """The ``p``-th percentile (0..100) of call-setup time, nearest-rank; NaN with no samples."""
        if not self.setup_ms:
            return float("nan")
        ordered = sorted(self.setup_ms)
        rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
        return ordered[rank - 1]

    def __str__(self) -> str:
        return (
            f"sipp rc={self.returncode} successful={self.successful} failed={self.failed} "
            f"retransmissions={self.retransmissions} call_rate={self.call_rate:.0f}/s\n{self.log}"
        )


def _transport_kind(transport: str) -> str:
    return "tcp" if transport.startswith("t") else "udp"


class Sipp:
    """One sipp child. Use as a context manager so it is always ended.

    ``args`` are sipp's arguments after the program name; ``workdir / name`` receives its stat, rtt and
    error files.
    """

    def __init__(self, args: Sequence[str], workdir: Path, name: str) -> None:
        self.args = [sipp_path(), *args]
        self.workdir = workdir / name
        self.name = name
        self.stat_file = self.workdir / "stat.csv"
        self.out_file = self.workdir / "sipp.out"
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir.mkdir(parents=True, exist_ok=True)

    def start(self, *, ready_port: tuple[int, str] | None = None, timeout: float = 15.0) -> Sipp:
        """Start sipp; with ``ready_port`` return only once it is bound to that ``(port, kind)``."""
        with self.out_file.open("wb") as out:
            self.proc = subprocess.Popen(
                self.args, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        if ready_port is not None:
            try:
                wait_for_ports(self.proc, [ready_port], timeout, what=f"sipp {self.name}")
            except ChildError:
                self.stop()
                raise ChildError(f"sipp {self.name} did not start:\n{self.log_tail()}") from None
        return self

    def wait(self, timeout: float) -> SippResult:
        """Wait up to ``timeout`` s for sipp to end by itself (killed otherwise) and read its results."""
        assert self.proc is not None, "start() first"
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
        return self.result()

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, grace=3.0)

    def result(self) -> SippResult:
        successful = failed = retrans = 0
        call_rate = 0.0
        if self.stat_file.exists():
            with self.stat_file.open(newline="") as stats:
                rows = list(csv.DictReader(stats, delimiter=";"))
            for last in reversed(rows):  # the newest complete row (a killed sipp may leave a cut one)
                try:
                    successful = int(last.get("SuccessfulCall(C)") or 0)
                    failed = int(last.get("FailedCall(C)") or 0)
                    retrans = int(last.get("Retransmissions(C)") or 0)
                    call_rate = float(last.get("CallRate(C)") or 0.0)
                except (TypeError, ValueError):
                    continue
                break
        setup: list[float] = []
        for rtt in sorted(self.workdir.glob("*_rtt.csv")):
            for line in rtt.read_text().splitlines()[1:]:
                parts = line.split(";")
                if len(parts) >= 3 and parts[2].strip() == "1":
                    setup.append(float(parts[1]))
        returncode = self.proc.returncode if self.proc is not None else None
        return SippResult(
            returncode, successful, failed, retrans, call_rate=call_rate, setup_ms=setup, log=self.log_tail()
        )

    def counts(self) -> dict[str, int]:
        """The newest row of sipp's ``-trace_counts`` file (written every ``-fd`` seconds and when sipp
        ends): how often each scenario step was received or sent, retransmitted, timed out or met an
        unexpected message, keyed by sipp's column names (``3_ACK_Recv``, ``4_BYE_Unexp``...). Empty before
        the first row."""
        for path in sorted(self.workdir.glob("*_counts.csv")):
            lines = path.read_text(errors="replace").splitlines()
            if len(lines) < 2:
                continue
            names = lines[0].split(";")
            for row in reversed(lines[1:]):  # the newest complete row (a killed sipp may leave a cut one)
                values = row.split(";")
                if len(values) != len(names):
                    continue
                pairs = zip(names, values, strict=True)
                return {name: int(value) for name, value in pairs if value.isdigit()}
        return {}

    def log_tail(self, lines: int = 30) -> str:
        texts = []
        for path in [self.out_file, *sorted(self.workdir.glob("*errors.log"))]:
            if path.exists():
                texts.append(
                    f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
                )
        return "\n".join(texts)

    def __enter__(self) -> Sipp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def uas(
    workdir: Path,
    port: int,
    *,
    host: str = "127.0.0.1",
    transport: str = "u1",
    scenario: Path | None = UAS_RR,
    name: str = "uas",
    extra: Sequence[str] = (),
) -> Sipp:
    """A started sipp UAS answering every INVITE (echoing Record-Route by default), ready on ``port``."""
    scen = ["-sf", str(scenario)] if scenario is not None else ["-sn", "uas"]
    args = [
        *scen,
        "-i",
        host,
        "-p",
        str(port),
        "-t",
        transport,
        "-nostdin",
        "-trace_err",
        "-error_file",
        str(workdir / name / "errors.log"),
        # a proxy with several workers may reorder an ACK behind the BYE (legal on UDP): tolerate it
        "-default_behaviors",
        "all,-abortunexp",
        *BUFFERS,
        *extra,
    ]
    return Sipp(args, workdir, name).start(ready_port=(port, _transport_kind(transport)))


def uac(
    workdir: Path,
    target: str,
    *,
    calls: int,
    rate: float,
    port: int,
    proxy: str | None = None,
    host: str = "127.0.0.1",
    transport: str = "u1",
    scenario: Path | None = UAC_RR,
    service: str = "service",
    trace_rtt: bool = False,
    name: str = "uac",
    timeout_s: int | None = None,
    recv_timeout_ms: int = 20000,
    extra: Sequence[str] = (),
) -> Sipp:
    """A started sipp UAC placing ``calls`` calls at ``rate`` calls/s to ``target`` (HOST:PORT).

    ``proxy`` (HOST:PORT) sends every request there (``-rsa``) while the Request-URI still names
    ``target``: that is how a call goes through a proxy under test. The UAC ends by itself after the last
    call; call ``wait`` with a bound.
    """
    if rate < 1:
        raise ValueError("rate below 1 call/s is not supported by this helper")
    if timeout_s is None:
        timeout_s = int(calls / rate) + 30
    scen = ["-sf", str(scenario)] if scenario is not None else ["-sn", "uac"]
    args = [
        target,
        *scen,
        "-i",
        host,
        "-p",
        str(port),
        "-t",
        transport,
        "-s",
        service,
        "-m",
        str(calls),
        "-r",
        str(int(rate)),
        "-rp",
        "1000",
        "-l",
        str(max(1000, int(rate * 40))),
        "-nostdin",
        "-timeout",
        f"{timeout_s}s",
        "-timeout_error",
        "-recv_timeout",
        str(recv_timeout_ms),
        "-trace_stat",
        "-stf",
        str(workdir / name / "stat.csv"),
        "-fd",
        "1",
        "-trace_err",
        "-error_file",
        str(workdir / name / "errors.log"),
        "-default_behaviors",
        "all,-abortunexp",
        *BUFFERS,
    ]
    if proxy is not None:
        args += ["-rsa", proxy]
    if trace_rtt:
        args += ["-trace_rtt", "-rtt_freq", "1"]
    args += list(extra)
    sipp = Sipp(args, workdir, name)
    sipp.start()
    return sipp


def run_calls(
    workdir: Path,
    target: str,
    *,
    calls: int,
    rate: float,
    port: int,
    timeout: float | None = None,
    **kwargs: object,
) -> SippResult:
    """Place ``calls`` calls with a sipp UAC and wait (bounded) for the verdict."""
    bound = timeout if timeout is not None else calls / max(rate, 1.0) + 30.0
    started = time.monotonic()
    with uac(workdir, target, calls=calls, rate=rate, port=port, **kwargs) as client:  # type: ignore[arg-type]
        result = client.wait(bound)
    result.elapsed = time.monotonic() - started
    result.log = f"(ran {result.elapsed:.1f} s)\n{result.log}"
    return result
