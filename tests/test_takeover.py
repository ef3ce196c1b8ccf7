"""Takeover, disclosure, guessing and registrar state at the home peer (issue 17), on loopback peers.

Each test failed before its fix: a REGISTER from any socket replaced alice's contact at her home peer, a
query listed anyone's contacts, 403-vs-401 told which users exist, wrong digests cost nothing, and every
new AOR left a user key behind for ever.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from peer_phone import Phone
from peer_support import PeerFactory

from overlay.identity import KeyPair
from p2psip.auth import answer_challenge
from p2psip.config import HostPort, UserAccount
from p2psip.inbox import load_key
from p2psip.message import Request, Response, new_tag
from p2psip.ownership import Claim
from p2psip.peer import USERS_DIR, Peer, UserKeys, add_account
from p2psip.ratelimit import Rate
from p2psip.sealedbox import public_bytes

ALICE = "sip:alice@p2p.example"
BOB = "sip:bob@p2p.example"
ROOT = Path(__file__).resolve().parent.parent
A1 = "<urn:uuid:00000000-0000-4000-8000-0000000000a1>"


def with_instance(phone: Phone, instance: str = A1) -> str:
    return f'<{phone.contact}>;+sip.instance="{instance}";reg-id=1'


async def query(phone: Phone, peer: Peer, aor: str = ALICE) -> Response:
    request = Request.create(
        "REGISTER", "sip:p2p.example", from_=f"<{aor}>;tag={new_tag()}", to=f"<{aor}>",
        call_id=f"q-{new_tag()}", cseq=1, via=phone._via(),
    )  # fmt: skip
    return await phone.request(request, peer.sip_address())


async def contacts_of(peer: Peer) -> list[str]:
    return [b.contact for b in await peer.fetch_bindings(ALICE)]


# ------------------------------------------------------------------------------------------- takeover


async def test_takeover_at_the_home_peer_is_refused(make_peer: PeerFactory, phones) -> None:
    peer = await make_peer()
    alice, mallory = await phones(), await phones("mallory")
    first = await alice.register(peer.sip_address(), contact=with_instance(alice))
    assert first.status == 200
    # The owner's own binding comes back with its instance (RFC 5626; JsSIP needs it) ...
    assert f'+sip.instance="{A1}"' in (first.get("Contact") or "")
    # ... the attack, from another socket with no credentials: both steps refused
    wipe = await mallory.register(peer.sip_address(), aor=ALICE, contact="*", expires=0)
    assert wipe.status == 403
    hijack = await mallory.register(peer.sip_address(), aor=ALICE)
    assert hijack.status == 403
    assert await contacts_of(peer) == [alice.contact]
    assert peer.counters["takeovers_refused"] == 2
    # a query by a stranger learns nothing (not even whether anyone is registered)
    peek = await query(mallory, peer)
    assert peek.status == 200 and peek.get("Contact") is None
    # alice's device comes back from a new port (a restarted phone): its instance proves it
    again = await phones()
    moved = await again.register(peer.sip_address(), contact=with_instance(again), call_id="r2")
    assert moved.status == 200
    assert await contacts_of(peer) == [again.contact]  # the same entry (instance), a new contact
    # its own query lists the contacts; its own flow may remove everything
    mine = await query(again, peer)
    assert again.contact in (mine.get("Contact") or "")
    assert (
        await again.register(peer.sip_address(), contact="*", expires=0, call_id="r2", cseq=2)
    ).status == 200
    assert await contacts_of(peer) == []


async def test_a_device_without_instance_is_known_by_its_flow(make_peer: PeerFactory, phones) -> None:
    peer = await make_peer()
    alice, other = await phones(), await phones()
    assert (await alice.register(peer.sip_address())).status == 200
    assert (await other.register(peer.sip_address(), aor=ALICE)).status == 403
    assert (await alice.register(peer.sip_address(), call_id="again")).status == 200  # same flow: refresh
    # no instance is ever echoed to a device that did not send it
    owner_view = await query(alice, peer)
    assert "+sip.instance" not in (owner_view.get("Contact") or "") and alice.contact in (
        owner_view.get("Contact") or ""
    )


async def test_the_claim_ends_with_the_bindings_and_the_key_goes_with_it(
    make_peer: PeerFactory, phones
) -> None:
    peer = await make_peer(min_expires=1)
    alice, bob = await phones(), await phones("bob")
    assert (await alice.register(peer.sip_address(), expires=1)).status == 200
    peer.users.export(ALICE)  # key files someone wrote to copy go too
    assert peer.users.path_for(ALICE).exists() and peer.users.claim(ALICE) is not None
    assert peer.sweep_user_keys() == 0  # still registered
    await asyncio.sleep(1.2)
    assert peer.sweep_user_keys() == 1
    assert not peer.users.path_for(ALICE).exists() and not peer.users.inbox_path(ALICE).exists()
    assert peer.users.claim(ALICE) is None and peer.users.on_disk() == 0
    assert peer.status()["counters"]["peer_user_keys_removed"] == 1
    # the AOR is free again: another device may claim it (with a new key the overlay accepts)
    assert (await bob.register(peer.sip_address(), aor=ALICE)).status == 200
    # an unregistered AOR goes the same way, without waiting
    assert (await bob.register(peer.sip_address(), aor=ALICE, contact="*", expires=0, cseq=2)).status == 200
    assert peer.sweep_user_keys() == 1 and peer.users.on_disk() == 0


# --------------------------------------------------------------------------------- accounts, guessing


async def challenge_and_answer(
    phone: Phone, peer: Peer, password: str, call_id: str, aor: str = ALICE, username: str = "alice"
) -> tuple[Response, float]:
    """REGISTER, answer the 401 with ``password``; returns (the final answer, seconds it took)."""
    challenge = await phone.register(peer.sip_address(), aor=aor, call_id=call_id, cseq=1)
    assert challenge.status == 401
    request = Request.create(
        "REGISTER", "sip:p2p.example", from_=f"<{aor}>;tag={new_tag()}", to=f"<{aor}>",
        call_id=call_id, cseq=2, via=phone._via(), contact=f"<{phone.contact}>", headers=[("Expires", "300")],
    )  # fmt: skip
    signed = answer_challenge(challenge, request, username, password)
    started = time.monotonic()
    answer = await phone.request(signed, peer.sip_address(), timeout=30)
    return answer, time.monotonic() - started


async def test_user_add_account_and_guessing_costs_time(
    make_peer: PeerFactory, phones, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "peer0"
    password = add_account(data_dir, ALICE)
    peer = await make_peer(data_dir=data_dir)
    attacker, owner = await phones(), await phones(host="127.0.0.2")
    caplog.set_level(logging.WARNING, logger="p2psip.peer")
    took = []
    for i in range(6):
        answer, seconds = await challenge_and_answer(attacker, peer, f"guess{i}", f"g{i}")
        assert answer.status == 401  # never 403: a wrong password and an unknown user look alike
        took.append(seconds)
    assert max(took[:3]) < 0.4 and took[4] >= 0.45 and took[5] >= 0.9, took  # free, then doubling
    assert peer.counters["auth_failures"] == 6 and peer.counters["auth_delayed"] >= 3
    assert sum("digest failure" in r.message for r in caplog.records) == 6
    assert peer.status()["counters"]["peer_auth_failures"] == 6
    # the owner, from another address, is never slowed down by the attacker's failures
    answer, seconds = await challenge_and_answer(owner, peer, password, "owner")
    assert answer.status == 200 and seconds < 0.4, seconds
    # an account needs digest even for the first REGISTER: trust on first use does not apply
    stranger = await phones()
    assert (await stranger.register(peer.sip_address(), aor=ALICE)).status == 401
    # the account's key is never swept
    assert peer.sweep_user_keys() == 0 and peer.users.path_for(ALICE).exists()


async def test_accounts_sharing_a_user_name_each_need_their_own_password(
    make_peer: PeerFactory, phones
) -> None:
    """The password lookup is by the account being checked (then an index by realm and user name), not
    a scan of every account that took the first one with that user name."""
    peer = await make_peer(
        users={ALICE: UserAccount(ALICE, "alice-pw", "desk"), BOB: UserAccount(BOB, "bob-pw", "desk")}
    )
    alice, bob = await phones(), await phones("bob")
    as_bob = {"aor": BOB, "username": "desk"}
    assert (await challenge_and_answer(bob, peer, "bob-pw", "b1", **as_bob))[0].status == 200
    assert (await challenge_and_answer(alice, peer, "alice-pw", "a1", username="desk"))[0].status == 200
    assert (await challenge_and_answer(bob, peer, "alice-pw", "b2", **as_bob))[0].status == 401
    lookup = peer._password_lookup(peer.config.realm)
    assert lookup("desk") in ("alice-pw", "bob-pw") and lookup("nobody") is None


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2psip.cli", *args],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60,
    )  # fmt: skip


def test_user_add_command_prints_a_password(tmp_path: Path) -> None:
    run = _cli("user", "add", ALICE, "--data-dir", str(tmp_path), "--json")
    assert run.returncode == 0, run.stderr
    shown = json.loads(run.stdout)
    assert shown["username"] == "alice" and len(shown["password"]) >= 12
    again = _cli("user", "add", ALICE, "--data-dir", str(tmp_path))
    assert again.returncode == 2 and "already has an account" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    # the account's key is a file, the one the peer signs with
    users = UserKeys(tmp_path / USERS_DIR)
    assert KeyPair.load(users.path_for(ALICE)).public_key == users.get(ALICE).public_key


def test_user_key_command_writes_the_derived_keys(tmp_path: Path) -> None:
    """A peer keeps no file per AOR (its keys derive from users/user-keys.secret); ``p2psip user key``
    writes them to copy to another peer, and they are the keys the peer uses."""
    users = UserKeys(tmp_path / USERS_DIR)
    derived, inbox = users.get(BOB).public_key, public_bytes(users.inbox_key(BOB))
    assert not users.path_for(BOB).exists()
    run = _cli("user", "key", BOB, "--data-dir", str(tmp_path), "--json")
    assert run.returncode == 0, run.stderr
    shown = json.loads(run.stdout)
    assert KeyPair.load(shown["key"]).public_key == derived
    assert oct(Path(shown["key"]).stat().st_mode & 0o777) == "0o600"
    assert public_bytes(load_key(Path(shown["inbox"]))) == inbox
    # a peer with another secret takes the copied files over its own derived keys
    other = UserKeys(tmp_path / "other")
    assert other.get(BOB).public_key != derived
    (tmp_path / "other" / Path(shown["key"]).name).write_bytes(Path(shown["key"]).read_bytes())
    assert UserKeys(tmp_path / "other").get(BOB).public_key == derived
    bad = _cli("user", "key", "not an aor", "--data-dir", str(tmp_path))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_user_key_objects_are_bounded_and_come_back_the_same(tmp_path: Path, monkeypatch) -> None:
    """Only MAX_CACHED_KEYS key objects stay in memory (each holds an OpenSSL key: the largest item of a
    registration's memory, bench/memory.py); an evicted AOR gets the same key again, and the peer still
    knows it holds that AOR."""
    monkeypatch.setattr(UserKeys, "MAX_CACHED_KEYS", 4)
    users = UserKeys(tmp_path / USERS_DIR)
    aors = [f"sip:user{i}@p2p.example" for i in range(10)]
    first = {aor: users.get(aor).public_key for aor in aors}
    assert len(users._keys) == 4
    assert all(users.exists(aor) for aor in aors) and users.known() == sorted(aors)
    assert users.get(aors[0]).public_key == first[aors[0]]  # derived again after its eviction
    assert len(users._keys) == 4
    users.forget(aors[0])
    assert aors[0] not in users.known()


async def test_claims_queued_in_one_loop_iteration_commit_in_one_transaction(tmp_path: Path) -> None:
    """A REGISTER's claim is committed before its 200, but REGISTERs answered together share the commit:
    the future is done only once another connection can read every claim of the batch."""
    users, reader = UserKeys(tmp_path / USERS_DIR), UserKeys(tmp_path / USERS_DIR)
    until = time.time() + 60
    aors = [f"sip:user{i}@p2p.example" for i in range(5)]
    done = {users.commit_claim(Claim(aor, flow="udp:127.0.0.1:5060", until=until)) for aor in aors}
    assert len(done) == 1  # one transaction for the five
    committed = done.pop()
    assert not committed.done() and users.claim(aors[3]) is not None  # counts here once queued
    assert reader.claim(aors[3]) is None  # not on disk yet
    await asyncio.wait_for(committed, 5)
    assert [c.aor for c in reader.claims()] == aors and reader.claim(aors[3]).until == until  # type: ignore[union-attr]
    users.commit_claim(Claim(ALICE, until=until))
    users.close()  # queued when the peer closes: committed, not lost
    assert reader.claim(ALICE) is not None
    reader.close()


# --------------------------------------------------------------------------------- scanning, new AORs


async def test_scanning_for_users_is_rate_limited_per_source(make_peer: PeerFactory, phones) -> None:
    peer = await make_peer(scan_rate=Rate.parse("1/min:5"))
    scanner, caller = await phones("scanner"), await phones("caller", host="127.0.0.2")
    statuses = []
    for i in range(8):
        result = await scanner.call(f"sip:user{i}@p2p.example", peer.sip_address(), timeout=10)
        assert result.final is not None
        statuses.append(result.final.status)
    assert statuses == [404] * 5 + [503] * 3
    assert peer.counters["scans_refused"] == 3
    other = await caller.call("sip:nobody@p2p.example", peer.sip_address(), timeout=10)
    assert other.final is not None and other.final.status == 404  # callers elsewhere keep their 404


async def test_new_aors_are_bounded_per_source(make_peer: PeerFactory, phones) -> None:
    peer = await make_peer(new_aors_per_source=Rate.parse("3/min:3"))
    flood, other = await phones("flood"), await phones("other", host="127.0.0.2")
    answers = [
        (await flood.register(peer.sip_address(), aor=f"sip:u{i}@p2p.example", call_id=f"n{i}")).status
        for i in range(5)
    ]
    assert answers == [200, 200, 200, 503, 503]
    assert peer.users.on_disk() == 3 and peer.counters["new_aors_refused"] == 2
    assert (await other.register(peer.sip_address(), aor="sip:v@p2p.example")).status == 200
    # refreshing an AOR this peer already holds costs nothing
    assert (
        await flood.register(peer.sip_address(), aor="sip:u0@p2p.example", call_id="n0", cseq=2)
    ).status == 200


async def test_no_squatting_right_after_a_restart(make_peer: PeerFactory, phones, tmp_path: Path) -> None:
    """Issue 17's squatting variant, with the durability work: a whole overlay restarts, and before alice's
    phone registers again mallory tries her AOR at another peer (the overlay refuses his new user key: her
    entries came back from disk) and at her home peer (her claim came back from disk)."""
    from peer_support import wait_until_settled

    home = await make_peer(data_dir=tmp_path / "home")
    other = await make_peer(data_dir=tmp_path / "other", join=HostPort(*home.overlay_address))
    await wait_until_settled([home, other], timeout=20)
    alice = await phones()
    assert (await alice.register(home.sip_address(), contact=with_instance(alice), expires=600)).status == 200
    for peer in (home, other):
        await peer.close(leave=False)  # a crash of the whole overlay
    home = await make_peer(data_dir=tmp_path / "home")
    other = await make_peer(data_dir=tmp_path / "other", join=HostPort(*home.overlay_address))
    await wait_until_settled([home, other], timeout=20)
    mallory = await phones("mallory")
    assert (await mallory.register(other.sip_address(), aor=ALICE)).status == 403
    assert (await mallory.register(home.sip_address(), aor=ALICE)).status == 403
    assert [b.contact for b in await other.fetch_bindings(ALICE)] == [alice.contact]
    again = await alice.register(home.sip_address(), contact=with_instance(alice), call_id="back")
    assert again.status == 200
