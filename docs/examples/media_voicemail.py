"""A voicemail with sipapi's source-code API: answer every call, play a greeting and a beep, then record
what the caller says into a WAV file until the caller hangs up, presses a key, or the time limit passes.
Phones that SUBSCRIBE to its message-summary learn when messages wait (MWI, RFC 3842).

Usage: python media_voicemail.py LISTEN_PORT GREETING.wav MESSAGES_DIR
"""

import asyncio
import sys
from itertools import count
from pathlib import Path

from p2psip import mwi
from sipapi import Stack, ToneSource, UserAgent, WavSink

numbers = count(1)
messages = []  # the WAV files recorded so far
watchers = []  # the phones subscribed to our message-summary


def summary():
    counts = {"voice-message": (len(messages), 0, 0, 0)}
    return mwi.compose(mwi.Summary(bool(messages), None, counts))


def on_subscribe(subscription):
    subscription.accept(summary(), mwi.CONTENT_TYPE)  # 200, then a NOTIFY with the current summary
    watchers.append(subscription)


async def take_message(incoming, greeting, folder, limit=60.0):
    media = await incoming.accept_with_media(play=greeting)  # 200 OK with our SDP; the greeting plays
    session = media.session
    hung_up = asyncio.ensure_future(incoming.wait_ended())
    await asyncio.wait([session.source_done, hung_up], return_when=asyncio.FIRST_COMPLETED)
    if not hung_up.done():  # the greeting is over and the caller is still there
        keys = len(session.received_digits)  # a key pressed from the beep on ends the message
        await session.play(ToneSource(1000, duration=0.2))  # beep
        path = folder / f"message-{next(numbers)}-from-{incoming.caller.uri.user}.wav"
        session.record(WavSink(path))  # from now on what the caller says goes to the file
        key = asyncio.ensure_future(session.wait_digits(keys + 1, timeout=None))
        await asyncio.wait([key, hung_up], timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        key.cancel()
        if not hung_up.done():
            await incoming.bye()  # a key or the time limit ends the message: we hang up
        await hung_up  # the call is over and its media closed: the WAV file is complete
        print("message", path, flush=True)
        messages.append(path)
        for subscription in [w for w in watchers if not w.ended.is_set()]:
            await subscription.notify(summary(), mwi.CONTENT_TYPE)  # "Messages-Waiting: yes"


async def main(port, greeting, folder):
    stack = await Stack.start([f"udp:127.0.0.1:{port}"])
    box = UserAgent(
        stack, f"sip:voicemail@127.0.0.1:{port}", events=["message-summary"], on_subscribe=on_subscribe
    )
    print("voicemail ready", flush=True)
    calls = set()  # keep the tasks referenced while they run
    async for incoming in box.incoming_calls():
        task = asyncio.ensure_future(take_message(incoming, greeting, folder))
        calls.add(task)
        task.add_done_callback(calls.discard)


asyncio.run(main(int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])))
