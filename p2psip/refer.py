"""The headers of call transfer, sans-IO: ``Refer-To`` (RFC 3515), ``Replaces`` (RFC 3891) and
``Refer-Sub`` (RFC 4488), and the checks a REFER or an INVITE with Replaces needs before anyone acts.

* :func:`check_refer` reads a received REFER: exactly one Refer-To with a ``sip:``/``sips:`` URI (400
  otherwise, 403 for other schemes, which we do not dereference), the target to call and the headers the
  referrer asked to put into the new request (``Replaces``), and whether the referrer asked for no
  implicit subscription (``Refer-Sub: false``; then the 2xx echoes it and no NOTIFY is sent).
* :class:`Replaces` is built from a dialog for an attended transfer (:meth:`Replaces.for_dialog`: the tags
  as the *other* end of that dialog sees them) and matched on receipt (:meth:`Replaces.dialog_id`: the
  to-tag is the recipient's local tag, the from-tag its remote tag, RFC 3891 §3).
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import quote, unquote

from p2psip.dialog import Dialog, DialogId
from p2psip.errors import ParseError
from p2psip.message import Request
from p2psip.subscription import Reject
from p2psip.uri import URI, Address, format_params, parse_params

__all__ = ["ReferDecision", "Replaces", "check_refer", "refer_to", "wants_no_subscription"]

OPTION_TAG_NOREFERSUB = "norefersub"
OPTION_TAG_REPLACES = "replaces"
NEW_REQUEST_HEADERS = frozenset({"replaces", "accept-contact", "require", "subject"})
"""URI headers of a Refer-To that are copied into the new INVITE; any other (``Call-ID``, ``Via``...) is
ignored: a referrer does not get to forge the referee's request."""


class Replaces(NamedTuple):
    """``Replaces: call-id;to-tag=...;from-tag=...[;early-only]``."""

    call_id: str
    to_tag: str
    from_tag: str
    early_only: bool = False

    @classmethod
    def parse(cls, text: str) -> Replaces:
        value = text.strip(" \t")
        call_id, sep, rest = value.partition(";")
        call_id = call_id.strip(" \t")
        if not call_id or any(c in call_id for c in ' \t\r\n"<>'):
            raise ParseError(f"bad Replaces {text[:80]!r}")
        params = parse_params(rest, value) if sep else {}
        to_tag, from_tag = params.get("to-tag"), params.get("from-tag")
        if not to_tag or not from_tag:
            raise ParseError(f"Replaces without to-tag and from-tag: {text[:80]!r}")
        return cls(call_id, to_tag, from_tag, "early-only" in params)

    @classmethod
    def for_dialog(cls, dialog: Dialog, *, early_only: bool = False) -> Replaces:
        """What replaces ``dialog`` at its other end: there our remote tag is the local one (to-tag)."""
        return cls(dialog.call_id, dialog.remote_tag, dialog.local_tag, early_only)

    def dialog_id(self) -> DialogId:
        """The id of the dialog this names, at the UA that receives it (local tag = to-tag)."""
        return DialogId(self.call_id, self.to_tag, self.from_tag)

    def __str__(self) -> str:
        params: dict[str, str | None] = {"to-tag": self.to_tag, "from-tag": self.from_tag}
        if self.early_only:
            params["early-only"] = None
        return self.call_id + format_params(params)


def refer_to(target: URI, replaces: Replaces | None = None) -> str:
    """A Refer-To value for ``target`` (its own headers dropped), with an escaped Replaces header for an
    attended transfer: ``<sip:c@host?Replaces=id%40h%3Bto-tag%3D1%3Bfrom-tag%3D2>``."""
    uri = target.copy()
    uri.headers = {}
    if replaces is not None:
        uri.headers = {"Replaces": quote(str(replaces), safe="")}
    return str(Address.build(uri))


class ReferDecision(NamedTuple):
    """What a valid REFER asks: call ``target`` with ``headers`` (unescaped), and whether the referrer
    wants the implicit ``refer`` subscription (False after ``Refer-Sub: false``, RFC 4488)."""

    target: URI
    headers: tuple[tuple[str, str], ...]
    subscription: bool
    replaces: Replaces | None


def wants_no_subscription(request: Request) -> bool:
    """``Refer-Sub: false`` (RFC 4488 §4): the REFER sender does not want NOTIFYs."""
    value = request.get("Refer-Sub")
    return value is not None and value.partition(";")[0].strip(" \t").lower() == "false"


def check_refer(request: Request) -> ReferDecision | Reject:
    """Read a REFER: the decision, or the :class:`Reject` (400 / 403) to answer it with."""
    values = request.get_all("Refer-To")
    if len(values) != 1:
        return Reject(400, "Bad Request (a REFER needs exactly one Refer-To)")
    try:
        address = Address(values[0])
        uri = address.uri
    except ParseError as exc:
        return Reject(400, f"Bad Request (Refer-To: {exc})")
    if uri.scheme not in ("sip", "sips"):
        return Reject(403, f"Forbidden (will not refer to a {uri.scheme[:16]}: URI)")
    headers: list[tuple[str, str]] = []
    replaces: Replaces | None = None
    for name, value in uri.headers.items():
        key = name.lower()
        if key not in NEW_REQUEST_HEADERS:
            continue
        text = unquote(value)
        if any(c in text for c in "\r\n\x00"):
            return Reject(400, "Bad Request (line break in a Refer-To header)")
        if key == "replaces":
            try:
                replaces = Replaces.parse(text)
            except ParseError as exc:
                return Reject(400, f"Bad Request (Refer-To Replaces: {exc})")
            text = str(replaces)
        headers.append(("Replaces" if key == "replaces" else name, text))
    target = uri.copy()
    target.headers = {}
    target.params.pop("method", None)
    return ReferDecision(target, tuple(headers), not wants_no_subscription(request), replaces)
