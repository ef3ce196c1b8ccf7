"""The peer's small web server (HTTP/1.1 on :mod:`h11`, optionally TLS): read-only by default.

Routes: ``/`` the ring page, ``/status.json`` the peer's status (``p2psip status --json``), ``/events``
Server-Sent Events carrying the same JSON whenever it changes, ``/phone`` the softphone and
``/phone/config.json`` what it needs (the WebSocket URL of this peer), ``/static/...`` our own page
scripts and the npm-installed JavaScript libraries.

Safety, since any web page the user visits can try to reach ``http://127.0.0.1:PORT``:

- bound to exactly the address given (loopback unless told otherwise), and a ``Host`` header that is not
  that address is refused (a DNS-rebinding page cannot read the status);
- off loopback every request needs the access token (``?token=`` once, then a cookie), and the status is
  *redacted*: AOR names, contacts, user keys and registrations are hidden (they are what the hardening
  work stops disclosing); no secret (key, password) is ever part of the status in the first place;
- pages put every string into the DOM as text (``textContent``), never as markup, and a strict
  Content-Security-Policy forbids inline scripts, so an AOR like ``sip:<script>@x`` renders as text;
- the softphone needs a secure context for the microphone: off loopback it requires HTTPS and a
  ``wss:`` listener, and the page says which one is missing.

One request per connection (``Connection: close``), except ``/events``, which streams until the browser
goes away. The number of open connections is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import mimetypes
import secrets
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11

from p2psip.address import bracket, format_hostport
from p2psip.background import Background

log = logging.getLogger("p2psip.web")

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
NPM = HERE / "node_modules"
BUILT = HERE / "dist"

MAX_CONNECTIONS = 64
REQUEST_TIMEOUT = 10.0
EVENT_INTERVAL = 0.5
"""Seconds between two looks at the status for the event stream (sent only when it changed)."""

#: Keys of the status that name users or their devices: hidden off loopback.
PRIVATE_KEYS = ("user_keys", "registrations", "calls", "flows")

SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self' ws: wss:; media-src 'self' blob:; frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def redact(status: dict[str, Any]) -> dict[str, Any]:
    """The status as shown off loopback: no AOR names, contacts, user keys, registrations or calls."""
    out = {k: v for k, v in status.items() if k not in PRIVATE_KEYS}
    out["stored"] = [{**entry, "name": None} for entry in status.get("stored", [])]
    out["redacted"] = True
    return out


class WebServer:
    """Serve the ring page and the softphone for one peer.

    ``status`` returns the peer's status dict (what ``p2psip status --json`` prints); ``ws_urls`` the
    WebSocket listeners as ``{"ws": "ws://host:port", "wss": ...}`` (either may be missing). ``token``
    is required off loopback (a random one is made when None; :attr:`token` tells it).
    """

    def __init__(
        self,
        status: Callable[[], dict[str, Any]],
        ws_urls: Callable[[], dict[str, str]],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: ssl.SSLContext | None = None,
        token: str | None = None,
    ) -> None:
        self.status = status
        self.ws_urls = ws_urls
        self.host = host
        self.port = port
        self.tls = tls
        self.loopback = is_loopback(host)
        self.token = token or secrets.token_urlsafe(18)
        self.server: asyncio.AbstractServer | None = None
        self.connections = 0
        self.stats = {"requests": 0, "refused": 0, "not_found": 0, "bad_requests": 0, "event_streams": 0}
        self._tasks = Background(log, "web request")

    # ---------------------------------------------------------------------------------------- life

    async def start(self) -> None:
        self.server = await asyncio.start_server(
            self._serve, self.host, self.port, ssl=self.tls, limit=16384, reuse_address=True
        )
        self.port = int(self.server.sockets[0].getsockname()[1])

    @property
    def origin(self) -> str:
        """What a browser sends as ``Origin`` from our pages (the WS handshake admits it)."""
        return f"{'https' if self.tls else 'http'}://{format_hostport(self.host, self.port)}"

    @property
    def url(self) -> str:
        """The ring page's address (with the token off loopback)."""
        return f"{self.origin}/" + ("" if self.loopback else f"?token={self.token}")

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        self._tasks.cancel()
        if self.server is not None:
            with contextlib.suppress(TimeoutError, OSError):
                await asyncio.wait_for(self.server.wait_closed(), 2.0)

    # -------------------------------------------------------------------------------------- serving

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)  # held (and cancelled at close) until it ends
        self.connections += 1
        try:
            if self.connections > MAX_CONNECTIONS:
                self.stats["refused"] += 1
                return
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16384)
            request = await asyncio.wait_for(self._read_request(reader, conn), REQUEST_TIMEOUT)
            if request is None:
                self.stats["bad_requests"] += 1
                with contextlib.suppress(h11.LocalProtocolError):
                    await self._send(writer, conn, 400, b"bad request\n", "text/plain")
                return
            self.stats["requests"] += 1
            await self._route(request, writer, conn)
        except (TimeoutError, ConnectionError, ssl.SSLError, h11.LocalProtocolError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:  # one broken request must not take the web page down
            log.exception("web request failed")
        finally:
            self.connections -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _read_request(self, reader: asyncio.StreamReader, conn: h11.Connection) -> h11.Request | None:
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return None
            if isinstance(event, h11.Request):
                return event
            if event is h11.NEED_DATA:
                data = await reader.read(8192)
                conn.receive_data(data)
                if not data:
                    return None
            else:
                return None

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        conn: h11.Connection,
        status: int,
        body: bytes,
        content_type: str,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        headers = [
            (b"content-type", content_type.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *SECURITY_HEADERS,
            *(extra or []),
        ]
        writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
        writer.write(conn.send(h11.Data(data=body)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()

    def _host_ok(self, request: h11.Request) -> bool:
        """Refuse a Host that is not our address (a DNS-rebinding page names its own domain)."""
        host = next((v.decode("latin-1") for k, v in request.headers if k == b"host"), "")
        name = urlsplit(f"//{host}").hostname or ""
        if name in ("localhost",) and self.loopback:
            return True
        try:
            wildcard = self.host in ("0.0.0.0", "::")
            return wildcard or ipaddress.ip_address(name) == ipaddress.ip_address(self.host)
        except ValueError:
            return False

    def _authorized(self, request: h11.Request, query: dict[str, list[str]]) -> tuple[bool, bool]:
        """(allowed, set the cookie): loopback needs nothing; elsewhere the token, by query or cookie."""
        if self.loopback:
            return True, False
        given = query.get("token", [""])[0]
        if given and hmac.compare_digest(given, self.token):
            return True, True
        for name, value in request.headers:
            if name == b"cookie":
                for part in value.decode("latin-1").split(";"):
                    key, _, val = part.strip().partition("=")
                    if key == "p2psip_token" and hmac.compare_digest(val, self.token):
                        return True, False
        return False, False

    def current_status(self) -> dict[str, Any]:
        status = self.status()
        return status if self.loopback else redact(status)

    async def _route(self, request: h11.Request, writer: asyncio.StreamWriter, conn: h11.Connection) -> None:
        target = urlsplit(request.target.decode("latin-1"))
        path = target.path
        query = parse_qs(target.query)
        if request.method not in (b"GET", b"HEAD"):
            await self._send(writer, conn, 405, b"read-only\n", "text/plain", [(b"allow", b"GET")])
            return
        if not self._host_ok(request):
            self.stats["refused"] += 1
            await self._send(writer, conn, 421, b"wrong host\n", "text/plain")
            return
        allowed, set_cookie = self._authorized(request, query)
        if not allowed:
            self.stats["refused"] += 1
            why = b"this page needs its token: open the address the peer printed\n"
            await self._send(writer, conn, 401, why, "text/plain")
            return
        extra: list[tuple[bytes, bytes]] = []
        if set_cookie:
            flags = "; Secure" if self.tls else ""
            cookie = f"p2psip_token={self.token}; HttpOnly; SameSite=Strict; Path=/{flags}"
            extra.append((b"set-cookie", cookie.encode()))
        if path in ("/", "/index.html"):
            await self._file(writer, conn, STATIC / "ring.html", extra)
        elif path == "/status.json":
            body = json.dumps(self.current_status(), indent=2, sort_keys=True).encode()
            await self._send(writer, conn, 200, body, "application/json", extra)
        elif path == "/events":
            await self._events(writer, conn)
        elif path == "/phone":
            await self._file(writer, conn, STATIC / "phone.html", extra)
        elif path == "/phone/config.json":
            body = json.dumps(self.phone_config(self._request_host(request))).encode()
            await self._send(writer, conn, 200, body, "application/json", extra)
        elif path.startswith("/static/"):
            await self._static(path[len("/static/") :], writer, conn)
        else:
            self.stats["not_found"] += 1
            await self._send(writer, conn, 404, b"not found\n", "text/plain")

    @staticmethod
    def _request_host(request: h11.Request) -> str | None:
        host = next((v.decode("latin-1") for k, v in request.headers if k == b"host"), "")
        return urlsplit(f"//{host}").hostname

    def phone_config(self, page_host: str | None = None) -> dict[str, Any]:
        """What the softphone needs, and what stops it (a browser grants the microphone only to a secure
        context: https, or a page from loopback). A listener on a wildcard address is named by the host
        the page itself was loaded from."""
        urls = self.ws_urls()
        if page_host:
            shown = bracket(page_host)
            for scheme, listener in list(urls.items()):
                urls[scheme] = listener.replace("//0.0.0.0:", f"//{shown}:").replace("//[::]:", f"//{shown}:")
        problems = []
        url: str | None
        if self.tls is not None:
            url = urls.get("wss")
            if url is None:
                problems.append("served over HTTPS, the phone needs a wss: listener (--listen wss:HOST:PORT)")
        else:
            url = urls.get("ws") or urls.get("wss")
            if not self.loopback:
                problems.append("off loopback the phone needs HTTPS (--http-tls) and a wss: listener")
            if url is None:
                problems.append("the peer has no WebSocket listener (--listen ws:HOST:PORT)")
        return {"ws": url, "problems": problems}

    async def _file(
        self, writer: asyncio.StreamWriter, conn: h11.Connection, path: Path, extra: list[tuple[bytes, bytes]]
    ) -> None:
        try:
            body = path.read_bytes()
        except OSError:
            self.stats["not_found"] += 1
            await self._send(writer, conn, 404, b"not found\n", "text/plain")
            return
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind == "application/javascript":
            kind += "; charset=utf-8"
        await self._send(writer, conn, 200, body, kind, extra)

    async def _static(self, rel: str, writer: asyncio.StreamWriter, conn: h11.Connection) -> None:
        """Our page scripts, the JsSIP bundle built by ``npm install``, and SIP.js's ES modules."""
        from_npm = rel == "jssip.js" or rel.startswith("sip.js/")
        if rel == "jssip.js":
            base = BUILT
            path = BUILT / "jssip.js"
        elif rel.startswith("sip.js/"):
            base = NPM / "sip.js" / "lib"
            path = base / rel[len("sip.js/") :]
        else:
            base = STATIC
            path = STATIC / rel
        try:
            resolved = path.resolve()
            resolved.relative_to(base.resolve())  # no ../ out of the served folders
        except (OSError, ValueError):
            self.stats["not_found"] += 1
            await self._send(writer, conn, 404, b"not found\n", "text/plain")
            return
        if not resolved.is_file():
            self.stats["not_found"] += 1
            hint = b" (run: npm install --prefix p2psip/web)" if from_npm else b""
            await self._send(writer, conn, 404, b"not found" + hint + b"\n", "text/plain")
            return
        await self._file(writer, conn, resolved, [])

    async def _events(self, writer: asyncio.StreamWriter, conn: h11.Connection) -> None:
        """Server-Sent Events: the status JSON as one ``data:`` line whenever it changed."""
        self.stats["event_streams"] += 1
        headers = [
            (b"content-type", b"text/event-stream"),
            (b"connection", b"close"),
            *SECURITY_HEADERS,
        ]
        writer.write(conn.send(h11.Response(status_code=200, headers=headers)))
        last = b""
        beat = 0
        while True:
            body = json.dumps(self.current_status(), sort_keys=True, separators=(",", ":")).encode()
            if body != last:
                writer.write(conn.send(h11.Data(data=b"data: " + body + b"\n\n")))
                last = body
            elif beat % 20 == 0:
                writer.write(conn.send(h11.Data(data=b": keep-alive\n\n")))
            beat += 1
            await writer.drain()
            await asyncio.sleep(EVENT_INTERVAL)
