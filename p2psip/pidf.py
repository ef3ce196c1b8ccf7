"""Presence documents: PIDF (RFC 3863) with the RPID activities phones use for "away" / "busy" (RFC 4480).

:func:`parse` reads a PIDF body into a :class:`Presence`, :meth:`Presence.compose` writes one, and
:func:`merge` composes the documents of several devices of one user (any ``open`` tuple means open; every
tuple and note is kept).

The XML comes from strangers, so the parser is :func:`parse_xml`: Python's expat driven directly, with a
document type declaration refused outright (no internal entities, so no "billion laughs"; no external
entities or DTDs, so nothing is ever fetched), parameter entities off, and bounds on size, depth and
element count. That is what ``defusedxml``'s ``forbid_dtd=True`` does, in 40 lines of the standard library,
so the project needs no XML dependency.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from xml.parsers import expat

from p2psip.errors import ParseError

__all__ = ["CONTENT_TYPE", "PIDF_NS", "Presence", "PresenceTuple", "merge", "parse", "parse_xml"]

CONTENT_TYPE = "application/pidf+xml"
PIDF_NS = "urn:ietf:params:xml:ns:pidf"
DM_NS = "urn:ietf:params:xml:ns:pidf:data-model"
RPID_NS = "urn:ietf:params:xml:ns:pidf:rpid"

MAX_BYTES = 64 * 1024
MAX_DEPTH = 32
MAX_ELEMENTS = 2000


class _Refused(Exception):
    pass


def parse_xml(data: bytes, *, max_bytes: int = MAX_BYTES) -> ET.Element:
    """Parse untrusted XML into an ElementTree element (names as ``{namespace}local``).

    Refuses (``ParseError``, status hint 400) a DOCTYPE, any entity declaration, more than ``max_bytes``,
    deeper than 32 levels or more than 2,000 elements, and anything that is not well-formed."""
    if len(data) > max_bytes:
        raise ParseError(f"XML body of {len(data)} bytes is over the limit of {max_bytes}")
    builder = ET.TreeBuilder()
    parser = expat.ParserCreate(namespace_separator="}")
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    depth = 0
    count = 0

    def name_of(raw: str) -> str:
        return "{" + raw if "}" in raw else raw

    def start(raw: str, attrs: dict[str, str]) -> None:
        nonlocal depth, count
        depth += 1
        count += 1
        if depth > MAX_DEPTH or count > MAX_ELEMENTS:
            raise _Refused("XML nested too deep or too many elements")
        builder.start(name_of(raw), {name_of(k): v for k, v in attrs.items()})

    def end(raw: str) -> None:
        nonlocal depth
        depth -= 1
        builder.end(name_of(raw))

    def refuse_doctype(*_args: object) -> None:
        raise _Refused("a DOCTYPE is not allowed")

    def refuse_entity(*_args: object) -> None:
        raise _Refused("entity declarations are not allowed")

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = builder.data
    parser.StartDoctypeDeclHandler = refuse_doctype
    parser.EntityDeclHandler = refuse_entity
    parser.UnparsedEntityDeclHandler = refuse_entity
    parser.ExternalEntityRefHandler = refuse_entity  # type: ignore[assignment]
    try:
        parser.Parse(data, True)
        return builder.close()
    except _Refused as exc:
        raise ParseError(f"refused XML: {exc}") from None
    except (expat.ExpatError, ValueError, AssertionError) as exc:
        raise ParseError(f"malformed XML: {exc}") from None


@dataclass
class PresenceTuple:
    """One ``<tuple>``: a device or service of the presentity."""

    id: str
    basic: str | None = None  # "open" / "closed" / None (no basic status given)
    contact: str | None = None
    priority: float | None = None
    notes: list[str] = field(default_factory=list)
    timestamp: str | None = None


@dataclass
class Presence:
    """A presence document: the presentity (``entity``, a ``pres:`` or ``sip:`` URI), its tuples, notes
    and RPID activities of the person (``away``, ``busy``, ``on-the-phone``...)."""

    entity: str
    tuples: list[PresenceTuple] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    activities: list[str] = field(default_factory=list)

    @property
    def basic(self) -> str:
        """``open`` when any tuple is open, else ``closed``."""
        return "open" if any(t.basic == "open" for t in self.tuples) else "closed"

    def compose(self) -> bytes:
        """The PIDF XML of this document (UTF-8; a data-model/RPID person when there are activities)."""
        ET.register_namespace("", PIDF_NS)
        ET.register_namespace("dm", DM_NS)
        ET.register_namespace("rpid", RPID_NS)
        root = ET.Element(f"{{{PIDF_NS}}}presence", {"entity": self.entity})
        for tup in self.tuples:
            node = ET.SubElement(root, f"{{{PIDF_NS}}}tuple", {"id": tup.id})
            status = ET.SubElement(node, f"{{{PIDF_NS}}}status")
            if tup.basic is not None:
                ET.SubElement(status, f"{{{PIDF_NS}}}basic").text = tup.basic
            if tup.contact is not None:
                contact = ET.SubElement(node, f"{{{PIDF_NS}}}contact")
                contact.text = tup.contact
                if tup.priority is not None:
                    contact.set("priority", f"{tup.priority:g}")
            for note in tup.notes:
                ET.SubElement(node, f"{{{PIDF_NS}}}note").text = note
            if tup.timestamp is not None:
                ET.SubElement(node, f"{{{PIDF_NS}}}timestamp").text = tup.timestamp
        if self.activities:
            person = ET.SubElement(root, f"{{{DM_NS}}}person", {"id": "p"})
            acts = ET.SubElement(person, f"{{{RPID_NS}}}activities")
            for activity in self.activities:
                ET.SubElement(acts, f"{{{RPID_NS}}}{activity}")
        for note in self.notes:
            ET.SubElement(root, f"{{{PIDF_NS}}}note").text = note
        text: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=False)
        return b'<?xml version="1.0" encoding="UTF-8"?>\n' + text


def _text(node: ET.Element | None) -> str | None:
    if node is None:
        return None
    return (node.text or "").strip()


_BASIC = frozenset({"open", "closed"})
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def parse(data: bytes) -> Presence:
    """Read a PIDF document; raises :class:`ParseError` (answer 400) for anything that is not one:
    refused or malformed XML, another root element, a tuple without id or status, a bad basic value."""
    root = parse_xml(data)
    if root.tag != f"{{{PIDF_NS}}}presence":
        raise ParseError(f"not a PIDF document (root element {root.tag[:80]!r})")
    entity = root.get("entity")
    if not entity:
        raise ParseError("PIDF <presence> without entity")
    doc = Presence(entity)
    for node in root.findall(f"{{{PIDF_NS}}}tuple"):
        tuple_id = node.get("id")
        status = node.find(f"{{{PIDF_NS}}}status")
        if not tuple_id or status is None:
            raise ParseError("PIDF <tuple> without id or <status>")
        basic = _text(status.find(f"{{{PIDF_NS}}}basic"))
        if basic is not None and basic not in _BASIC:
            basic = None  # e.g. baresip 1.0 writes "?" before its user chose a status: unknown, not an error
        contact_node = node.find(f"{{{PIDF_NS}}}contact")
        priority: float | None = None
        if contact_node is not None and contact_node.get("priority") is not None:
            try:
                priority = float(contact_node.get("priority") or "")
            except ValueError:
                raise ParseError("PIDF contact priority is not a number") from None
            if not 0.0 <= priority <= 1.0:
                raise ParseError("PIDF contact priority must be between 0 and 1")
        doc.tuples.append(
            PresenceTuple(
                tuple_id,
                basic,
                _text(contact_node),
                priority,
                [_text(n) or "" for n in node.findall(f"{{{PIDF_NS}}}note")],
                _text(node.find(f"{{{PIDF_NS}}}timestamp")),
            )
        )
    doc.notes = [_text(n) or "" for n in root.findall(f"{{{PIDF_NS}}}note")]
    for acts in root.iter(f"{{{RPID_NS}}}activities"):
        for act in acts:
            local = act.tag.rpartition("}")[2]
            if act.tag.startswith(f"{{{RPID_NS}}}") and _NAME_CHARS.issuperset(local) and local:
                doc.activities.append(local)
    return doc


def merge(entity: str, documents: list[Presence]) -> Presence:
    """One document for a user from the documents of its devices: every tuple (ids made unique), every
    note and activity once; its :attr:`Presence.basic` is open when any device is open."""
    merged = Presence(entity)
    seen: set[str] = set()
    for doc in documents:
        for tup in doc.tuples:
            tid = tup.id
            n = 1
            while tid in seen:
                n += 1
                tid = f"{tup.id}-{n}"
            seen.add(tid)
            merged.tuples.append(
                PresenceTuple(tid, tup.basic, tup.contact, tup.priority, list(tup.notes), tup.timestamp)
            )
        merged.notes.extend(n for n in doc.notes if n not in merged.notes)
        merged.activities.extend(a for a in doc.activities if a not in merged.activities)
    return merged
