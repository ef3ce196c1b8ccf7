"""The registrar's decisions, sans-IO: a REGISTER plus the bindings already stored -> what to write.

A peer's registrar (RFC 3261 §10.3) does not keep a location database of its own: the overlay is the
database. This module decides, from the request and the bindings currently stored under the AOR (as read
from the DHT), which entries to write or remove and what the 200 OK says, without any I/O or clock (``now``
is passed in, as wall-clock seconds, because binding expiry must mean the same thing on every peer).

Records are the wire format peers share (DESIGN.md "Names, keys and records"): one overlay entry per contact,
``entry_id`` = the contact's ``+sip.instance`` (with its ``reg-id``) or else its URI, and the value a msgpack
map ``{contact, expires, at, call_id, cseq, q?, path?, instance?, reg_id?}``: ``at`` is when it was
registered (Unix time), ``call_id`` and ``cseq`` serve §10.3 step 7's ordering check. Unknown keys are
ignored when decoding, so later versions can add fields.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import msgpack

from p2psip.errors import ParseError, SIPStatusError
from p2psip.message import Request, Response
from p2psip.uri import URI, Address

MAX_RECORD_BYTES = 900  # one entry must fit a UDP overlay datagram (< 1,200 bytes) with its signature


@dataclass(frozen=True, slots=True)
class Binding:
    """One registered contact of an AOR, as stored in (and read back from) the overlay."""

    aor: str
    contact: str
    expires: int
    at: float
    q: float | None = None
    call_id: str = ""
    cseq: int = 0
    path: tuple[str, ...] = ()
    instance: str | None = None
    reg_id: int | None = None

    @property
    def entry_id(self) -> bytes:
        """The overlay entry id: a device's instance (+reg-id) survives contact changes, else the URI."""
        if self.instance:
            suffix = f";reg-id={self.reg_id}" if self.reg_id is not None else ""
            return f"{self.instance}{suffix}".encode()
        return self.contact.encode()

    @property
    def expires_at(self) -> float:
        return self.at + self.expires

    def remaining(self, now: float) -> int:
        """Whole seconds left (never negative)."""
        return max(0, int(self.expires_at - now + 0.5))

    def alive(self, now: float) -> bool:
        return self.expires_at > now

    def contact_uri(self) -> URI:
        return URI(self.contact)


def encode_binding(binding: Binding) -> bytes:
    """The record value stored in the overlay (a msgpack map, see the module docstring)."""
    record: dict[str, object] = {
        "contact": binding.contact,
        "expires": binding.expires,
        "at": binding.at,
        "call_id": binding.call_id,
        "cseq": binding.cseq,
    }
    if binding.q is not None:
        record["q"] = binding.q
    if binding.path:
        record["path"] = list(binding.path)
    if binding.instance:
        record["instance"] = binding.instance
    if binding.reg_id is not None:
        record["reg_id"] = binding.reg_id
    data: bytes = msgpack.packb(record, use_bin_type=True)
    return data


def decode_binding(aor: str, value: bytes) -> Binding:
    """A stored record back into a Binding; anything malformed raises ValueError (the entry is skipped)."""
    try:
        record = msgpack.unpackb(value, raw=False, strict_map_key=True)
    except Exception as exc:
        raise ValueError(f"registration record is not msgpack: {exc}") from None
    if not isinstance(record, dict):
        raise ValueError("registration record is not a map")

    def get(
        name: str, kind: type | tuple[type, ...], default: object = None, required: bool = False
    ) -> object:
        if name not in record:
            if required:
                raise ValueError(f"registration record lacks {name!r}")
            return default
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"registration record field {name!r} has the wrong type")
        return value

    contact = get("contact", str, required=True)
    assert isinstance(contact, str)
    try:
        URI(contact)
    except ParseError as exc:
        raise ValueError(f"registration record has a bad contact: {exc}") from None
    expires = get("expires", int, required=True)
    at = get("at", (int, float), 0.0)
    q = get("q", (int, float))
    path = get("path", list, [])
    assert isinstance(path, list)
    if not all(isinstance(p, str) for p in path):
        raise ValueError("registration record field 'path' must be a list of strings")
    instance = get("instance", str)
    reg_id = get("reg_id", int)
    call_id = get("call_id", str, "")
    cseq = get("cseq", int, 0)
    assert isinstance(expires, int) and isinstance(at, int | float) and isinstance(call_id, str)
    assert isinstance(cseq, int)
    return Binding(
        aor=aor,
        contact=contact,
        expires=expires,
        at=float(at),
        q=float(q) if isinstance(q, int | float) else None,
        call_id=call_id,
        cseq=cseq,
        path=tuple(path),
        instance=instance if isinstance(instance, str) else None,
        reg_id=reg_id if isinstance(reg_id, int) else None,
    )


@dataclass(frozen=True)
class RegistrarPolicy:
    """Limits the registrar enforces (config.py fills them from the peer's settings)."""

    min_expires: int = 60
    max_expires: int = 7200
    default_expires: int = 3600
    max_contacts: int = 16


class RegisterRejected(SIPStatusError):
    """The REGISTER must be answered with ``status`` (and ``headers``), writing nothing."""


@dataclass(frozen=True, slots=True)
class Write:
    """Store (or refresh) one binding under the AOR; ``lifetime`` is the entry's overlay lifetime.

    ``entry_id`` and ``value`` are made once, here: the overlay entry and the home peer's table then hold
    the same bytes objects instead of a copy each (memory per registration), and the record is encoded
    once for its size check and its write."""

    binding: Binding
    entry_id: bytes = field(init=False)
    value: bytes = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "entry_id", self.binding.entry_id)
        object.__setattr__(self, "value", encode_binding(self.binding))

    @property
    def lifetime(self) -> int:
        return self.binding.expires


@dataclass(frozen=True)
class Remove:
    """Remove one binding (a signed empty entry with lifetime 0 in the overlay)."""

    binding: Binding

    @property
    def entry_id(self) -> bytes:
        return self.binding.entry_id


@dataclass
class RegisterPlan:
    """What a REGISTER does: the writes and removals, and the bindings the 200 OK lists afterwards."""

    aor: str
    writes: list[Write] = field(default_factory=list)
    removes: list[Remove] = field(default_factory=list)
    bindings: list[Binding] = field(default_factory=list)

    @property
    def is_query(self) -> bool:
        return not self.writes and not self.removes


def aor_of(request: Request) -> str:
    """The AOR a REGISTER is about: the To header's URI, canonical (§10.3 step 5)."""
    try:
        uri = request.to.uri
        if uri.scheme not in ("sip", "sips") or not uri.user:
            raise RegisterRejected(404, "Not Found")
        return uri.aor()
    except ParseError:
        raise RegisterRejected(400, "Bad To header") from None


def _contact_expires(contact: Address, header_expires: int | None, policy: RegistrarPolicy) -> int:
    try:
        expires = contact.expires
    except (ParseError, ValueError):
        raise RegisterRejected(400, "Bad expires parameter in Contact") from None
    if expires is None:
        expires = header_expires
    if expires is None:
        expires = policy.default_expires
    if expires < 0:
        raise RegisterRejected(400, "Negative expires")
    return min(expires, policy.max_expires)


def plan_register(
    request: Request,
    current: Iterable[Binding],
    now: float,
    policy: RegistrarPolicy | None = None,
    *,
    path: Sequence[str] = (),
) -> RegisterPlan:
    """Decide what a REGISTER does (RFC 3261 §10.3 steps 5-8), given the AOR's stored bindings.

    ``path`` goes before the REGISTER's own Path values in every binding written: a peer that is its
    phones' registrar and first hop at once (their home peer) puts itself there, with a flow token.

    Raises RegisterRejected for 400 (bad Contact/expires, `*` misuse, out-of-order CSeq), 423 (interval
    too brief, with Min-Expires) and 403 (too many contacts).
    """
    policy = policy or RegistrarPolicy()
    aor = aor_of(request)
    live = [b for b in current if b.aor == aor and b.alive(now)]
    try:
        contacts = request.contacts
        header_expires = request.expires
        call_id = request.call_id
        cseq = request.cseq.number
    except (ParseError, ValueError):
        raise RegisterRejected(400, "Bad Contact, Expires, Call-ID or CSeq header") from None
    plan = RegisterPlan(aor)
    if not contacts:
        plan.bindings = live
        return plan

    if any(c.wildcard for c in contacts):
        if len(contacts) != 1 or header_expires != 0:
            raise RegisterRejected(400, "Wildcard Contact needs Expires: 0 and no other Contact")
        for binding in live:
            if binding.call_id == call_id and binding.cseq >= cseq:
                raise RegisterRejected(400, "Out of order CSeq")
        plan.removes = [Remove(b) for b in live]
        return plan

    remaining = list(live)
    for contact in contacts:
        uri = contact.uri
        if uri.scheme not in ("sip", "sips"):
            raise RegisterRejected(400, f"Unsupported contact scheme {uri.scheme}")
        expires = _contact_expires(contact, header_expires, policy)
        if 0 < expires < policy.min_expires:
            raise RegisterRejected(423, "Interval Too Brief", [("Min-Expires", str(policy.min_expires))])
        instance = contact.params.get("+sip.instance")
        instance = instance.strip('"') if instance else None
        reg_id_text = contact.params.get("reg-id")
        reg_id = int(reg_id_text) if reg_id_text and reg_id_text.isdigit() else None
        contact_text = str(uri)
        existing = next(
            (
                b
                for b in remaining
                if (instance and b.instance == instance and b.reg_id == reg_id)
                or (not instance and not b.instance and b.contact_uri() == uri)
            ),
            None,
        )
        if existing is not None:
            if existing.call_id == call_id and existing.cseq >= cseq:
                raise RegisterRejected(400, "Out of order CSeq")
            remaining.remove(existing)
            if not instance:
                contact_text = existing.contact  # keep the entry id stable across textual variants
        q_value: float | None
        try:
            q_value = contact.q
        except (ParseError, ValueError):
            raise RegisterRejected(400, "Bad q parameter in Contact") from None
        binding = Binding(
            aor=aor,
            contact=contact_text,
            expires=expires,
            at=now,
            q=q_value,
            call_id=call_id,
            cseq=cseq,
            path=(*path, *request.get_all("Path")),
            instance=instance,
            reg_id=reg_id,
        )
        write = Write(binding)
        if len(write.value) > MAX_RECORD_BYTES:
            raise RegisterRejected(400, "Contact too long to store")
        if expires == 0:
            if existing is not None:
                plan.removes.append(Remove(existing))
        else:
            plan.writes.append(write)
    plan.bindings = remaining + [w.binding for w in plan.writes]
    if len(plan.bindings) > policy.max_contacts:
        raise RegisterRejected(403, f"Too many contacts (at most {policy.max_contacts})")
    return plan


def contact_instances(request: Request) -> list[str]:
    """The ``+sip.instance`` values (quotes removed) of a REGISTER's contacts, in order; [] if none or if
    the Contact header cannot be read (the registrar answers that 400 itself)."""
    try:
        contacts = request.contacts
    except (ParseError, ValueError):
        return []
    out = []
    for contact in contacts:
        value = contact.params.get("+sip.instance")
        if value:
            out.append(value.strip('"'))
    return out


def ok_response(
    request: Request, plan: RegisterPlan, now: float, own_instances: Iterable[str] = ()
) -> Response:
    """The 200 OK listing every current binding with its remaining expiry (§10.3 step 8).

    A binding's ``+sip.instance`` (and ``reg-id``) is echoed only when the REGISTER itself carries that
    instance (``own_instances``): the device that owns it learns its binding is there (RFC 5626 §6; JsSIP
    needs it), and nobody else ever reads an instance id, which the home peer treats as the device's proof
    of ownership (p2psip.ownership)."""
    response = Response.for_request(request, 200)
    own = set(own_instances)

    def shown(b: Binding) -> str:
        text = f"<{b.contact}>;expires={b.remaining(now)}" + (f";q={b.q:g}" if b.q is not None else "")
        if b.instance and b.instance in own:
            text += f';+sip.instance="{b.instance}"'
            if b.reg_id is not None:
                text += f";reg-id={b.reg_id}"
        return text

    contacts = [shown(b) for b in plan.bindings if b.alive(now)]
    if contacts:
        response.set("Contact", contacts)
    return response
