"""Call a SIP user agent (for example sipp's UAS: `sipp -sn uas -i 127.0.0.1 -p 5070`) and hang up.

Usage: python stack_call_sipp.py sip:service@127.0.0.1:5070
"""

import asyncio
import sys

from p2psip.stack import Stack
from p2psip.useragent import UserAgent


async def main(target: str) -> None:
    stack = await Stack.start(listen=["udp:127.0.0.1:0"])  # any free port
    ua = UserAgent(stack, "sip:alice@127.0.0.1")
    call = await ua.call(target, timeout=10)  # INVITE, 1xx, 200, ACK; raises CallFailed otherwise
    print("answered:", call.response.status, call.response.reason)
    print("hung up:", (await call.bye()).status)  # BYE, 200
    await stack.close()


asyncio.run(main(sys.argv[1]))
