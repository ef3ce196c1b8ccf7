"""The RFC 6665 core, sans-IO with a fake clock: Event / Subscription-State headers, the notifier's and the
subscriber's state (pending/active/terminated, Expires, refresh, fetch, forking, 481/489/400/423)."""

from __future__ import annotations

import pytest

from p2psip.errors import ParseError
from p2psip.message import Request, Response, parse
from p2psip.subscription import (
    EventHeader,
    NotifierSubscription,
    Reject,
    SubscribePolicy,
    Subscriber,
    SubscriptionState,
    SubState,
    check_subscribe,
    unreadable_event,
)

POLICY = SubscribePolicy(frozenset({"presence", "refer"}), min_expires=60, max_expires=3600)


def wire(message: Request | Response) -> Request | Response:
    if isinstance(message, Request) and "Via" not in message:
        message = message.copy()
        message.add("Via", "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKsub", first=True)
    return parse(bytes(message))


def subscribe(event: str | None = "presence", expires: int | None = 600) -> Request:
    headers = []
    if event is not None:
        headers.append(("Event", event))
    if expires is not None:
        headers.append(("Expires", str(expires)))
    req = Request.create(
        "SUBSCRIBE",
        "sip:bob@example.com",
        from_="<sip:alice@example.com>;tag=w1",
        to="<sip:bob@example.com>",
        call_id="sub-1@192.0.2.1",
        cseq=1,
        contact="<sip:alice@192.0.2.1:5060>",
        headers=headers,
    )
    out = wire(req)
    assert isinstance(out, Request)
    return out


def ok(req: Request, tag: str, contact: str = "<sip:bob@192.0.2.2:5070>", expires: int = 600) -> Response:
    resp = Response.for_request(req, 200, to_tag=tag)
    resp.add("Contact", contact)
    resp.set("Expires", str(expires))
    out = wire(resp)
    assert isinstance(out, Response)
    return out


def notifier(req: Request, now: float = 0.0, pending: bool = False) -> NotifierSubscription:
    decision = check_subscribe(req, POLICY)
    assert not isinstance(decision, Reject)
    resp = Response.for_request(req, 200, to_tag="n1")
    resp.add("Contact", "<sip:bob@192.0.2.2:5070>")
    return NotifierSubscription.accept(req, resp, decision, now, pending=pending)


def as_received(notify: Request) -> Request:
    out = wire(notify)
    assert isinstance(out, Request)
    return out


class TestHeaders:
    def test_event_parse_and_match(self) -> None:
        e = EventHeader.parse("Presence ; id=ab7")
        assert e.package == "presence" and e.id == "ab7"
        assert e.matches(EventHeader.parse("presence;id=ab7"))
        assert not e.matches(EventHeader.parse("presence;id=ab8"))
        assert not e.matches(EventHeader.parse("presence"))
        assert str(EventHeader.parse("refer;id=93809824")) == "refer;id=93809824"

    @pytest.mark.parametrize("text", ["", ";id=1", "pres ence", "presence;id=", 'presence;id="q"', "a" * 65])
    def test_event_bad(self, text: str) -> None:
        with pytest.raises(ParseError):
            EventHeader.parse(text)

    def test_subscription_state(self) -> None:
        s = SubscriptionState.parse("active;expires=599")
        assert s.state is SubState.ACTIVE and s.expires == 599
        t = SubscriptionState.parse("terminated;reason=Deactivated")
        assert t.reason == "deactivated" and t.may_resubscribe
        assert not SubscriptionState.parse("terminated;reason=rejected").may_resubscribe
        assert SubscriptionState.parse("terminated;reason=probation;retry-after=30").retry_after == 30
        assert str(SubscriptionState(SubState.TERMINATED, None, "timeout")) == "terminated;reason=timeout"
        for bad in ("gone", "active;expires=x", "active;expires=99999999999", "terminated;reason=a b"):
            with pytest.raises(ParseError):
                SubscriptionState.parse(bad)


class TestCheckSubscribe:
    def test_unknown_package_is_489_with_allow_events(self) -> None:
        decision = check_subscribe(subscribe("dialog"), POLICY)
        assert isinstance(decision, Reject) and decision.status == 489
        assert ("Allow-Events", "presence, refer") in decision.headers

    def test_no_event_is_400(self) -> None:
        decision = check_subscribe(subscribe(None), POLICY)
        assert isinstance(decision, Reject) and decision.status == 400

    def test_too_brief_is_423(self) -> None:
        decision = check_subscribe(subscribe(expires=10), POLICY)
        assert isinstance(decision, Reject) and decision.status == 423
        assert ("Min-Expires", "60") in decision.headers

    def test_expires_capped_and_defaulted(self) -> None:
        assert check_subscribe(subscribe(expires=99999), POLICY) == (EventHeader("presence"), 3600)
        policy = SubscribePolicy(frozenset({"presence"}), default_expires={"presence": 1800})
        decision = check_subscribe(subscribe(expires=None), policy)
        assert not isinstance(decision, Reject) and decision.expires == 1800


class TestNotifier:
    def test_active_notify_counts_down_then_expires(self) -> None:
        sub = notifier(subscribe(expires=600), now=100.0)
        n1 = sub.notify(100.0, b"doc", "application/pidf+xml")
        assert n1.method == "NOTIFY" and n1.get("Event") == "presence"
        assert n1.get("Subscription-State") == "active;expires=600"
        assert n1.to.tag == "w1" and n1.from_.tag == "n1"
        assert sub.notify(400.0).get("Subscription-State") == "active;expires=300"
        assert sub.deadline == 700.0
        assert not sub.expire(699.0)
        assert sub.expire(700.0) and sub.state is SubState.TERMINATED
        assert sub.notify(700.0).get("Subscription-State") == "terminated;reason=timeout"
        assert sub.deadline is None and not sub.expire(800.0)

    def test_pending_then_authorized_or_rejected(self) -> None:
        sub = notifier(subscribe(), pending=True)
        assert sub.notify(0.0).get("Subscription-State") == "pending;expires=600"
        sub.authorize(True)
        assert sub.state is SubState.ACTIVE
        other = notifier(subscribe(), pending=True)
        other.authorize(False)
        assert other.notify(1.0).get("Subscription-State") == "terminated;reason=rejected"

    def test_fetch_is_one_terminated_notify(self) -> None:
        req = subscribe(expires=0)
        sub = notifier(req)
        assert sub.state is SubState.TERMINATED
        assert sub.notify(0.0).get("Subscription-State") == "terminated;reason=timeout"

    def test_refresh_extends_and_unsubscribe_ends(self) -> None:
        req = subscribe(expires=600)
        sub = notifier(req, now=0.0)
        refresh = sub.dialog  # build the refresh as the subscriber's dialog would: same ids, next CSeq
        r2 = subscribe(expires=900)
        r2.set("CSeq", "2 SUBSCRIBE")
        r2.set("To", f"{r2.get('To')};tag={refresh.local_tag}")
        decision = sub.refresh(r2, POLICY, 500.0)
        assert not isinstance(decision, Reject) and decision.expires == 900
        assert sub.deadline == 1400.0
        r3 = subscribe("presence;id=other", expires=900)
        r3.set("CSeq", "3 SUBSCRIBE")
        wrong = sub.refresh(r3, POLICY, 600.0)
        assert isinstance(wrong, Reject) and wrong.status == 489
        assert sub.state is SubState.ACTIVE  # a bad refresh does not end it
        r4 = subscribe(expires=0)
        r4.set("CSeq", "4 SUBSCRIBE")
        assert not isinstance(sub.refresh(r4, POLICY, 700.0), Reject)
        assert sub.state is SubState.TERMINATED and sub.reason == "timeout"
        r5 = subscribe(expires=600)
        r5.set("CSeq", "5 SUBSCRIBE")
        gone = sub.refresh(r5, POLICY, 701.0)
        assert isinstance(gone, Reject) and gone.status == 481

    def test_refresh_with_lower_cseq_is_500(self) -> None:
        sub = notifier(subscribe())
        old = subscribe()
        old.set("CSeq", "0 SUBSCRIBE")
        decision = sub.refresh(old, POLICY, 1.0)
        assert isinstance(decision, Reject) and decision.status == 500

    def test_deactivated_asks_to_resubscribe(self) -> None:
        sub = notifier(subscribe())
        sub.terminate("deactivated")
        state = SubscriptionState.parse(sub.notify(1.0).get("Subscription-State") or "")
        assert state.reason == "deactivated" and state.may_resubscribe


class TestSubscriber:
    def test_2xx_then_notify_active_then_timer_n_and_expiry(self) -> None:
        req = subscribe(expires=600)
        s = Subscriber(req, now=0.0)
        sub = s.receive_response(ok(req, "n1"), 0.1)
        assert sub is not None and sub.state is None and sub.notify_deadline == pytest.approx(32.1)
        n = notifier(req, now=0.2)
        outcome = s.receive_notify(as_received(n.notify(0.2, b"x")), 0.2)
        assert outcome.status == 200 and outcome.subscription is sub
        assert sub.state is SubState.ACTIVE and sub.notify_deadline is None
        assert sub.expires_at == pytest.approx(600.2)
        assert s.refresh_at(sub) == pytest.approx(570.2)
        assert s.check_timers(600.0) == []
        assert s.check_timers(600.3) == [sub] and sub.reason == "timeout"

    def test_timer_n_ends_a_subscription_whose_notify_never_comes(self) -> None:
        req = subscribe()
        s = Subscriber(req, now=0.0)
        sub = s.receive_response(ok(req, "n1"), 0.0)
        assert s.deadline == pytest.approx(32.0)
        assert s.check_timers(31.9) == []
        assert s.check_timers(32.0) == [sub] and sub is not None and sub.reason == "no notify"

    def test_notify_before_2xx_and_forking(self) -> None:
        req = subscribe()
        s = Subscriber(req, now=0.0)
        first = notifier(req)
        second_resp = Response.for_request(req, 200, to_tag="n2")
        second_resp.add("Contact", "<sip:bob@192.0.2.3:5080>")
        decision = check_subscribe(req, POLICY)
        assert not isinstance(decision, Reject)
        second = NotifierSubscription.accept(req, second_resp, decision, 0.0)
        o1 = s.receive_notify(as_received(first.notify(0.0, b"a")), 0.0)
        o2 = s.receive_notify(as_received(second.notify(0.0, b"b")), 0.0)
        assert o1.status == o2.status == 200
        assert set(s.subscriptions) == {"n1", "n2"}
        assert str(s.subscriptions["n2"].dialog.remote_target) == "sip:bob@192.0.2.3:5080"
        # the 2xx from n1 arriving late joins the subscription the NOTIFY made
        assert s.receive_response(ok(req, "n1"), 0.1) is s.subscriptions["n1"]
        refresh = s.refresh(s.subscriptions["n2"], 600, 10.0)
        assert refresh.to.tag == "n2" and refresh.cseq.number == 2 and refresh.get("Event") == "presence"
        assert refresh.uri.host == "192.0.2.3"

    def test_unknown_subscription_is_481_bad_event_489_bad_state_400(self) -> None:
        req = subscribe()
        s = Subscriber(req, now=0.0)
        sub_n = notifier(req)
        s.receive_notify(as_received(sub_n.notify(0.0)), 0.0)
        stranger = as_received(sub_n.notify(0.0))
        stranger.set("Call-ID", "other@x")
        assert s.receive_notify(stranger, 0.0).status == 481
        wrong_event = as_received(sub_n.notify(0.0))
        wrong_event.set("Event", "dialog")
        assert s.receive_notify(wrong_event, 0.0).status == 489
        no_state = as_received(sub_n.notify(0.0))
        no_state.remove("Subscription-State")
        assert s.receive_notify(no_state, 0.0).status == 400
        garbage = as_received(sub_n.notify(0.0))
        garbage.set("Subscription-State", "active;expires=soon")
        assert s.receive_notify(garbage, 0.0).status == 400
        # none of them changed the subscription
        sub = s.subscriptions["n1"]
        assert sub.state is SubState.ACTIVE and not sub.terminated

    def test_terminated_notify_ends_it_and_later_ones_get_481(self) -> None:
        req = subscribe()
        s = Subscriber(req, now=0.0)
        n = notifier(req)
        s.receive_notify(as_received(n.notify(0.0)), 0.0)
        n.terminate("deactivated")
        outcome = s.receive_notify(as_received(n.notify(1.0)), 1.0)
        assert outcome.status == 200 and outcome.subscription is not None
        assert outcome.subscription.terminated and outcome.subscription.may_resubscribe
        n.state = SubState.ACTIVE  # a buggy notifier keeps talking
        assert s.receive_notify(as_received(n.notify(2.0)), 2.0).status == 481

    def test_failed_refresh_ends_the_subscription(self) -> None:
        req = subscribe()
        s = Subscriber(req, now=0.0)
        sub = s.receive_response(ok(req, "n1"), 0.0)
        assert sub is not None
        refresh = as_received(s.refresh(sub, 600, 300.0))
        gone = wire(Response.for_request(refresh, 481))
        assert isinstance(gone, Response)
        s.receive_response(gone, 300.1)
        assert sub.terminated

    def test_fetch(self) -> None:
        req = subscribe(expires=0)
        s = Subscriber(req, now=0.0)
        n = notifier(req)
        outcome = s.receive_notify(as_received(n.notify(0.0, b"state")), 0.0)
        assert outcome.status == 200 and outcome.subscription is not None
        assert outcome.subscription.terminated and outcome.subscription.reason == "timeout"


def test_route_set_from_a_late_2xx_when_the_notify_came_first() -> None:
    req = subscribe()
    s = Subscriber(req, now=0.0)
    s.receive_notify(as_received(notifier(req).notify(0.0)), 0.0)
    assert s.subscriptions["n1"].dialog.route_set == []
    late = Response.for_request(req, 200, to_tag="n1")
    late.add("Record-Route", "<sip:p2.example;lr>")
    late.add("Record-Route", "<sip:p1.example;lr>")
    late.add("Contact", "<sip:bob@192.0.2.2:5070>")
    received = wire(late)
    assert isinstance(received, Response)
    s.receive_response(received, 0.1)
    assert [str(r.uri) for r in s.subscriptions["n1"].dialog.route_set] == [
        "sip:p1.example;lr",
        "sip:p2.example;lr",
    ]


def test_unreadable_event_is_only_a_present_bad_event_on_subscribe_or_publish() -> None:
    assert unreadable_event(subscribe("pres ence")) and unreadable_event(subscribe('presence;id="7"'))
    assert not unreadable_event(subscribe("presence")) and not unreadable_event(subscribe(None))
    publish = subscribe("@@")
    publish.method = "PUBLISH"
    assert unreadable_event(publish)
    publish.method = "MESSAGE"
    assert not unreadable_event(publish)
