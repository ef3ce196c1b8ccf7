"""A proxy that decides requests itself with the public hooks: call forwarding on busy and on no answer.

An INVITE goes to the phone first; when the phone is busy (or does not answer within NO_ANSWER seconds,
then its branch is CANCELled), the failure is held back and the call goes to the voicemail instead.
Usage: python stack_proxy_hooks.py
"""

import asyncio

from p2psip.errors import SIPStatusError
from p2psip.message import Request, Response
from p2psip.proxy import Proxy, ProxyContext
from p2psip.stack import Source, Stack
from p2psip.transaction import ServerTransaction
from p2psip.uri import URI
from p2psip.useragent import IncomingCall, UserAgent

NO_ANSWER = 1.0  # seconds


class ForwardOnFailure(Proxy):
    def __init__(self, stack: Stack, phone: URI, voicemail: URI) -> None:
        super().__init__(stack)
        self.phone, self.voicemail = phone, voicemail

    def on_request(self, request: Request, transaction: ServerTransaction | None, source: Source) -> None:
        if transaction is None or request.method != "INVITE" or request.to.tag is not None:
            super().on_request(request, transaction, source)  # everything else: the plain proxy
            return
        try:
            self.check(request)  # Max-Forwards, Route pre-processing (§16.3, §16.4)
        except SIPStatusError as rejection:
            self.stack.respond(transaction, Response.for_error(request, rejection))
            return
        ctx = self.forward(request, transaction, source, [self.phone], on_final=self.to_voicemail)
        self.stack.loop.call_later(NO_ANSWER, ctx.cancel_pending)  # no-op once the phone answered

    def to_voicemail(self, ctx: ProxyContext, best: Response) -> bool:
        if best.status < 300 or ctx.cancelled:  # answered, or the caller hung up: nothing to do
            return False
        print(f"phone: {best.status} -> voicemail")
        self.forward(ctx.request, ctx.server, ctx.source, [self.voicemail])
        return True  # hold the phone's failure back: the voicemail's answer goes to the caller


async def main() -> None:
    stacks = [await Stack.start(listen=["udp:127.0.0.1:0"]) for _ in range(4)]
    proxy_stack, alice_stack, phone_stack, voicemail_stack = stacks
    busy = asyncio.Event()

    def phone_rings(incoming: IncomingCall) -> None:
        if busy.is_set():
            incoming.reject(486)
        else:
            incoming.ring()  # and nobody picks up

    def voicemail_answers(incoming: IncomingCall) -> None:
        incoming.accept()

    phone = UserAgent(phone_stack, "sip:bob@127.0.0.1", on_call=phone_rings)
    voicemail = UserAgent(voicemail_stack, "sip:vm@127.0.0.1", on_call=voicemail_answers)

    def contact(ua: UserAgent) -> URI:
        host, port = ua.stack.local_address("udp")
        return URI(f"sip:{ua.aor.user}@{host}:{port}")

    ForwardOnFailure(proxy_stack, contact(phone), contact(voicemail))
    host, port = proxy_stack.local_address("udp")
    alice = UserAgent(alice_stack, "sip:alice@127.0.0.1", outbound=f"{host}:{port}")

    for case in ("no answer", "busy"):
        if case == "busy":
            busy.set()
        call = await alice.call("sip:bob@example.org", timeout=10)
        print(f"{case}: answered by {call.response.get('Contact')} ({call.response.status})")
        await call.bye()
    for stack in stacks:
        await stack.close()


asyncio.run(main())
