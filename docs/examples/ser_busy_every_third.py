"""A sipp-style test UAS as a script server: answers every INVITE, but every third one with 486 Busy Here.

Usage: python ser_busy_every_third.py [PORT]   (then e.g. `sipp -sn uac 127.0.0.1:PORT -m 30`)
"""

import itertools
import sys

from sipapi import basic, open, run

open(("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 5060))
invites = itertools.count(1)  # handlers run in threads: next() on a count is atomic


def uas(event):
    if event.method == "INVITE":
        if next(invites) % 3 == 0:
            return event.action.reject(code=486, reason="Busy Here")
        return event.action.accept()  # 200 OK with our Contact; the ACK is absorbed by the server
    if event.method in ("BYE", "OPTIONS"):
        return event.action.accept()
    return event.action.reject(code=405, reason="Method Not Allowed")


basic.addEventListener("incoming", uas)
run()
