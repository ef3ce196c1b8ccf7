"""p2psip: a peer-to-peer SIP node.

The SIP stack lives in this package (message, uri, transaction, dialog, auth, transport, stack), the
peer node that joins it to the overlay in :mod:`p2psip.peer`, and the command line in :mod:`p2psip.cli`.
"""

__version__ = "0.1.0"
