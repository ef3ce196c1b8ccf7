"""Hypothesis on the inputs of the events framework: PIDF bodies, sipfrag bodies, Event and
Subscription-State values. Whatever arrives, the parsers return a value or raise ParseError (answer 400),
and what we compose parses back to itself."""

from __future__ import annotations

import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st

from p2psip import pidf, sipfrag
from p2psip.errors import ParseError
from p2psip.subscription import EventHeader, SubscriptionState

SETTINGS = settings(max_examples=300, deadline=None)
TOKEN = st.text("abcdefghijklmnopqrstuvwxyz0123456789-.!%*_+`'~", min_size=1, max_size=20)
XMLTEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=40).map(str.strip)


@SETTINGS
@given(st.binary(max_size=400))
def test_pidf_bytes_never_crash(data: bytes) -> None:
    with contextlib.suppress(ParseError):
        pidf.parse(data)


@SETTINGS
@given(st.text(max_size=300))
def test_pidf_text_never_crash(text: str) -> None:
    body = f'<presence xmlns="urn:ietf:params:xml:ns:pidf" entity="sip:a@b">{text}</presence>'.encode()
    with contextlib.suppress(ParseError):
        pidf.parse(body)


@SETTINGS
@given(
    entity=XMLTEXT.filter(bool),
    tuples=st.lists(
        st.builds(
            pidf.PresenceTuple,
            id=TOKEN,
            basic=st.sampled_from([None, "open", "closed"]),
            contact=st.none() | XMLTEXT,
            notes=st.lists(XMLTEXT, max_size=2),
        ),
        max_size=4,
    ),
    notes=st.lists(XMLTEXT, max_size=3),
    activities=st.lists(st.sampled_from(["away", "busy", "on-the-phone", "meal"]), max_size=3, unique=True),
)
def test_pidf_round_trip(
    entity: str, tuples: list[pidf.PresenceTuple], notes: list[str], activities: list[str]
) -> None:
    doc = pidf.Presence(entity, tuples, notes, activities)
    assert pidf.parse(doc.compose()) == doc


@SETTINGS
@given(st.binary(max_size=300))
def test_sipfrag_never_crash(data: bytes) -> None:
    try:
        frag = sipfrag.parse_status(data)
    except ParseError:
        return
    assert 100 <= frag.status <= 699


@SETTINGS
@given(st.integers(100, 699), st.text(max_size=40))
def test_sipfrag_round_trip(status: int, reason: str) -> None:
    frag = sipfrag.parse_status(sipfrag.compose(status, reason))
    assert frag.status == status and frag.reason == sipfrag.clean_text(reason)


@SETTINGS
@given(st.text(max_size=80))
def test_event_and_state_never_crash(text: str) -> None:
    for parser in (EventHeader.parse, SubscriptionState.parse):
        with contextlib.suppress(ParseError):
            parser(text)


@SETTINGS
@given(TOKEN, st.none() | TOKEN)
def test_event_round_trip(package: str, event_id: str | None) -> None:
    event = EventHeader(package.lower(), event_id)
    assert EventHeader.parse(str(event)) == event
