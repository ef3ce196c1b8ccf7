"""Digest authentication for SIP (RFC 3261 §22 with RFC 2617, RFC 7616 and RFC 8760).

Server side, :class:`DigestServer` challenges requests (401 with WWW-Authenticate, or 407 with
Proxy-Authenticate for proxies) and verifies the credentials of the retried request. Its nonces carry their
own issue time and an HMAC over it, so the server keeps no per-challenge state: an expired but otherwise
valid nonce gets a fresh challenge with ``stale=true`` (the client retries silently), a forged one is
refused. Replays are stopped by tracking the highest nonce-count (``nc``) per nonce, in a bounded table.
It offers SHA-256 first, then MD5 (RFC 8760 §2.4: one challenge per algorithm, preferred first), always
with ``qop=auth``. The time is passed in (``now``), like every sans-IO core here.

Client side, :func:`answer_challenge` turns a 401/407 and the request it answers into the retried request:
credentials for the strongest algorithm offered (SHA-512-256 > SHA-256 > MD5, ``-sess`` variants too), a
fresh cnonce, nc, the CSeq incremented and a new Via branch (a retry is a new transaction).

:func:`request_digest` is the bare RFC 7616 §3.4.1 computation, tested against the RFCs' examples.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from p2psip.errors import AuthError, ParseError
from p2psip.message import Request, Response, format_auth, new_branch, parse_auth
from p2psip.uri import URI

_HASHES: dict[str, str] = {"MD5": "md5", "SHA-256": "sha256", "SHA-512-256": "sha512_256"}
STRENGTH: tuple[str, ...] = ("SHA-512-256", "SHA-256", "MD5")
"""Algorithms this module knows, strongest first (each also with ``-sess``)."""


def _base_algorithm(algorithm: str) -> tuple[str, bool]:
    name = algorithm.upper()
    sess = name.endswith("-SESS")
    if sess:
        name = name[: -len("-SESS")]
    if name not in _HASHES:
        raise AuthError(f"unsupported digest algorithm {algorithm!r} (supported: {', '.join(STRENGTH)})")
    return name, sess


def _h(algorithm: str, data: str | bytes) -> str:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return hashlib.new(_HASHES[algorithm], raw).hexdigest()


def supported(algorithm: str) -> bool:
    """Whether ``algorithm`` (e.g. "SHA-256", "md5-sess") can be computed here."""
    try:
        _base_algorithm(algorithm)
    except AuthError:
        return False
    return True


def request_digest(
    *,
    algorithm: str,
    username: str,
    realm: str,
    password: str,
    method: str,
    uri: str,
    nonce: str,
    qop: str | None = None,
    nc: str | None = None,
    cnonce: str | None = None,
    body: bytes = b"",
) -> str:
    """The ``response`` parameter (RFC 7616 §3.4.1; RFC 2617 §3.2.2 for MD5; RFC 2069 form when ``qop``
    is None). ``qop`` may be "auth" or "auth-int" (which hashes ``body``)."""
    name, sess = _base_algorithm(algorithm)
    ha1 = _h(name, f"{username}:{realm}:{password}")
    if sess:
        ha1 = _h(name, f"{ha1}:{nonce}:{cnonce or ''}")
    if qop == "auth-int":
        ha2 = _h(name, f"{method}:{uri}:{_h(name, body)}")
    else:
        ha2 = _h(name, f"{method}:{uri}")
    if qop:
        return _h(name, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
    return _h(name, f"{ha1}:{nonce}:{ha2}")


def userhash(algorithm: str, username: str, realm: str) -> str:
    """RFC 7616 §3.4.4: H(username ":" realm), sent instead of the username when ``userhash=true``."""
    name, _sess = _base_algorithm(algorithm)
    return _h(name, f"{username}:{realm}")


# --------------------------------------------------------------------------------------------- server
@dataclass(frozen=True, slots=True)
class AuthResult:
    """The outcome of :meth:`DigestServer.verify`.

    ``ok``: the credentials are right and fresh. ``username``: who (when the header named one).
    ``stale``: the digest was right but the nonce expired — challenge again with ``stale=true``.
    ``reason``: why it failed, for logs (never sent to the peer).
    """

    ok: bool
    username: str | None = None
    stale: bool = False
    reason: str = ""


class DigestServer:
    """Challenges and verifies Digest credentials for one realm.

    ``credentials(username) -> password | None`` looks a user up. ``secret`` keys the nonce HMAC (give the
    same secret to every process that must accept the others' nonces; default: random per instance).
    ``nonce_lifetime`` (seconds) bounds how long a nonce is accepted; ``algorithms`` are offered in order.
    ``check_uri=True`` also requires the digest ``uri`` to equal the Request-URI (§19.1.4). It is off by
    default, like Kamailio: sipp and some phones put the next hop's address there, and the nonce-count
    check already stops replays.
    """

    def __init__(
        self,
        realm: str,
        credentials: Callable[[str], str | None],
        *,
        secret: bytes | None = None,
        nonce_lifetime: float = 300.0,
        algorithms: tuple[str, ...] = ("SHA-256", "MD5"),
        max_tracked_nonces: int = 10_000,
        check_uri: bool = False,
    ) -> None:
        for algorithm in algorithms:
            _base_algorithm(algorithm)
        if not algorithms:
            raise AuthError("DigestServer needs at least one algorithm")
        self.realm = realm
        self.credentials = credentials
        self.secret = secret if secret is not None else os.urandom(32)
        self.nonce_lifetime = nonce_lifetime
        self.algorithms = algorithms
        self.max_tracked_nonces = max_tracked_nonces
        self.check_uri = check_uri
        self.opaque = base64.urlsafe_b64encode(hmac.digest(self.secret, b"opaque", "sha256")[:12]).decode()
        self._nc_seen: OrderedDict[str, int] = OrderedDict()

    # nonces ---------------------------------------------------------------------------------------
    def make_nonce(self, now: float) -> str:
        """A fresh nonce: issue time, 8 random bytes, and an HMAC binding both to the realm."""
        payload = struct.pack(">d", now) + secrets.token_bytes(8)
        mac = hmac.digest(self.secret, payload + self.realm.encode("utf-8"), "sha256")[:16]
        return base64.urlsafe_b64encode(payload + mac).decode("ascii").rstrip("=")

    def nonce_age(self, nonce: str, now: float) -> float | None:
        """Seconds since ``nonce`` was issued, or None if it was not issued by this server (bad HMAC)."""
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except (ValueError, TypeError):
            return None
        if len(raw) != 32:
            return None
        payload, mac = raw[:16], raw[16:]
        expected = hmac.digest(self.secret, payload + self.realm.encode("utf-8"), "sha256")[:16]
        if not hmac.compare_digest(mac, expected):
            return None
        (issued,) = struct.unpack(">d", payload[:8])
        return now - float(issued)

    # challenges -----------------------------------------------------------------------------------
    def challenge_values(self, now: float, *, stale: bool = False) -> list[str]:
        """The WWW-Authenticate / Proxy-Authenticate values: one per algorithm, preferred first, sharing
        one nonce."""
        nonce = self.make_nonce(now)
        values = []
        for algorithm in self.algorithms:
            params = {
                "realm": self.realm,
                "qop": "auth",
                "nonce": nonce,
                "opaque": self.opaque,
                "algorithm": algorithm,
            }
            if stale:
                params["stale"] = "true"
            values.append(format_auth("Digest", params))
        return values

    def challenge(
        self, request: Request, now: float, *, proxy: bool = False, stale: bool = False
    ) -> Response:
        """A 401 (or 407 with ``proxy=True``) challenging ``request``."""
        response = Response.for_request(request, 407 if proxy else 401)
        header = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
        for value in self.challenge_values(now, stale=stale):
            response.add(header, value)
        return response

    # verification ---------------------------------------------------------------------------------
    def _credentials(self, request: Request, proxy: bool) -> list[dict[str, str]]:
        header = "Proxy-Authorization" if proxy else "Authorization"
        found = []
        for value in request.get_all(header):
            try:
                scheme, params = parse_auth(value)
            except ParseError:
                continue
            if scheme.lower() == "digest" and params.get("realm") == self.realm:
                found.append(params)
        return found

    def verify(self, request: Request, now: float, *, proxy: bool = False) -> AuthResult:
        """Check the request's Authorization (Proxy-Authorization with ``proxy=True``) for this realm."""
        found = self._credentials(request, proxy)
        if not found:
            return AuthResult(False, reason=f"no Digest credentials for realm {self.realm!r}")
        params = found[0]
        username = params.get("username")
        if username is None:
            return AuthResult(False, reason="credentials without username")
        algorithm = params.get("algorithm", "MD5")
        if algorithm.upper() not in (a.upper() for a in self.algorithms):
            return AuthResult(False, username, reason=f"algorithm {algorithm} was not offered")
        nonce = params.get("nonce", "")
        age = self.nonce_age(nonce, now)
        if age is None or age < -1.0:
            return AuthResult(False, username, reason="nonce not issued by this server")
        qop = params.get("qop")
        nc = params.get("nc", "")
        cnonce = params.get("cnonce")
        if qop != "auth" or not cnonce:
            return AuthResult(False, username, reason="qop=auth with a cnonce is required")
        try:
            count = int(nc, 16)
        except ValueError:
            return AuthResult(False, username, reason=f"bad nc {nc!r}")
        digest_uri = params.get("uri", "")
        if not digest_uri:
            return AuthResult(False, username, reason="credentials without uri")
        if self.check_uri:
            try:
                same_uri = URI(digest_uri) == request.uri
            except ParseError:
                same_uri = False
            if not same_uri:
                return AuthResult(False, username, reason=f"digest uri {digest_uri!r} is not the Request-URI")
        password = self.credentials(username)
        if password is None:
            return AuthResult(False, username, reason=f"unknown user {username!r}")
        expected = request_digest(
            algorithm=algorithm,
            username=username,
            realm=self.realm,
            password=password,
            method=request.method,
            uri=digest_uri,
            nonce=nonce,
            qop=qop,
            nc=nc,
            cnonce=cnonce,
        )
        if not hmac.compare_digest(expected, params.get("response", "").lower()):
            return AuthResult(False, username, reason="wrong password (digest mismatch)")
        if age > self.nonce_lifetime:
            return AuthResult(False, username, stale=True, reason="nonce expired")
        last = self._nc_seen.get(nonce)
        if last is not None and count <= last:
            return AuthResult(False, username, reason=f"replayed nonce count {nc}")
        self._remember(nonce, count)
        return AuthResult(True, username)

    def _remember(self, nonce: str, count: int) -> None:
        seen = self._nc_seen
        seen[nonce] = count
        seen.move_to_end(nonce)
        while len(seen) > self.max_tracked_nonces:
            seen.popitem(last=False)

    def check(
        self, request: Request, now: float, *, proxy: bool = False
    ) -> tuple[AuthResult, Response | None]:
        """Verify, and build the answer when it fails: ``(result, None)`` when authorised, else
        ``(result, challenge)`` — a fresh 401/407, with ``stale=true`` if only the nonce had expired.
        ACK and CANCEL always pass (they cannot be challenged, §22.1)."""
        if request.method.upper() in ("ACK", "CANCEL"):
            # §22.1: ACK and CANCEL cannot be challenged (nobody would answer); pass them.
            return AuthResult(True, reason=f"{request.method} is never challenged"), None
        result = self.verify(request, now, proxy=proxy)
        if result.ok:
            return result, None
        return result, self.challenge(request, now, proxy=proxy, stale=result.stale)


# --------------------------------------------------------------------------------------------- client
@dataclass(frozen=True, slots=True)
class Challenge:
    """One parsed Digest challenge (a WWW-Authenticate or Proxy-Authenticate value)."""

    realm: str
    nonce: str
    algorithm: str = "MD5"
    qop: tuple[str, ...] = ()
    opaque: str | None = None
    stale: bool = False
    userhash: bool = False

    @classmethod
    def parse(cls, value: str) -> Challenge:
        """Parse one header value; raises :class:`AuthError` if it is not a usable Digest challenge."""
        try:
            scheme, params = parse_auth(value)
        except ParseError as exc:
            raise AuthError(f"unreadable challenge {value!r}: {exc}") from exc
        if scheme.lower() != "digest":
            raise AuthError(f"challenge scheme {scheme!r} is not Digest")
        if "realm" not in params or "nonce" not in params:
            raise AuthError("Digest challenge without realm or nonce")
        qop = tuple(q.strip() for q in params.get("qop", "").split(",") if q.strip())
        return cls(
            realm=params["realm"],
            nonce=params["nonce"],
            algorithm=params.get("algorithm", "MD5"),
            qop=qop,
            opaque=params.get("opaque"),
            stale=params.get("stale", "").lower() == "true",
            userhash=params.get("userhash", "").lower() == "true",
        )


def _rank(challenge: Challenge) -> int:
    name, _sess = _base_algorithm(challenge.algorithm)
    return STRENGTH.index(name)


def pick_challenge(response: Response) -> tuple[Challenge, bool]:
    """The strongest supported challenge of a 401/407, and whether it is a proxy challenge (407)."""
    proxy = response.status == 407
    header = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
    usable: list[Challenge] = []
    for value in response.get_all(header):
        try:
            challenge = Challenge.parse(value)
        except AuthError:
            continue
        if supported(challenge.algorithm) and (
            not challenge.qop or {"auth", "auth-int"} & set(challenge.qop)
        ):
            usable.append(challenge)
    if not usable:
        raise AuthError(f"the {response.status} offers no Digest challenge this client supports")
    return min(usable, key=_rank), proxy


def credentials_value(
    challenge: Challenge,
    request: Request,
    username: str,
    password: str,
    *,
    cnonce: str | None = None,
    nc: int = 1,
) -> str:
    """The Authorization / Proxy-Authorization value answering ``challenge`` for ``request``."""
    uri = str(request.uri)
    qop = "auth" if "auth" in challenge.qop else ("auth-int" if "auth-int" in challenge.qop else None)
    cnonce = cnonce if cnonce is not None else secrets.token_hex(12)
    nc_text = f"{nc:08x}"
    response = request_digest(
        algorithm=challenge.algorithm,
        username=username,
        realm=challenge.realm,
        password=password,
        method=request.method,
        uri=uri,
        nonce=challenge.nonce,
        qop=qop,
        nc=nc_text if qop else None,
        cnonce=cnonce if qop else None,
        body=request.body,
    )
    params = {
        "username": userhash(challenge.algorithm, username, challenge.realm)
        if challenge.userhash
        else username,
        "realm": challenge.realm,
        "nonce": challenge.nonce,
        "uri": uri,
        "response": response,
        "algorithm": challenge.algorithm,
    }
    if qop:
        params.update({"qop": qop, "nc": nc_text, "cnonce": cnonce})
    if challenge.opaque is not None:
        params["opaque"] = challenge.opaque
    if challenge.userhash:
        params["userhash"] = "true"
    return format_auth("Digest", params)


def answer_challenge(
    response: Response,
    request: Request,
    username: str,
    password: str,
    *,
    cnonce: str | None = None,
    nc: int = 1,
) -> Request:
    """The request to send again after a 401/407: a copy of ``request`` with credentials for the strongest
    algorithm offered, the CSeq number incremented (§22.2) and a new top-Via branch (a new transaction).
    Credentials for the same realm from an earlier attempt are replaced. Raises :class:`AuthError` when
    the response carries no usable challenge."""
    challenge, proxy = pick_challenge(response)
    header = "Proxy-Authorization" if proxy else "Authorization"
    retry = request.copy()
    kept = [value for value in retry.get_all(header) if _realm_of(value) not in (challenge.realm, None)]
    retry.remove(header)
    for value in kept:
        retry.add(header, value)
    retry.add(header, credentials_value(challenge, retry, username, password, cnonce=cnonce, nc=nc))
    cseq = retry.cseq
    retry.set("CSeq", f"{cseq.number + 1} {cseq.method}")
    via = retry.top_via
    if via is not None and (via.branch or "").startswith("z9hG4bK"):
        via.params["branch"] = new_branch()
        retry.set_top_via(via)
    return retry


class DigestClient:
    """One user's credentials, remembering the challenges answered so later requests (a REGISTER refresh,
    a BYE) can carry credentials from the start, with a growing nonce-count (RFC 7616 §3.4.5).

    ``answer(response, request)`` is :func:`answer_challenge` plus memory; ``authorize(request)`` adds
    credentials for every remembered realm and returns the request (changed in place). A server that found
    the nonce stale just challenges again; answer that as usual.
    """

    def __init__(self, username: str, password: str) -> None:
        self.username = username
        self.password = password
        self._challenges: dict[tuple[str, bool], Challenge] = {}
        self._counts: dict[str, int] = {}

    def _next_nc(self, nonce: str) -> int:
        count = self._counts.pop(nonce, 0) + 1
        self._counts[nonce] = count  # most recent last; keep a few nonces only
        while len(self._counts) > 16:
            del self._counts[next(iter(self._counts))]
        return count

    def answer(self, response: Response, request: Request) -> Request:
        """The retried request for a 401/407 (CSeq + 1, new branch); the challenge is remembered."""
        challenge, proxy = pick_challenge(response)
        self._challenges[(challenge.realm, proxy)] = challenge
        return answer_challenge(
            response, request, self.username, self.password, nc=self._next_nc(challenge.nonce)
        )

    def authorize(self, request: Request) -> Request:
        """Add credentials for every remembered challenge to ``request`` (in place) and return it."""
        for (realm, proxy), challenge in self._challenges.items():
            header = "Proxy-Authorization" if proxy else "Authorization"
            kept = [v for v in request.get_all(header) if _realm_of(v) != realm]
            request.remove(header)
            for value in kept:
                request.add(header, value)
            nc = self._next_nc(challenge.nonce)
            request.add(header, credentials_value(challenge, request, self.username, self.password, nc=nc))
        return request


def _realm_of(value: str) -> str | None:
    try:
        _scheme, params = parse_auth(value)
    except ParseError:
        return None
    return params.get("realm")
