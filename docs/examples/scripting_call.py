"""Make a call with the source-code API (Layer 1): python scripting_call.py sip:service@127.0.0.1:5070
(an AOR through a peer: python scripting_call.py sip:bob@p2p.example 127.0.0.1:5060)"""

import asyncio
import sys

from sipapi import Stack, UserAgent


async def main(target, via=None):
    stack = await Stack.start(["udp:127.0.0.1:0"])  # any free port on loopback
    phone = UserAgent(stack, "sip:alice@127.0.0.1", outbound=via)  # via: the peer's HOST:PORT, or None
    call = await phone.call(target, timeout=10)  # INVITE ... 200 OK, ACK (CallFailed otherwise)
    print("answered:", call.response.status, call.response.reason)
    print("hung up:", (await call.bye()).status)  # BYE, 200
    await stack.close()


asyncio.run(main(*sys.argv[1:3]))
