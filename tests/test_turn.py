"""The TURN core (p2psip.turn), sans-IO with a fake clock: allocations, credentials, permissions, channels,
quotas (486/508), no open reflector, expiry; hypothesis on arbitrary input to the listening and relay side."""

from __future__ import annotations

import hashlib
import struct

from aioice import stun
from hypothesis import given, settings
from hypothesis import strategies as st

from p2psip.ratelimit import Rate
from p2psip.turn import (
    CloseRelay,
    OpenRelay,
    ToClient,
    ToPeer,
    TurnCore,
    TurnLimits,
    issue_credentials,
)

SECRET = b"home-peer-secret"
NOW = 1_800_000_000.0
ALICE = ("10.99.0.11", 40000)
PEER = ("10.99.0.12", 50000)


class Client:
    """A minimal long-term-credential TURN client made of aioice.stun messages, driving the core by hand."""

    def __init__(self, core: TurnCore, addr: tuple[str, int], user: str = "alice", now: float = NOW) -> None:
        self.core, self.addr = core, addr
        self.username, self.password = issue_credentials(SECRET, user, now)
        self.nonce: bytes | None = None
        self.key = hashlib.md5(f"{self.username}:{core.realm}:{self.password}".encode()).digest()

    def request(self, method: stun.Method, now: float = NOW, **attrs: object) -> stun.Message:
        for _ in range(2):
            message = stun.Message(method, stun.Class.REQUEST)
            message.attributes.update(attrs)
            if self.nonce is not None:
                message.attributes.update(USERNAME=self.username, REALM=self.core.realm, NONCE=self.nonce)
                message.add_message_integrity(self.key)
            actions = self.core.from_client(bytes(message), self.addr, now)
            if actions and isinstance(actions[0], OpenRelay):
                actions = self.core.relay_opened(
                    actions[0].token, ("10.99.0.1", 49152 + actions[0].token), now
                )
            replies = [a for a in actions if isinstance(a, ToClient)]
            assert len(replies) == 1
            response = stun.parse_message(replies[0].data)
            if response.error_code == 438 or (response.error_code == 401 and self.nonce is None):
                self.nonce = response.attributes["NONCE"]
                continue
            return response
        return response

    def allocate(self, now: float = NOW, lifetime: int = 600) -> stun.Message:
        return self.request(
            stun.Method.ALLOCATE, now, LIFETIME=lifetime, **{"REQUESTED-TRANSPORT": 0x11000000}
        )


def test_allocation_needs_credentials_then_grants_a_relayed_address() -> None:
    core = TurnCore(SECRET)
    alice = Client(core, ALICE)
    response = alice.allocate()
    assert response.message_class == stun.Class.RESPONSE
    assert response.check_message_integrity(alice.key)
    assert response.attributes["XOR-MAPPED-ADDRESS"] == ALICE
    relay = response.attributes["XOR-RELAYED-ADDRESS"]
    assert core.by_relay[relay].user == "alice"
    assert core.stats()["allocations"] == 1


def test_wrong_password_and_expired_credentials_are_refused() -> None:
    core = TurnCore(SECRET)
    mallory = Client(core, ALICE)
    mallory.key = hashlib.md5(f"{mallory.username}:{core.realm}:guess".encode()).digest()
    assert mallory.allocate().error_code == 401
    old = Client(core, ("10.99.0.11", 40001), now=NOW - 90_000)  # issued for a day, two days ago... expired
    assert old.allocate().error_code == 401
    assert core.counters["refused_auth"] == 2
    assert core.stats()["allocations"] == 0


def test_quota_per_user_and_source_is_486_and_capacity_is_508() -> None:
    core = TurnCore(SECRET, limits=TurnLimits(per_user=1, per_source=2, max_allocations=3))
    assert Client(core, ALICE).allocate().message_class == stun.Class.RESPONSE
    assert Client(core, ("10.99.0.11", 40001)).allocate().error_code == 486  # alice again
    assert Client(core, ("10.99.0.11", 40002), user="bob").allocate().message_class == stun.Class.RESPONSE
    assert Client(core, ("10.99.0.11", 40003), user="carol").allocate().error_code == 486  # same source
    assert Client(core, ("10.99.0.13", 40000), user="carol").allocate().message_class == stun.Class.RESPONSE
    assert Client(core, ("10.99.0.14", 40000), user="dave").allocate().error_code == 508
    assert core.counters["refused_quota"] == 2 and core.counters["refused_capacity"] == 1


def test_no_open_reflector_until_permission_then_both_ways() -> None:
    core = TurnCore(SECRET)
    alice = Client(core, ALICE)
    relay = alice.allocate().attributes["XOR-RELAYED-ADDRESS"]
    send = stun.Message(stun.Method.SEND, stun.Class.INDICATION)
    send.attributes.update({"XOR-PEER-ADDRESS": PEER, "DATA": b"rtp"})
    assert core.from_client(bytes(send), ALICE, NOW) == []
    assert core.from_peer(relay, b"hello", PEER, NOW) == []
    assert core.counters["dropped_unpermitted"] == 2
    assert (
        alice.request(stun.Method.CREATE_PERMISSION, **{"XOR-PEER-ADDRESS": PEER}).message_class
        == stun.Class.RESPONSE
    )
    assert core.from_client(bytes(send), ALICE, NOW) == [ToPeer(relay, PEER, b"rtp")]
    (data,) = core.from_peer(relay, b"back", ("10.99.0.12", 50001), NOW)  # permissions are per IP
    assert isinstance(data, ToClient) and data.client == ALICE
    indication = stun.parse_message(data.data)
    assert indication.message_method == stun.Method.DATA and indication.attributes["DATA"] == b"back"
    # a permission lasts 300 s, then the relay is closed to that peer again
    core.expire(NOW + 301)
    assert core.from_peer(relay, b"late", PEER, NOW + 301) == []


def test_channels_carry_data_both_ways() -> None:
    core = TurnCore(SECRET)
    alice = Client(core, ALICE)
    relay = alice.allocate().attributes["XOR-RELAYED-ADDRESS"]
    ok = alice.request(stun.Method.CHANNEL_BIND, **{"CHANNEL-NUMBER": 0x4001, "XOR-PEER-ADDRESS": PEER})
    assert ok.message_class == stun.Class.RESPONSE
    assert core.from_client(struct.pack("!HH", 0x4001, 3) + b"abc" + b"\0", ALICE, NOW) == [
        ToPeer(relay, PEER, b"abc")
    ]
    (frame,) = core.from_peer(relay, b"xyz", PEER, NOW)
    assert isinstance(frame, ToClient) and frame.data[:7] == struct.pack("!HH", 0x4001, 3) + b"xyz"
    # the number is bound to that peer: another peer on it is 400
    bad = alice.request(
        stun.Method.CHANNEL_BIND, **{"CHANNEL-NUMBER": 0x4001, "XOR-PEER-ADDRESS": ("10.99.0.13", 1)}
    )
    assert bad.error_code == 400
    assert core.stats()["relayed_packets"] == 2


def test_refresh_zero_deletes_and_lifetime_expiry_and_teardown() -> None:
    core = TurnCore(SECRET)
    alice = Client(core, ALICE)
    relay = alice.allocate().attributes["XOR-RELAYED-ADDRESS"]
    response = alice.request(stun.Method.REFRESH, LIFETIME=0)
    assert response.attributes["LIFETIME"] == 0 and core.stats()["allocations"] == 0
    relay = alice.allocate().attributes["XOR-RELAYED-ADDRESS"]
    assert core.expire(NOW + 599) == []
    assert core.expire(NOW + 601) == [CloseRelay(relay)]
    alice.allocate(now=NOW + 602)
    assert core.stats()["allocations"] == 1
    assert len(core.close_user("alice")) == 1 and core.stats()["allocations"] == 0


def test_lifetime_is_capped_and_a_refresh_needs_live_credentials() -> None:
    """An allocation lives at most ``max_lifetime`` past its last Refresh, whatever the client asks; and a
    Refresh is authenticated like the Allocate, so once the user's credential expired (a day) the
    allocation cannot be kept alive and ends with its lifetime."""
    core = TurnCore(SECRET, limits=TurnLimits(max_lifetime=3600.0))
    alice = Client(core, ALICE, now=NOW - 86400 + 4000)  # credential expires at NOW + 4000
    response = alice.allocate(lifetime=100_000)
    assert response.attributes["LIFETIME"] == 3600
    relay = response.attributes["XOR-RELAYED-ADDRESS"]
    assert alice.request(stun.Method.REFRESH, NOW + 3000, LIFETIME=100_000).attributes["LIFETIME"] == 3600
    assert core.expire(NOW + 6599) == []
    refused = alice.request(stun.Method.REFRESH, NOW + 4001, LIFETIME=600)  # the credential has expired
    assert refused.error_code == 401 and core.counters["refused_auth"] == 1
    assert core.expire(NOW + 6601) == [CloseRelay(relay)] and core.stats()["allocations"] == 0


def test_permissions_per_allocation_are_bounded_508() -> None:
    core = TurnCore(SECRET, limits=TurnLimits(max_permissions=2))
    alice = Client(core, ALICE)
    alice.allocate()
    for host in ("10.99.0.21", "10.99.0.22", "10.99.0.22"):  # a renewed one is no new one
        ok = alice.request(stun.Method.CREATE_PERMISSION, **{"XOR-PEER-ADDRESS": (host, 1)})
        assert ok.message_class == stun.Class.RESPONSE
    full = alice.request(stun.Method.CREATE_PERMISSION, **{"XOR-PEER-ADDRESS": ("10.99.0.23", 1)})
    assert full.error_code == 508 and core.counters["refused_capacity"] == 1


def test_bandwidth_cap_drops_and_counts() -> None:
    core = TurnCore(SECRET, limits=TurnLimits(bandwidth=Rate(per_second=1000.0, burst=1000.0)))
    alice = Client(core, ALICE)
    relay = alice.allocate().attributes["XOR-RELAYED-ADDRESS"]
    alice.request(stun.Method.CREATE_PERMISSION, **{"XOR-PEER-ADDRESS": PEER})
    sent = sum(len(core.from_peer(relay, bytes(200), PEER, NOW)) for _ in range(10))
    assert sent == 5 and core.counters["dropped_bandwidth"] == 5
    assert len(core.from_peer(relay, bytes(200), PEER, NOW + 1.0)) == 1  # refilled


def test_binding_request_answered_without_credentials() -> None:
    core = TurnCore(SECRET)
    request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    (reply,) = core.from_client(bytes(request), ALICE, NOW)
    assert isinstance(reply, ToClient)
    assert stun.parse_message(reply.data).attributes["XOR-MAPPED-ADDRESS"] == ALICE


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.binary(min_size=20, max_size=120))
def test_garbage_never_raises(data: bytes, tail: bytes) -> None:
    core = TurnCore(SECRET)
    alice = Client(core, ALICE)
    relay = alice.allocate().attributes["XOR-RELAYED-ADDRESS"]
    # raw garbage, garbage behind a valid STUN header of each method, and garbage on the relay side
    for method in (0x0003, 0x0004, 0x0006, 0x0008, 0x0009, 0x0001):
        header = struct.pack("!HHI12s", method, len(tail) - 20, 0x2112A442, bytes(12))
        for blob in (data, header + tail[20:], struct.pack("!HH", 0x4000, len(data)) + data):
            for action in core.from_client(blob, ALICE, NOW):
                assert isinstance(action, (ToClient, ToPeer, OpenRelay))
    core.from_peer(relay, data, PEER, NOW)
    assert core.stats()["allocations"] <= 2
