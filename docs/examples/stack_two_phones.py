"""Two user agents in one process: alice calls bob, they exchange a MESSAGE and an OPTIONS, alice hangs up.

Usage: python stack_two_phones.py
"""

import asyncio

from p2psip.stack import Stack
from p2psip.useragent import IncomingCall, UserAgent


async def main() -> None:
    alice_stack = await Stack.start(listen=["udp:127.0.0.1:0"])
    bob_stack = await Stack.start(listen=["udp:127.0.0.1:0", "tcp:127.0.0.1:0"])
    host, port = bob_stack.local_address("udp")
    bob_uri = f"sip:bob@{host}:{port}"

    def answer(incoming: IncomingCall) -> None:  # called for every INVITE bob receives
        print("bob: call from", incoming.caller.uri)
        incoming.ring()  # 180 Ringing
        incoming.accept(b"v=0\r\n")  # 200 OK with a (tiny) SDP body, retransmitted until the ACK

    alice = UserAgent(alice_stack, "sip:alice@127.0.0.1")
    bob = UserAgent(bob_stack, "sip:bob@127.0.0.1", on_call=answer)

    call = await alice.call(bob_uri, body=b"v=0\r\n")
    print("alice: call state", call.state)

    reply = await alice.message(bob_uri, "are you there?")
    received = await bob.messages.get()
    print("bob got:", received.body.decode(), "| alice got:", reply.status, reply.reason)

    options = await alice.options(bob_uri)
    print("bob allows:", ", ".join(options.get_all("Allow")))

    bye = await call.bye()
    incoming = await bob.incoming.get()
    print("alice: BYE ->", bye.status, "| bob:", await incoming.wait_ended(5))
    await alice_stack.close()
    await bob_stack.close()


asyncio.run(main())
