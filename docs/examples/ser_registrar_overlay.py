"""SER's registrar + location + t_relay, but the location table is the peer-to-peer overlay.

Usage: python ser_registrar_overlay.py SIP_PORT OVERLAY_PORT [JOIN_HOST:JOIN_PORT]
Run two of them (the second joining the first), REGISTER at one, call through the other.
"""

import sys

from sipapi import basic, open, overlay, run

open(("127.0.0.1", int(sys.argv[1])))
join = sys.argv[3].rsplit(":", 1) if len(sys.argv) > 3 else None
overlay(("127.0.0.1", int(sys.argv[2])), join=(join[0], int(join[1])) if join else None, quick=True)


def route(event):
    if event["Max-Forwards"] and int(event["Max-Forwards"].value) <= 0:
        return event.action.reject(code=483, reason="Too many hops")
    if event.method == "REGISTER":
        return event.action.save()  # save("location"): signed entries in the DHT
    if event["Route"] or event["To"].tag:
        return event.action.proxy()  # in-dialog: loose routing
    if not event.lookup():  # lookup("location"): a DHT lookup
        return event.action.reject(code=404, reason="Not Found")
    event.action.proxy(timeout=30)  # t_relay(): forks to every contact


basic.addEventListener("incoming", route)
run()
