"""A small phone (a UA core on a Stack) for the demo and the tests' stand-in phones."""

from __future__ import annotations

import asyncio
from typing import Any


class _Phone:
    """A minimal SIP phone: REGISTER (with digest), INVITE/ACK/BYE as caller, auto-answer as callee.

    A UA core on its own :class:`~p2psip.stack.Stack`, so retransmissions and timeouts are the transaction
    layer's. Responses to our requests arrive on per-transaction queues.
    """

    stateful = True

    def __init__(self, stack: Any, aor: str, *, answer: bool) -> None:
        from p2psip.message import new_tag

        self.stack = stack
        self.aor = aor
        self.answer = answer
        self.tag = new_tag()
        self.queues: dict[int, asyncio.Queue[Any]] = {}
        self.answered = asyncio.Event()
        self.acked = asyncio.Event()
        self.hung_up = asyncio.Event()
        self.ack: Any = None
        self.ack_target: Any = None
        stack.attach(self)

    @classmethod
    async def open(cls, aor: str, *, answer: bool = False, host: str = "127.0.0.1", port: int = 0) -> _Phone:
        from p2psip.stack import Stack

        shown = f"[{host}]" if ":" in host else host
        stack = await Stack.start([f"udp:{shown}:{port}"])
        return cls(stack, aor, answer=answer)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.stack.local_address("udp")
        return (str(host), int(port))

    @property
    def contact(self) -> str:
        user = self.aor.partition(":")[2].partition("@")[0]
        return str(self.stack.local_uri("udp", user=user))

    async def close(self) -> None:
        await self.stack.close()

    # core callbacks ------------------------------------------------------------------------------
    def on_request(self, request: Any, transaction: Any, source: Any) -> None:
        from p2psip.message import Response

        method = request.method
        if method == "ACK":
            self.acked.set()
            return
        if transaction is None:
            return
        if method == "INVITE" and self.answer:
            ringing = Response.for_request(request, 180, to_tag=self.tag)
            ok = Response.for_request(request, 200, to_tag=self.tag)
            ok.set("Contact", f"<{self.contact}>")
            for response in (ringing, ok):
                for rr in request.get_all("Record-Route"):
                    response.add("Record-Route", rr)
                self.stack.respond(transaction, response)
            self.answered.set()
        elif method == "INVITE":
            self.stack.respond(transaction, Response.for_request(request, 486, to_tag=self.tag))
        elif method in ("BYE", "CANCEL", "OPTIONS"):
            self.stack.respond(transaction, Response.for_request(request, 200))
            if method == "BYE":
                self.hung_up.set()
        else:
            self.stack.respond(transaction, Response.for_request(request, 501))

    def on_response(self, response: Any, transaction: Any, source: Any) -> None:
        if transaction is None:
            if 200 <= response.status < 300 and self.ack is not None:
                self.stack.send_stateless(self.ack, self.ack_target)  # a retransmitted 2xx
            return
        queue = self.queues.get(id(transaction))
        if queue is not None:
            queue.put_nowait(response)

    def _synthetic(self, transaction: Any, status: int, reason: str) -> None:
        from p2psip.message import Response

        queue = self.queues.get(id(transaction))
        if queue is not None:
            queue.put_nowait(Response.for_request(transaction.request, status, reason))

    def on_timeout(self, transaction: Any, timer: str) -> None:
        self._synthetic(transaction, 408, f"Request Timeout (timer {timer})")

    def on_transport_failure(self, transaction: Any, error: str) -> None:
        self._synthetic(transaction, 503, f"Service Unavailable ({error})")

    def on_terminated(self, transaction: Any) -> None:
        pass

    # requests ------------------------------------------------------------------------------------
    async def _transact(self, request: Any, target: Any, timeout: float) -> Any:
        tx = self.stack.send_request(request, target)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self.queues[id(tx)] = queue
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                response = await asyncio.wait_for(queue.get(), max(0.01, deadline - loop.time()))
                if response.status >= 200:
                    return response
        finally:
            self.queues.pop(id(tx), None)

    async def register(
        self,
        via: tuple[str, int],
        *,
        contact: str | None = None,
        expires: int = 3600,
        password: str | None = None,
        timeout: float = 10.0,
    ) -> Any:
        from p2psip.auth import answer_challenge
        from p2psip.message import Request
        from p2psip.transport import Target
        from p2psip.uri import URI

        domain = URI(self.aor).host
        request = Request.create(
            "REGISTER",
            f"sip:{domain}",
            from_=f"<{self.aor}>;tag={self.tag}",
            to=f"<{self.aor}>",
            contact=contact or f"<{self.contact}>",
            headers=[("Expires", str(expires))],
        )
        target = Target("udp", via[0], via[1])
        response = await self._transact(request.copy(), target, timeout)
        if response.status in (401, 407) and password is not None:
            user = URI(self.aor).user or ""
            retry = answer_challenge(response, request, user, password)
            retry.remove("Via")
            response = await self._transact(retry, target, timeout)
        return response

    async def call(self, uri: str, via: tuple[str, int], *, timeout: float = 30.0) -> tuple[Any, Any]:
        """INVITE ``uri`` (no SDP) through ``via``; ACK a 2xx. Returns (final response, dialog or None).

        The ``call`` command uses the UserAgent (with audio); this stays for the demo's ladder and the
        tests' stand-in phones."""
        from p2psip.dialog import Dialog
        from p2psip.message import Request
        from p2psip.transport import Target, target_from_uri

        invite = Request.create(
            "INVITE", uri, from_=f"<{self.aor}>;tag={self.tag}", to=f"<{uri}>", contact=f"<{self.contact}>"
        )
        final = await self._transact(invite, Target("udp", via[0], via[1]), timeout)
        if not 200 <= final.status < 300:
            return final, None
        dialog = Dialog.uac(invite, final)
        ack = dialog.create_ack(final)
        hop = dialog.route_set[0].uri if dialog.route_set else dialog.remote_target
        self.ack_target = target_from_uri(hop)
        self.stack.push_via(ack, self.ack_target)
        self.ack = ack
        self.stack.send_stateless(ack, self.ack_target)
        return final, dialog

    async def hang_up(self, dialog: Any, timeout: float = 10.0) -> Any:
        from p2psip.transport import target_from_uri

        bye = dialog.create_request("BYE")
        hop = dialog.route_set[0].uri if dialog.route_set else dialog.remote_target
        return await self._transact(bye, target_from_uri(hop), timeout)
