"""SER's `t_relay()` to a fixed next hop, as a script server: every new request goes to the gateway,
statefully (Record-Route, CANCEL, best response); in-dialog requests follow their Route.

Usage: python ser_forwarder.py PORT NEXT_HOST:NEXT_PORT
"""

import sys

from sipapi import URI, basic, open, run

open(("127.0.0.1", int(sys.argv[1])))
gateway = sys.argv[2]


def relay(event):
    if event["Max-Forwards"] and int(event["Max-Forwards"].value) <= 0:
        return event.action.reject(code=483, reason="Too many hops")
    if not event["Route"]:  # a new request (in-dialog ones carry our Record-Route as Route)
        event.location = URI(f"sip:{event.uri.user or 'gw'}@{gateway}")
    event.action.proxy(timeout=30)  # t_relay(); a failure's best response goes upstream on return


basic.addEventListener("incoming", relay)
run()
