"""A back-to-back user agent with the source-code API: each call that arrives on one side is placed anew
on the other (its own Call-ID, tags and CSeq), answered with the far end's answer, and hung up on both
sides when either hangs up. (sipp's docs test proxies and B2BUAs with uac/uas pairs; so do the tests.)

Usage: python scripting_b2bua.py LISTEN_PORT FAR_HOST:FAR_PORT
"""

import asyncio
import sys

from sipapi import CallFailed, Stack, UserAgent


async def bridge(incoming, far, target):
    incoming.ring()
    try:
        uri = f"sip:{incoming.request.uri.user}@{target}"
        out = await far.call(uri, body=incoming.remote_body, timeout=30)
    except CallFailed as failed:
        return incoming.reject(failed.status if failed.status >= 400 else 502)
    incoming.accept(out.remote_body)  # the far end's SDP answer
    legs = [asyncio.ensure_future(incoming.wait_ended()), asyncio.ensure_future(out.wait_ended())]
    done, pending = await asyncio.wait(legs, return_when=asyncio.FIRST_COMPLETED)
    other = out if legs[0] in done else incoming
    if other.state != "terminated":
        await other.bye()  # hang up the other leg
    for leg in pending:
        leg.cancel()


async def main(port, target):
    near_stack = await Stack.start([f"udp:127.0.0.1:{port}"])
    far_stack = await Stack.start(["udp:127.0.0.1:0"])
    far = UserAgent(far_stack, "sip:b2bua@127.0.0.1")
    near = UserAgent(near_stack, f"sip:b2bua@127.0.0.1:{port}")
    print("b2bua ready", flush=True)
    calls = set()  # keep the bridging tasks referenced while they run
    async for incoming in near.incoming_calls():
        task = asyncio.ensure_future(bridge(incoming, far, target))
        calls.add(task)
        task.add_done_callback(calls.discard)


asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
