"""sipapi: the scripting API of the article this project grew from (see docs/scripting.md).

``from sipapi import *`` gives a script everything it needs:

- the source-code API (layer 1): :class:`URI`, :class:`Address`, :class:`Message`, :class:`Request`,
  :class:`Response`, :class:`Transaction`, :class:`Dialog`, :class:`Stack`, :class:`UserAgent`,
  :class:`Peer` (the article: "object-oriented classes such as Transaction, Dialog, Stack");
- the audio a call plays and records (see docs/media.md): :class:`ToneSource`, :class:`WavSource`,
  :class:`WavSink`, :class:`MemorySink`, so a script that answers with media needs nothing but sipapi;
- the errors a script catches (:mod:`sipapi.errors`): :class:`CallFailed`, :class:`SIPStatusError`,
  :class:`ScriptError`;
- the scripting names (layers 2 and 3): ``open`` (an address tuple listens, anything else is the built-in
  open), ``run``, ``basic``, ``overlay``, :class:`Event`.
"""

from p2psip.dialog import Dialog
from p2psip.media.sources import MemorySink, ToneSource, WavSink, WavSource
from p2psip.message import Message, Request, Response
from p2psip.peer import Peer
from p2psip.stack import Stack
from p2psip.transaction import Transaction
from p2psip.uri import URI, Address
from p2psip.useragent import UserAgent

from .errors import CallFailed, SIPStatusError
from .events import Event, EventTarget, Header, ScriptError
from .server import basic, open, overlay, run

__all__ = [
    "URI",
    "Address",
    "CallFailed",
    "Dialog",
    "Event",
    "EventTarget",
    "Header",
    "MemorySink",
    "Message",
    "Peer",
    "Request",
    "Response",
    "SIPStatusError",
    "ScriptError",
    "Stack",
    "ToneSource",
    "Transaction",
    "UserAgent",
    "WavSink",
    "WavSource",
    "basic",
    "open",
    "overlay",
    "run",
]
