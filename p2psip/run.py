"""Running a process apart from the protocol: signals, a graceful stop, and the GC tuning of a busy proxy.

The protocol modules (:mod:`p2psip.proxy`, :mod:`p2psip.stack`, the peer, sipapi's server) know nothing of
signals or process-wide settings; the three programs that run until told to stop (``p2psip proxy``,
``p2psip start``, ``sipapi.run()``) all wait in :func:`until_stopped`, then close what they opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import Callable, Iterator, Sequence

from p2psip.handoff import HandoffLink, branch_tag, route_param
from p2psip.proxy import Proxy
from p2psip.stack import Stack
from p2psip.transport import TLSConfig
from p2psip.workers import WorkerSlot

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_signals(stop: asyncio.Event | None = None) -> Iterator[asyncio.Event]:
    """The event a running program waits on: ``stop`` itself when given (tests, embedding programs), else a
    new one that SIGINT and SIGTERM set for as long as the ``with`` block runs.

    The handlers are installed before the program says it is ready, so a signal sent on seeing that line
    stops it gracefully; with them, a Ctrl-C does not raise KeyboardInterrupt in the middle of whatever
    callback runs, and the caller's ``finally`` closes sockets and leaves the overlay in order. They are
    removed on the way out, so a second Ctrl-C during that clean-up interrupts it as usual."""
    if stop is not None:
        yield stop
        return
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, event.set)
    try:
        yield event
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


async def until_stopped(ready: Callable[[], None] | None = None, stop: asyncio.Event | None = None) -> None:
    """The loop every long-running command waits in: ``ready()`` once the stop signals are handled (so a
    signal sent on seeing the ready line stops it gracefully), then wait for the stop (see
    :func:`stop_signals`). The caller closes what it opened when this returns."""
    with stop_signals(stop) as stopped:
        if ready is not None:
            ready()
        await stopped.wait()


class _YoungPasses:
    """Collect the young generations on a clock: generation 0 every 50 ms, 0 and 1 every 200 ms.

    Why: CPython starts a young pass when allocations minus deallocations exceed the threshold. Once a
    busy proxy is in its steady state, the transactions ending 32 s after they began free about as many
    objects as new calls allocate, so that difference hardly grows: passes became rare and each walked
    tens of thousands of young objects (20-100 ms pauses, p99 setup 60-80 ms after the first 32 s at
    500 calls/s, while the first 30 s looked fine). On a clock each pass walks what 50 ms of traffic left
    alive, a fraction of a millisecond at 500 calls/s; an idle proxy pays microseconds."""

    INTERVAL = 0.05
    MIDDLE_EVERY = 4

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ticks = 0
        self.handle: asyncio.TimerHandle | None = loop.call_later(self.INTERVAL, self._tick)

    def _tick(self) -> None:
        self.ticks += 1
        gc.collect(1 if self.ticks % self.MIDDLE_EVERY == 0 else 0)
        self.handle = self.loop.call_later(self.INTERVAL, self._tick)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


def tune_gc_for_proxy() -> None:
    """Set the collector's thresholds for a stand-alone proxy process (then start :class:`_YoungPasses`).

    A library must not change a process-wide setting: only the programs call this, through
    :func:`busy_proxy_gc` (``p2psip proxy``, ``p2psip start``, and bench/peer.py, which stands for the
    peer processes)."""
    # The cyclic collector's pauses are a busy proxy's tail latency. Each call leaves objects alive for
    # up to 32 s (RFC 6026's lingering transactions), and a young-generation pass walks every object that
    # survived since the last one: Python's default (700, 10, 10) also runs a full pass over all of them
    # every few seconds (a quarter of the CPU), while one big young generation (50,000, as we had) paused
    # 20-30 ms each time. Measured at 375 calls/s (sipp, 10 s and 40 s): young 2000 and middle 5 keep
    # passes near 2 ms and 7-12 ms, 1.5 % of the CPU, p99 call setup 8 ms instead of 16-24. A full pass
    # walks every live call (~680,000 objects after 36 s at 500 calls/s: 0.6-0.8 s) and finds nothing:
    # a finished call forms no reference cycle (Proxy._release; unreachable = 0 after a minute at 500
    # calls/s), so reference counting frees it. Full passes are therefore left to the rare 100,000th
    # middle pass (hours apart); cycles made elsewhere (errors) mostly die young, where the frequent
    # passes collect them. gc.freeze() moves what start-up allocated out of sight. (Only here, in the
    # stand-alone process: a library must not change a process-wide setting.)
    gc.set_threshold(2000, 5, 100_000)
    gc.freeze()


@contextlib.contextmanager
def busy_proxy_gc() -> Iterator[None]:
    """:func:`tune_gc_for_proxy`, and the young generations collected on a clock (:class:`_YoungPasses`)
    for as long as the ``with`` block runs: what a process that proxies calls for a living needs
    (``p2psip proxy``, ``p2psip start``). Must run inside the event loop."""
    tune_gc_for_proxy()
    young_passes = _YoungPasses(asyncio.get_running_loop())
    try:
        yield
    finally:
        young_passes.stop()


async def serve_proxy(
    listen: Sequence[str],
    *,
    stateless: bool = False,
    record_route: bool = True,
    recurse: bool = False,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_ca: str | None = None,
    verbose: bool = False,
    trying_delay: float | None = 0.2,
    ready: Callable[[Stack], None] | None = None,
    stop: asyncio.Event | None = None,
    worker: WorkerSlot | None = None,
) -> dict[str, int]:
    """Run a stand-alone proxy until ``stop`` is set (or SIGINT/SIGTERM when ``stop`` is None); return
    its counters. ``ready(stack)`` is called once every listener is open (the CLI prints the addresses).

    ``trying_delay``: an INVITE gets ``100 Trying`` only if no provisional or final response has been
    forwarded within that time (§17.2.1's 200 ms allowance): a callee that rings at once saves the proxy
    and the caller one message per call. 0 sends it at once, None never.

    ``worker``: this process is one of the workers of a proxy (:mod:`p2psip.workers`): its UDP listeners
    share their port with the others, and a stateful one hands datagrams to the worker that keeps their
    transaction (:mod:`p2psip.handoff`)."""

    # tls_ca: whom to trust when forwarding over TLS (None: the system's store). Without tls_cert a tls:
    # listener presents a self-signed certificate made at start.
    tls = None
    if tls_cert or tls_ca:
        tls = TLSConfig(certfile=tls_cert, keyfile=tls_key or tls_cert, cafile=tls_ca)
    adopt = worker.shared if worker is not None else ()
    stack = await Stack.start(
        () if adopt else listen,
        tls=tls,
        verbose=verbose,
        trying_delay=trying_delay,
        reuse_port=worker is not None,
    )
    try:
        for sock in adopt:  # bound by the parent, in worker order (p2psip.steering)
            await stack.listen_on(sock)
    except BaseException:
        await stack.close()
        raise
    proxy = Proxy(stack, stateless=stateless, record_route=record_route, recurse=recurse, verbose=verbose)
    link = None
    if worker is not None and not stateless:  # a stateless proxy keeps nothing to hand over to
        link = HandoffLink(worker.index, worker.links, stack.transport.receive_datagram, worker.alive)
        stack.branch_tag = branch_tag(worker.index)
        proxy.record_route_params = route_param(worker.index)
        for sock in worker.own:
            stack.send_requests_from(sock)
        stack.before_refusal = link.refusing
        stack.transport.divert = link
    try:
        with busy_proxy_gc():
            await until_stopped((lambda: ready(stack)) if ready is not None else None, stop)
    finally:
        if link is not None:
            stack.transport.divert = None
            stack.before_refusal = None
            link.close()
        await stack.close()
    return {**stack.stats, **proxy.stats, **(link.stats if link is not None else {})}
