"""A voicemail with sipapi's source-code API: answer every call, play a greeting and a beep, then record
what the caller says into a WAV file until the caller hangs up, presses a key, or the time limit passes.
Each user part called is a mailbox (sip:jones@... records into MESSAGES_DIR/jones/). Phones that
SUBSCRIBE to a mailbox's message-summary learn when messages wait and when they are gone (MWI, RFC 3842):
delete a WAV file and they hear so within a second.

Usage: python media_voicemail.py LISTEN_PORT GREETING.wav MESSAGES_DIR
"""

import asyncio
import re
import sys
from itertools import count
from pathlib import Path

from p2psip import mwi
from sipapi import Stack, ToneSource, UserAgent, WavSink

numbers = count(1)
watchers = {}  # mailbox -> the phones subscribed to its message-summary
told = {}  # mailbox -> the number of messages its phones last heard of


def mailbox_of(uri):
    """The mailbox a call or SUBSCRIBE is for: the user part of its Request-URI (a plain name only)."""
    user = uri.user or ""
    return user if re.fullmatch(r"\w[\w.+-]{0,63}", user) else "voicemail"


def summary(folder, mailbox):
    waiting = len(list((folder / mailbox).glob("*.wav")))  # the folder is the state
    return waiting, mwi.compose(mwi.Summary(waiting > 0, None, {"voice-message": (waiting, 0, 0, 0)}))


async def tell(folder, mailbox):
    """NOTIFY the mailbox's phones when its number of messages changed."""
    waiting, body = summary(folder, mailbox)
    if told.get(mailbox) == waiting:
        return
    told[mailbox] = waiting
    phones = watchers.get(mailbox, [])
    phones[:] = [w for w in phones if not w.ended.is_set()]
    for subscription in phones:
        await subscription.notify(body, mwi.CONTENT_TYPE)  # "Messages-Waiting: yes" (or no)


def on_subscribe(folder):
    def subscribed(subscription):
        mailbox = mailbox_of(subscription.request.uri)
        waiting, body = summary(folder, mailbox)
        subscription.accept(body, mwi.CONTENT_TYPE)  # 200, then a NOTIFY with the current summary
        watchers.setdefault(mailbox, []).append(subscription)
        told[mailbox] = waiting

    return subscribed


async def take_message(incoming, greeting, folder, limit=60.0):
    media = await incoming.accept_with_media(play=greeting)  # 200 OK with our SDP; the greeting plays
    session = media.session
    hung_up = asyncio.ensure_future(incoming.wait_ended())
    await asyncio.wait([session.source_done, hung_up], return_when=asyncio.FIRST_COMPLETED)
    if not hung_up.done():  # the greeting is over and the caller is still there
        keys = len(session.received_digits)  # a key pressed from the beep on ends the message
        await session.play(ToneSource(1000, duration=0.2))  # beep
        mailbox = folder / mailbox_of(incoming.request.uri)
        mailbox.mkdir(exist_ok=True)
        path = mailbox / f"message-{next(numbers)}-from-{incoming.caller.uri.user}.wav"
        session.record(WavSink(path))  # from now on what the caller says goes to the file
        key = asyncio.ensure_future(session.wait_digits(keys + 1, timeout=None))
        await asyncio.wait([key, hung_up], timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        key.cancel()
        if not hung_up.done():
            await incoming.bye()  # a key or the time limit ends the message: we hang up
        await hung_up  # the call is over and its media closed: the WAV file is complete
        print("message", path, flush=True)
        await tell(folder, mailbox.name)


async def watch_folder(folder):
    """Messages removed (a WAV file deleted) are news for the phones too."""
    while True:
        await asyncio.sleep(1.0)
        for mailbox in list(watchers):
            await tell(folder, mailbox)


async def main(port, greeting, folder):
    stack = await Stack.start([f"udp:127.0.0.1:{port}"])
    box = UserAgent(
        stack,
        f"sip:voicemail@127.0.0.1:{port}",
        events=["message-summary"],
        on_subscribe=on_subscribe(folder),
    )
    print("voicemail ready", flush=True)
    tasks = {asyncio.ensure_future(watch_folder(folder))}  # keep the tasks referenced while they run
    async for incoming in box.incoming_calls():
        task = asyncio.ensure_future(take_message(incoming, greeting, folder))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


asyncio.run(main(int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])))
