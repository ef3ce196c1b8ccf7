"""Where a user's ``message-summary`` subscriptions go (RFC 3842 through the overlay), sans-IO.

A phone subscribes to message-waiting indication for its *own* AOR (baresip's ``mwi`` module does so
after registering). In a serverless network no peer holds the user's voicemail; the voicemail is a
service of its own (``docs/examples/media_voicemail.py``) reached at some address, typically an AOR of
its own registered in the overlay (the article's ``sip:jones@voicemail.example.com``). The peer's config
names it per user (``[voicemail] "sip:jones@example.com" = "sip:jones@voicemail.example.com"``), and a
``message-summary`` SUBSCRIBE for the user's AOR is *retargeted* there: the voicemail, which holds the
messages, is the notifier (it NOTIFYs the phones over the dialog's route set when a message arrives or is
removed).

Who may subscribe: message counts are nobody else's business, so only the mailbox owner's own devices
(the SUBSCRIBE's From is the owner's AOR and a peer vouches for it, as for presence watchers); everyone
else gets ``403``. The owner of a voicemail's own address (the value side of the table) is the user it
serves, so the retargeted SUBSCRIBE passes that address's agent too. :class:`MailboxPolicy` decides;
the peer (:mod:`p2psip.peer`) routes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from p2psip.errors import ParseError
from p2psip.message import Request
from p2psip.mwi import EVENT
from p2psip.subscription import EventHeader
from p2psip.uri import URI

__all__ = ["Forbidden", "MailboxPolicy", "NoMailbox", "Proxy", "Retarget", "is_message_summary"]


def is_message_summary(request: Request) -> bool:
    """A SUBSCRIBE for the ``message-summary`` package (an unreadable Event is not ours to judge)."""
    if request.method != "SUBSCRIBE":
        return False
    try:
        event = EventHeader.of(request)
    except ParseError:
        return False
    return event is not None and event.package == EVENT


@dataclass(frozen=True, slots=True)
class Forbidden:
    """403: the watcher is not a vouched device of the mailbox's owner."""

    owner: str


@dataclass(frozen=True, slots=True)
class Retarget:
    """Send the SUBSCRIBE on to the owner's voicemail at ``uri``."""

    uri: str


@dataclass(frozen=True, slots=True)
class Proxy:
    """The AOR is itself a voicemail's address: proxy the SUBSCRIBE to its devices (the voicemail)."""


@dataclass(frozen=True, slots=True)
class NoMailbox:
    """404: no voicemail is known for this AOR (its devices would only be asked to subscribe to
    themselves)."""


class MailboxPolicy:
    """The ``[voicemail]`` table: owner AOR -> the voicemail's URI (see the module docstring)."""

    def __init__(self, mailboxes: Mapping[str, str]) -> None:
        self.mailboxes = dict(mailboxes)
        self._owners: dict[str, str] = {}
        for owner, target in self.mailboxes.items():
            try:
                self._owners[URI(target).aor()] = owner
            except (ParseError, ValueError):
                continue  # not an AOR-shaped URI: it is reached, but no SUBSCRIBE names it

    def owner(self, aor: str) -> str:
        """Whose messages ``aor``'s message-summary tells: the user a voicemail address serves, or the AOR."""
        return self._owners.get(aor, aor)

    def decide(self, aor: str, watcher: str, *, vouched: bool) -> Forbidden | Retarget | Proxy | NoMailbox:
        """What to do with a ``message-summary`` SUBSCRIBE for ``aor`` (canonical) from ``watcher`` (the
        canonical AOR of its From; ``vouched``: a peer vouches for that From)."""
        owner = self.owner(aor)
        if not vouched or watcher != owner:
            return Forbidden(owner)
        if aor in self._owners:  # a voicemail's own address (also an owner naming itself: no loop)
            return Proxy()
        target = self.mailboxes.get(aor)
        if target is not None:
            return Retarget(target)
        return NoMailbox()
