"""SIP messages: parse, inspect, build and serialize requests and responses (RFC 3261 §7, §18.3, §20, §25).

Sans-IO: bytes in, objects out, objects in, bytes out. No sockets or clocks here.

Why it is built this way:

- **Lazy, but safe where it matters.** :func:`parse` splits the header block once into
  ``(key, name, value)`` triples and validates the start line, the framing (Content-Length, §18.3) and the
  headers every transaction needs (top Via, From, To, Call-ID, CSeq), so a message that passes ``parse`` can
  be matched to a transaction and answered without further surprises. Everything else (Contact, Route, the
  other Via values, ...) is parsed on first access and cached; a malformed one raises :class:`ParseError`
  from the property that reads it.
- **Raw values are the source of truth.** The structured properties (``via``, ``from_``, ``to`` ...) are
  read-only views; change a message with :meth:`Message.set` / :meth:`Message.add` / :meth:`Message.remove`,
  which drop the cached views of that header. Headers nobody touched are serialized exactly as received
  (apart from canonical names and normalised whitespace), which is what a proxy needs.
- **Canonical names.** Compact forms and any capitalisation are mapped to one canonical name when parsed
  (``v`` and ``VIA`` become ``Via``); unknown headers keep the name as received.
- :class:`ParseError` is the only exception :func:`parse` raises, whatever the input (checked with
  hypothesis in tests/test_parse_fuzz.py).
"""

from __future__ import annotations

from p2psip.message.authheaders import format_auth, parse_auth
from p2psip.message.framing import StreamFramer
from p2psip.message.ids import REASONS, new_branch, new_call_id, new_tag, random_hex
from p2psip.message.limits import Limits, text_body
from p2psip.message.model import Message, Request, Response, SentResponse
from p2psip.message.names import canonical_name, split_list
from p2psip.message.parser import answerable_head, parse
from p2psip.message.values import CSeq, Via

__all__ = [
    "REASONS",
    "CSeq",
    "Limits",
    "Message",
    "Request",
    "Response",
    "SentResponse",
    "StreamFramer",
    "Via",
    "answerable_head",
    "canonical_name",
    "format_auth",
    "new_branch",
    "new_call_id",
    "new_tag",
    "parse",
    "parse_auth",
    "random_hex",
    "split_list",
    "text_body",
]
