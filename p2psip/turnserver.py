"""The asyncio adapter of the TURN server (:mod:`p2psip.turn`): one UDP listening socket, one relay socket
per allocation, a once-a-second expiry tick. All decisions are the sans-IO core's; this only moves bytes.
``now`` is wall-clock time, since the time-limited credentials carry a wall-clock expiry."""

from __future__ import annotations

import asyncio
import contextlib
import time

from p2psip.turn import Action, Addr, CloseRelay, OpenRelay, ToClient, ToPeer, TurnCore, TurnLimits

__all__ = ["TurnServer"]


class _Listener(asyncio.DatagramProtocol):
    def __init__(self, server: TurnServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.server._run(self.server.core.from_client(data, (addr[0], addr[1]), time.time()))


class _Relay(asyncio.DatagramProtocol):
    def __init__(self, server: TurnServer) -> None:
        self.server = server
        self.address: Addr = ("", 0)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.server._run(self.server.core.from_peer(self.address, data, (addr[0], addr[1]), time.time()))


class TurnServer:
    """A TURN server on ``host:port`` (UDP); relayed addresses are ephemeral ports on the same ``host``."""

    def __init__(
        self,
        secret: bytes,
        host: str = "127.0.0.1",
        port: int = 0,
        realm: str = "p2psip",
        limits: TurnLimits | None = None,
        relay_host: str | None = None,
    ) -> None:
        self.core = TurnCore(secret, realm=realm, limits=limits)
        self.host, self.port = host, port
        self.relay_host = relay_host or host
        self._transport: asyncio.DatagramTransport | None = None
        self._relays: dict[Addr, asyncio.DatagramTransport] = {}
        self._tick: asyncio.Task[None] | None = None
        self._opening: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> Addr:
        return (self.host, self.port)

    async def start(self) -> TurnServer:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Listener(self), local_addr=(self.host, self.port)
        )
        self._transport = transport
        self.port = transport.get_extra_info("sockname")[1]
        self._tick = asyncio.create_task(self._expire_loop())
        return self

    async def close(self) -> None:
        if self._tick is not None:
            self._tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick
        for task in list(self._opening):
            task.cancel()
        for relay in list(self._relays.values()):
            relay.close()
        self._relays.clear()
        if self._transport is not None:
            self._transport.close()

    async def __aenter__(self) -> TurnServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def close_user(self, user: str) -> None:
        """Tear down ``user``'s allocations (its dialog ended)."""
        self._run(self.core.close_user(user))

    def _run(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, ToClient):
                if self._transport is not None:
                    self._transport.sendto(action.data, action.client)
            elif isinstance(action, ToPeer):
                relay = self._relays.get(action.relay)
                if relay is not None:
                    relay.sendto(action.data, action.peer)
            elif isinstance(action, OpenRelay):
                task = asyncio.create_task(self._open(action))
                self._opening.add(task)
                task.add_done_callback(self._opening.discard)
            elif isinstance(action, CloseRelay):
                transport = self._relays.pop(action.relay, None)
                if transport is not None:
                    transport.close()

    async def _open(self, action: OpenRelay) -> None:
        loop = asyncio.get_running_loop()
        protocol = _Relay(self)
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: protocol, local_addr=(self.relay_host, 0)
            )
        except OSError:
            self._run(self.core.relay_opened(action.token, None, time.time()))
            return
        sockname = transport.get_extra_info("sockname")
        protocol.address = (sockname[0], sockname[1])
        self._relays[protocol.address] = transport
        self._run(self.core.relay_opened(action.token, protocol.address, time.time()))

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._run(self.core.expire(time.time()))
