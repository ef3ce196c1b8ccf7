"""``p2psip enroll serve``: the enrollment authority as a small HTTP service, so that the authority's key
stays on its own machine and a peer's keys never leave the peer's (``p2psip enroll user --ca-key`` needs
both in one place). docs/cli.md, docs/security.md.

The operator hands out one-time tokens (``p2psip enroll token``): each names what it enrolls (one user AOR,
or one node) and until when it may be used, and is kept only as its SHA-256 in ``DIR/tokens.json`` (mode
0600; the token itself is printed once). A peer posts ``{"kind", "subject", "public_key", "token"}`` as JSON
to ``/enroll`` (``p2psip enroll user|node --server URL --token T``, :func:`request_certificate`); the service
checks the token, signs a certificate for the posted key, forgets the token and answers
``{"certificate": hex}``; a refusal is 4xx with ``{"error": reason}``. Whoever holds a token can enroll its
subject once, with a key of their choice: hand tokens over a channel you trust, and serve over TLS (a
reverse proxy) off a trusted network.

:class:`EnrollmentDesk` is the sans-IO core (request body and ``now`` in, status and answer out); ``serve``
the h11 adapter (one request per connection, bounded body, time and connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import h11

from overlay.errors import OverlayError
from overlay.identity import NODE_CERT, USER_CERT, Certificate, KeyPair, enroll_node, enroll_user
from p2psip.errors import P2PSIPError
from p2psip.peer import canonical_aor

TOKENS_FILE = "tokens.json"
MAX_BODY = 4096
MAX_CONNECTIONS = 32
REQUEST_TIMEOUT = 10.0
DEFAULT_TOKEN_DAYS = 7.0


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _write_private(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON, mode 0600, atomically (a crash leaves the old file or the new one)."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _read_tokens(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise P2PSIPError(f"{path}: unreadable token file: {exc}") from None
    tokens = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(tokens, dict):
        raise P2PSIPError(f"{path}: not a token file")
    return tokens


def canonical_subject(kind: str, subject: str) -> str:
    """What a token or a request names: a user's canonical AOR, or ``""`` for a node (its NodeId follows
    from the key it posts). Raises P2PSIPError for a user subject that is not a SIP URI."""
    return "" if kind == NODE_CERT else canonical_aor(subject)


def issue_token(ca_dir: Path, kind: str, subject: str, *, now: float, days: float) -> str:
    """A new one-time token for ``kind`` (user: ``subject`` is its AOR; node) valid ``days``, recorded (as
    its hash) in ``ca_dir/tokens.json``; expired tokens are dropped from the file on the way."""
    path = ca_dir / TOKENS_FILE
    tokens = {h: t for h, t in _read_tokens(path).items() if float(t.get("until", 0)) > now}
    token = secrets.token_urlsafe(24)
    while token.startswith("-"):  # 1 in 64: `--token -x...` would read as an option on the command line
        token = secrets.token_urlsafe(24)
    tokens[_digest(token)] = {
        "kind": kind,
        "subject": canonical_subject(kind, subject),
        "until": now + days * 86400,
    }
    _write_private(path, {"tokens": tokens})
    return token


class EnrollmentDesk:
    """Answers enrollment requests (sans-IO: the body and ``now`` in, (HTTP status, JSON answer) out)."""

    def __init__(self, ca: KeyPair, ca_dir: Path, *, days: float) -> None:
        self.ca = ca
        self.tokens_path = ca_dir / TOKENS_FILE
        self.days = days
        self.counts = {"issued": 0, "refused": 0, "malformed": 0}

    def answer(self, body: bytes, now: float) -> tuple[int, dict[str, Any]]:
        try:
            request = json.loads(body)
            kind, subject, token = request["kind"], request.get("subject", ""), request["token"]
            public_key = bytes.fromhex(request["public_key"])
            if kind not in (USER_CERT, NODE_CERT) or not all(isinstance(x, str) for x in (subject, token)):
                raise ValueError("kind is user or node; subject and token are strings")
            subject = canonical_subject(kind, subject)
        except (ValueError, KeyError, TypeError, P2PSIPError) as exc:
            self.counts["malformed"] += 1
            return 400, {"error": f"malformed request: {exc}"}
        tokens = _read_tokens(self.tokens_path)  # read each time: `enroll token` may add while serving
        digest = _digest(token)
        record = next((t for h, t in tokens.items() if hmac.compare_digest(h, digest)), None)
        if record is None:
            return self._refuse("unknown or already used token")
        if float(record.get("until", 0)) <= now:
            return self._refuse("the token has expired")
        if (record.get("kind"), record.get("subject")) != (kind, subject):
            return self._refuse(
                f"the token enrolls another {'AOR' if record.get('kind') == USER_CERT else 'kind'}"
            )
        try:
            if kind == USER_CERT:
                cert = enroll_user(self.ca, subject, public_key, now=now, days=self.days)
            else:
                cert = enroll_node(self.ca, public_key, now=now, days=self.days)
        except OverlayError as exc:
            self.counts["malformed"] += 1
            return 400, {"error": str(exc)}
        del tokens[digest]  # one use
        _write_private(self.tokens_path, {"tokens": tokens})
        self.counts["issued"] += 1
        return 200, {"certificate": cert.to_bytes().hex()}

    def _refuse(self, reason: str) -> tuple[int, dict[str, Any]]:
        self.counts["refused"] += 1
        return 403, {"error": reason}


async def serve(desk: EnrollmentDesk, host: str, port: int, clock: Any) -> asyncio.Server:
    """Serve ``POST /enroll`` on ``host:port`` (the h11 adapter of ``desk``)."""
    slots = asyncio.Semaphore(MAX_CONNECTIONS)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if slots.locked():
            writer.close()
            return
        async with slots:
            try:
                await asyncio.wait_for(_one_request(desk, reader, writer, clock), REQUEST_TIMEOUT)
            except (TimeoutError, ConnectionError, h11.ProtocolError):
                pass
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    return await asyncio.start_server(handle, host, port)


async def _one_request(
    desk: EnrollmentDesk, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, clock: Any
) -> None:
    conn = h11.Connection(h11.SERVER)
    request: h11.Request | None = None
    body = b""
    status, answer = 400, {"error": "no complete request"}
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(4096)
            conn.receive_data(data)
            if not data and request is None:
                return
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += bytes(event.data)
            if len(body) > MAX_BODY:
                status, answer = 413, {"error": f"a request is at most {MAX_BODY} bytes"}
                break
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    if request is not None and len(body) <= MAX_BODY:
        if request.method != b"POST" or request.target.split(b"?")[0] != b"/enroll":
            status, answer = 404, {"error": "POST /enroll is the only request served here"}
        else:
            status, answer = desk.answer(body, clock())
    payload = json.dumps(answer).encode()
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(payload))),
        ("Connection", "close"),
    ]
    writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
    writer.write(conn.send(h11.Data(data=payload)) or b"")
    writer.write(conn.send(h11.EndOfMessage()) or b"")
    await writer.drain()


def request_certificate(server: str, token: str, kind: str, subject: str, public_key: bytes) -> Certificate:
    """Ask the enrollment service at ``server`` (``http(s)://HOST:PORT``) for a certificate; raises
    P2PSIPError with the service's reason (or why it could not be reached)."""
    url = server.rstrip("/") + "/enroll"
    if not url.startswith(("http://", "https://")):
        raise P2PSIPError(f"--server {server}: an http:// or https:// URL")
    body = json.dumps({"kind": kind, "subject": subject, "public_key": public_key.hex(), "token": token})
    request = urllib.request.Request(
        url, data=body.encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
            answer = json.loads(response.read(MAX_BODY * 4))
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read(MAX_BODY)).get("error", exc.reason)
        except ValueError:
            reason = exc.reason
        raise P2PSIPError(f"the enrollment service refused: {reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise P2PSIPError(f"cannot reach the enrollment service at {url}: {exc}") from None
    try:
        return Certificate.from_bytes(bytes.fromhex(answer["certificate"]))
    except (KeyError, TypeError, ValueError, OverlayError) as exc:
        raise P2PSIPError(f"the enrollment service answered no certificate: {exc}") from None
