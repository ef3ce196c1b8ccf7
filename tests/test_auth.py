"""Digest authentication: the RFCs' worked examples (exact digests) and server/client round trips."""

from __future__ import annotations

import hashlib

import pytest

from p2psip.auth import (
    Challenge,
    DigestServer,
    answer_challenge,
    credentials_value,
    pick_challenge,
    request_digest,
)
from p2psip.errors import AuthError
from p2psip.message import Request, Response, parse, parse_auth

USERS = {"alice": "wonderland", "bob": "builder"}


def sip_request(method: str = "REGISTER", uri: str = "sip:example.com") -> Request:
    req = Request.create(
        method,
        uri,
        from_="<sip:alice@example.com>;tag=f1",
        to="<sip:alice@example.com>",
        call_id="auth-1@192.0.2.1",
        cseq=7,
        via="SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKauth1",
        contact="<sip:alice@192.0.2.1>",
    )
    out = parse(bytes(req))
    assert isinstance(out, Request)
    return out


def wire_response(resp: Response) -> Response:
    out = parse(bytes(resp))
    assert isinstance(out, Response)
    return out


def wire_request(req: Request) -> Request:
    out = parse(bytes(req))
    assert isinstance(out, Request)
    return out


class TestRfcExamples:
    def test_rfc2617_md5_example(self) -> None:
        """RFC 2617 §3.5."""
        digest = request_digest(
            algorithm="MD5",
            username="Mufasa",
            realm="testrealm@host.com",
            password="Circle Of Life",
            method="GET",
            uri="/dir/index.html",
            nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",
            qop="auth",
            nc="00000001",
            cnonce="0a4f113b",
        )
        assert digest == "6629fae49393a05397450978507c4ef1"

    @pytest.mark.parametrize(
        ("algorithm", "expected"),
        [
            ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
            ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
        ],
    )
    def test_rfc7616_examples(self, algorithm: str, expected: str) -> None:
        """RFC 7616 §3.9.1 (the same exchange answered with SHA-256 and with MD5)."""
        digest = request_digest(
            algorithm=algorithm,
            username="Mufasa",
            realm="http-auth@example.org",
            password="Circle of Life",
            method="GET",
            uri="/dir/index.html",
            nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
            qop="auth",
            nc="00000001",
            cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
        )
        assert digest == expected

    def test_rfc2069_form_without_qop_and_sess_variant(self) -> None:
        def h(text: str) -> str:
            return hashlib.md5(text.encode()).hexdigest()

        ha1, ha2 = h("u:r:p"), h("INVITE:sip:bob@example.com")
        plain = request_digest(
            algorithm="MD5", username="u", realm="r", password="p", method="INVITE",
            uri="sip:bob@example.com", nonce="n",
        )  # fmt: skip
        assert plain == h(f"{ha1}:n:{ha2}")
        sess = request_digest(
            algorithm="MD5-sess", username="u", realm="r", password="p", method="INVITE",
            uri="sip:bob@example.com", nonce="n", qop="auth", nc="00000001", cnonce="c",
        )  # fmt: skip
        assert sess == h(f"{h(f'{ha1}:n:c')}:n:00000001:c:auth:{ha2}")

    def test_client_credentials_match_an_independent_computation(self) -> None:
        """The header the client builds, checked against hashlib directly (SIP method and Request-URI)."""
        challenge = Challenge.parse(
            'Digest realm="http-auth@example.org", qop="auth", algorithm=SHA-256, '
            'nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", '
            'opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"'
        )
        req = sip_request("INVITE", "sip:bob@example.org")
        value = credentials_value(challenge, req, "Mufasa", "Circle of Life", cnonce="abc", nc=1)
        scheme, params = parse_auth(value)

        def h(text: str) -> str:
            return hashlib.sha256(text.encode()).hexdigest()

        ha1 = h("Mufasa:http-auth@example.org:Circle of Life")
        ha2 = h("INVITE:sip:bob@example.org")
        expected = h(f"{ha1}:7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v:00000001:abc:auth:{ha2}")
        assert scheme == "Digest" and params["response"] == expected
        assert params["opaque"] == "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"
        assert params["algorithm"] == "SHA-256" and params["nc"] == "00000001" and params["qop"] == "auth"
        assert "qop=auth" in value and "nc=00000001" in value  # tokens, not quoted-strings


class TestServer:
    def server(self, **kwargs: object) -> DigestServer:
        return DigestServer("example.com", USERS.get, secret=b"k" * 32, **kwargs)  # type: ignore[arg-type]

    def test_challenge_offers_sha256_then_md5_with_qop_auth(self) -> None:
        resp = wire_response(self.server().challenge(sip_request(), 100.0))
        assert resp.status == 401
        values = resp.get_all("WWW-Authenticate")
        parsed = [parse_auth(v)[1] for v in values]
        assert [p["algorithm"] for p in parsed] == ["SHA-256", "MD5"]
        assert all(p["qop"] == "auth" and p["realm"] == "example.com" for p in parsed)
        assert parsed[0]["nonce"] == parsed[1]["nonce"] and "stale" not in parsed[0]
        proxy = wire_response(self.server().challenge(sip_request(), 100.0, proxy=True))
        assert proxy.status == 407 and len(proxy.get_all("Proxy-Authenticate")) == 2

    @pytest.mark.parametrize("proxy", [False, True])
    def test_round_trip(self, proxy: bool) -> None:
        server = self.server()
        req = sip_request()
        result, challenge = server.check(req, 100.0, proxy=proxy)
        assert not result.ok and challenge is not None
        retry = wire_request(answer_challenge(wire_response(challenge), req, "alice", "wonderland"))
        header = "Proxy-Authorization" if proxy else "Authorization"
        assert parse_auth(retry.get(header) or "")[1]["algorithm"] == "SHA-256"
        assert retry.cseq.number == 8 and retry.cseq.method == "REGISTER"
        assert retry.top_via is not None and retry.top_via.branch != "z9hG4bKauth1"
        result, answer = server.check(retry, 101.0, proxy=proxy)
        assert result.ok and result.username == "alice" and answer is None

    def test_md5_only_server(self) -> None:
        server = self.server(algorithms=("MD5",))
        req = sip_request()
        retry = answer_challenge(wire_response(server.challenge(req, 0.0)), req, "bob", "builder")
        assert parse_auth(retry.get("Authorization") or "")[1]["algorithm"] == "MD5"
        assert server.verify(wire_request(retry), 1.0).ok

    def test_wrong_password_unknown_user_and_wrong_uri(self) -> None:
        server = self.server(check_uri=True)
        req = sip_request()
        challenge = wire_response(server.challenge(req, 0.0))
        bad = server.verify(wire_request(answer_challenge(challenge, req, "alice", "guess")), 1.0)
        assert not bad.ok and not bad.stale and "digest mismatch" in bad.reason
        nobody = server.verify(wire_request(answer_challenge(challenge, req, "mallory", "x")), 1.0)
        assert not nobody.ok and "unknown user" in nobody.reason
        retry = answer_challenge(challenge, req, "alice", "wonderland")
        retry.uri = sip_request(uri="sip:other.example.com").uri
        moved = server.verify(wire_request(retry), 1.0)
        assert not moved.ok and "Request-URI" in moved.reason
        assert self.server().verify(wire_request(retry), 1.0).ok  # default: the uri is not compared

    def test_expired_nonce_is_stale_and_the_client_recovers(self) -> None:
        server = self.server(nonce_lifetime=60.0)
        req = sip_request()
        retry = wire_request(
            answer_challenge(wire_response(server.challenge(req, 0.0)), req, "alice", "wonderland")
        )
        result, challenge = server.check(retry, 61.0)
        assert result.stale and not result.ok and challenge is not None
        again = wire_response(challenge)
        assert all(parse_auth(v)[1].get("stale") == "true" for v in again.get_all("WWW-Authenticate"))
        assert Challenge.parse(again.get("WWW-Authenticate") or "").stale
        fresh = wire_request(answer_challenge(again, retry, "alice", "wonderland"))
        assert fresh.cseq.number == 9 and len(fresh.get_all("Authorization")) == 1  # old credentials replaced
        assert server.verify(fresh, 62.0).ok

    def test_replayed_nonce_count_refused(self) -> None:
        server = self.server()
        req = sip_request()
        challenge = wire_response(server.challenge(req, 0.0))
        first = wire_request(answer_challenge(challenge, req, "alice", "wonderland", nc=1))
        assert server.verify(first, 1.0).ok
        replay = server.verify(first, 2.0)
        assert not replay.ok and "replayed" in replay.reason
        second = wire_request(answer_challenge(challenge, req, "alice", "wonderland", nc=2))
        assert server.verify(second, 3.0).ok

    def test_nonces_are_stateless_across_instances_with_one_secret(self) -> None:
        one, two = self.server(), self.server()
        other = DigestServer("example.com", USERS.get, secret=b"z" * 32)
        req = sip_request()
        retry = wire_request(
            answer_challenge(wire_response(one.challenge(req, 0.0)), req, "alice", "wonderland")
        )
        assert two.verify(retry, 1.0).ok
        forged = other.verify(retry, 1.0)
        assert not forged.ok and "not issued" in forged.reason

    def test_algorithm_not_offered_refused(self) -> None:
        md5_server = self.server(algorithms=("MD5",))
        sha_server = self.server(algorithms=("SHA-256",))
        req = sip_request()
        retry = wire_request(
            answer_challenge(wire_response(md5_server.challenge(req, 0.0)), req, "alice", "wonderland")
        )
        assert not sha_server.verify(retry, 1.0).ok

    def test_garbage_credentials_fail_cleanly(self) -> None:
        server = self.server()
        req = sip_request()
        for value in (
            'Digest realm="example.com", username="alice", nonce="!!!", uri="sip:example.com", response="x"',
            'Digest realm="example.com"',
            "Digest ,,,",
            "Basic YWxhZGRpbjpvcGVuc2VzYW1l",
            'Digest realm="example.com", username="alice", nonce="abc", qop=auth, nc=zz, cnonce="c", '
            'uri="sip:example.com", response="00"',
        ):
            req.set("Authorization", value)
            result, challenge = server.check(req, 0.0)
            assert not result.ok and challenge is not None and challenge.status == 401

    def test_bad_configuration(self) -> None:
        with pytest.raises(AuthError):
            DigestServer("r", USERS.get, algorithms=("SHA-1",))


class TestClient:
    def response_with(self, *values: str, status: int = 401) -> Response:
        resp = Response.for_request(sip_request(), status)
        for value in values:
            resp.add("WWW-Authenticate" if status == 401 else "Proxy-Authenticate", value)
        return wire_response(resp)

    def test_picks_the_strongest_algorithm(self) -> None:
        resp = self.response_with(
            'Digest realm="r", nonce="n1", qop="auth", algorithm=MD5',
            'Digest realm="r", nonce="n1", qop="auth", algorithm=SHA-512-256',
            'Digest realm="r", nonce="n1", qop="auth", algorithm=SHA-256',
            'Digest realm="r", nonce="n1", qop="auth", algorithm=UNKNOWN-9',
        )
        challenge, proxy = pick_challenge(resp)
        assert challenge.algorithm == "SHA-512-256" and not proxy

    def test_no_usable_challenge(self) -> None:
        with pytest.raises(AuthError):
            answer_challenge(self.response_with('Basic realm="r"'), sip_request(), "a", "b")
        with pytest.raises(AuthError):
            answer_challenge(self.response_with(), sip_request(), "a", "b")
        with pytest.raises(AuthError):
            Challenge.parse('Digest realm="r"')

    def test_sha512_256_round_trip(self) -> None:
        server = DigestServer("r", USERS.get, algorithms=("SHA-512-256", "SHA-256"))
        req = sip_request()
        retry = answer_challenge(wire_response(server.challenge(req, 0.0, proxy=True)), req, "bob", "builder")
        assert parse_auth(retry.get("Proxy-Authorization") or "")[1]["algorithm"] == "SHA-512-256"
        assert server.verify(wire_request(retry), 1.0, proxy=True).ok


class TestDigestClient:
    def test_answer_then_preauthorize_with_growing_nc(self) -> None:
        from p2psip.auth import DigestClient

        server = DigestServer("example.com", USERS.get, secret=b"s" * 32)
        client = DigestClient("alice", "wonderland")
        req = sip_request()
        _result, challenge = server.check(req, 0.0)
        assert challenge is not None
        retry = wire_request(client.answer(wire_response(challenge), req))
        assert server.verify(retry, 1.0).ok
        refresh = sip_request()
        refresh.set("CSeq", "9 REGISTER")
        refreshed = wire_request(client.authorize(refresh))
        params = parse_auth(refreshed.get("Authorization") or "")[1]
        assert params["nc"] == "00000002" and len(refreshed.get_all("Authorization")) == 1
        assert server.verify(refreshed, 2.0).ok  # no second round trip needed

    def test_ack_and_cancel_are_never_challenged(self) -> None:
        server = DigestServer("example.com", USERS.get)
        for method in ("ACK", "CANCEL"):
            result, challenge = server.check(sip_request(method, "sip:bob@example.com"), 0.0)
            assert result.ok and challenge is None
