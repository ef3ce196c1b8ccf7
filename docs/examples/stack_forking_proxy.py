"""A stateful proxy that forks a call to two phones; the first to answer wins, the other is CANCELled.

The ``locate`` hook is where a peer plugs its DHT lookup in; here it is a static table.
Usage: python stack_forking_proxy.py
"""

import asyncio

from p2psip.proxy import Proxy
from p2psip.stack import Stack
from p2psip.uri import URI
from p2psip.useragent import IncomingCall, UserAgent


async def main() -> None:
    stacks = [await Stack.start(listen=["udp:127.0.0.1:0"]) for _ in range(4)]
    proxy_stack, alice_stack, desk_stack, mobile_stack = stacks
    desk = UserAgent(desk_stack, "sip:bob@127.0.0.1", on_call=lambda call: call.ring())

    def answer(incoming: IncomingCall) -> None:
        incoming.ring()
        incoming.accept()

    mobile = UserAgent(mobile_stack, "sip:bob@127.0.0.1", on_call=answer)

    def contact(ua: UserAgent) -> URI:
        host, port = ua.stack.local_address("udp")
        return URI(f"sip:bob@{host}:{port}")

    Proxy(proxy_stack, locate=lambda request: [contact(desk), contact(mobile)])
    host, port = proxy_stack.local_address("udp")
    alice = UserAgent(alice_stack, "sip:alice@127.0.0.1", outbound=f"{host}:{port}")

    call = await alice.call("sip:bob@example.org", timeout=10)  # no DNS: the proxy's locate() decides
    ringing_desk = await desk.incoming.get()
    print("answered by:", call.response.get("Contact"))
    print("desk phone:", await ringing_desk.wait_ended(5))  # "cancelled"
    await call.bye()
    for stack in stacks:
        await stack.close()


asyncio.run(main())
