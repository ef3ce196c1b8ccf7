"""The peer's web pages: the ring page and its JSON twin, the softphone, and their safety rules, on real
loopback sockets; the pages themselves run in headless Chromium (tests/browser_support.py)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from browser_support import Browser
from peer_phone import Phone
from peer_support import wait_until_settled

from overlay.chord import ChordConfig
from overlay.node import NodeConfig
from p2psip.config import HostPort, ListenSpec, PeerConfig
from p2psip.peer import Peer
from p2psip.registrar import Binding
from p2psip.web.server import WebServer, redact

PeerFactory = Callable[..., Awaitable[Peer]]


def ring_node_config() -> NodeConfig:
    """Every peer of a small ring knows all the others (4 successors) and notices changes fast."""
    chord = ChordConfig(
        successors=4, stabilize_interval=0.2, fix_fingers_interval=0.2, check_predecessor_interval=0.4,
        rpc_timeout=0.5,
    )  # fmt: skip
    return NodeConfig(chord=chord, rpc_timeout=0.5, op_timeout=10.0, repair_interval=2.0)


@pytest.fixture
async def make_peer(tmp_path: Path) -> AsyncIterator[PeerFactory]:
    started: list[Peer] = []
    counter = iter(range(1000))

    async def make(join: Peer | None = None, *, http: bool = False, ws: bool = False, **kw: Any) -> Peer:
        listen = [ListenSpec(None, "127.0.0.1", 0)]  # UDP and TCP: WebRTC INVITEs exceed 1300 bytes
        if ws:
            listen.append(ListenSpec("ws", "127.0.0.1", 0))
        config = PeerConfig(
            listen=listen,
            overlay=HostPort("127.0.0.1", 0),
            join=HostPort(*join.overlay_address) if join else None,
            data_dir=tmp_path / f"peer{next(counter)}",
            cache_ttl=0.0,
            http=HostPort("127.0.0.1", 0) if http else None,
        )
        for key, value in kw.items():
            setattr(config, key, value)
        peer = await Peer.start(config, node_config=ring_node_config())
        started.append(peer)
        return peer

    yield make
    for peer in started:
        if not peer._closed:
            await peer.close(leave=False)


@pytest.fixture
async def browsers() -> AsyncIterator[Callable[[], Awaitable[Browser]]]:
    opened: list[Browser] = []

    async def make() -> Browser:
        browser = await asyncio.to_thread(Browser)
        opened.append(browser)
        return browser

    yield make
    for browser in opened:
        await browser.quit()


Reply = tuple[int, dict[str, str], bytes]


async def http_get(port: int, path: str, host: str = "127.0.0.1", headers: str = "") -> Reply:
    """A plain HTTP/1.1 GET on a raw socket: status, headers (lower-case names), body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{headers}Connection: close\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, hdrs, body


# ------------------------------------------------------------------------------------------ no browser


async def test_status_json_is_the_status_and_pages_are_safe(make_peer: PeerFactory) -> None:
    peer = await make_peer(http=True, ws=True)
    port = peer.web.port
    status, headers, body = await http_get(port, "/status.json")
    assert status == 200 and headers["content-type"] == "application/json"
    served = json.loads(body)
    direct = peer.status()
    for key in ("uptime_s", "counters"):  # these move between the two reads
        served.pop(key)
        direct.pop(key)
    assert served == json.loads(json.dumps(direct))
    # Strict CSP: no inline script can run, whatever a string in the status contains.
    status, headers, body = await http_get(port, "/")
    assert status == 200 and "script-src 'self'" in headers["content-security-policy"]
    assert b"<script src=\"/static/ring.js\"" in body
    # A DNS-rebinding page names its own host: refused.
    assert (await http_get(port, "/status.json", host="evil.example"))[0] == 421
    assert (await http_get(port, "/static/../server.py"))[0] == 404
    assert (await http_get(port, "/static/%2e%2e/server.py"))[0] == 404
    status, _, body = await http_get(port, "/phone/config.json")
    config = json.loads(body)
    assert config["ws"] == peer.ws_urls()["ws"] and config["problems"] == []
    # Our own page's origin may use the WebSocket listener.
    assert peer.stack.transport.ws_origins.admits(peer.web.origin)


async def test_off_loopback_needs_the_token_and_hides_names() -> None:
    status = {
        "node_id": "ab" * 16,
        "stored": [{"key": "k", "name": "sip:alice@x", "entries": 1, "owner": "o"}],
        "user_keys": ["sip:alice@x"],
        "registrations": [{"aor": "sip:alice@x"}],
        "calls": [{"from": "a"}],
    }
    web = WebServer(lambda: status, dict, host="127.0.0.1", port=0, token="t" * 20)
    await web.start()
    web.loopback = False  # behave as on a public address (tests never bind one)
    try:
        assert (await http_get(web.port, "/status.json"))[0] == 401
        assert (await http_get(web.port, "/status.json?token=wrong"))[0] == 401
        code, headers, body = await http_get(web.port, "/status.json?token=" + "t" * 20)
        assert code == 200 and "HttpOnly" in headers["set-cookie"]
        shown = json.loads(body)
        assert shown == redact(status) and "sip:alice@x" not in body.decode()
        cookie = headers["set-cookie"].split(";")[0]
        assert (await http_get(web.port, "/", headers=f"Cookie: {cookie}\r\n"))[0] == 200
        _, _, body = await http_get(web.port, "/phone/config.json", headers=f"Cookie: {cookie}\r\n")
        assert any("HTTPS" in p for p in json.loads(body)["problems"])
    finally:
        await web.close()


# --------------------------------------------------------------------------------------------- browser


async def test_ring_page_shows_the_ring_live(make_peer: PeerFactory, browsers) -> None:
    """5 peers that all know each other; the page shows 5 nodes, then a join and a leave without reload;
    a hostile AOR name renders as text."""
    first = await make_peer(http=True)
    peers = [first] + [await make_peer(first) for _ in range(4)]
    await wait_until_settled(peers, timeout=20)
    for _ in range(100):  # 4 successors each: every peer knows the 4 others
        if all(len({s.id for s in p.node.core.successors} - {p.node.node_id}) == 4 for p in peers):
            break
        await asyncio.sleep(0.1)
    # The status may hold any string a phone sent: the page must show it as text. Put a hostile AOR where
    # the page shows registrations (this peer's own table, so the test does not depend on key placement).
    hostile = "sip:<script>window.pwned=1</script><img src=x onerror=window.pwned=2>@x"
    first.home.update(hostile, [Binding(hostile, "sip:<b>bold</b>@x", 600, time.time())])
    phones = [await Phone.open(user) for user in ("erin", "frank", "grace")]
    try:
        for phone in phones:  # real registrations: stored entries (with names) and home registrations
            assert (await phone.register(first.sip_address(), expires=600)).status == 200
    finally:
        for phone in phones:
            phone.close()
    browser = await browsers()
    await browser.get(first.web.url)
    await browser.wait_for("document.querySelectorAll('#nodes g.node').length === 5", what="5 nodes")
    await browser.wait_for("document.querySelectorAll('#registrations tbody tr').length === 4")
    await browser.wait_for("document.querySelectorAll('#nodes g.node.self').length === 1")
    await browser.screenshot("browser-ring.png")
    updates = await browser.js("return Number(document.body.dataset.updates)")
    # The hostile name is text in a cell, and nothing ran.
    cells = await browser.js(
        "return [...document.querySelectorAll('#registrations td')].map(c => c.textContent)"
    )
    assert hostile in cells and "sip:<b>bold</b>@x" in cells
    assert await browser.js(
        "return window.pwned === undefined && document.querySelectorAll('#registrations script, "
        "#registrations img, #registrations b').length === 0"
    )
    # A join, then a leave, show up without reload.
    newcomer = await make_peer(first)
    new_id = f"{newcomer.node.node_id:032x}"
    await browser.wait_for(f"document.querySelector('#nodes g.node[data-id=\"{new_id}\"]') !== null",
                           timeout=15, what="the new peer on the page")  # fmt: skip
    await peers[2].close(leave=True)
    gone = f"{peers[2].node.node_id:032x}"
    await browser.wait_for(f"document.querySelector('#nodes g.node[data-id=\"{gone}\"]') === null",
                           timeout=15, what="the peer that left gone from the page")  # fmt: skip
    assert await browser.js("return Number(document.body.dataset.updates)") > updates
    assert await browser.js("return document.location.pathname") == "/"


async def register_page(browser: Browser, peer: Peer, aor: str) -> None:
    await browser.get(f"{peer.web.origin}/phone")
    await browser.wait_for("window.p2psipPhone && window.p2psipPhone.ready", what="the phone page ready")
    await browser.type("aor", aor)
    await browser.click("register")
    await browser.wait_for("window.p2psipPhone.registered", what=f"{aor} registered")


async def test_two_browser_phones_call_through_the_overlay(make_peer: PeerFactory, browsers: Any) -> None:
    """JsSIP in two Chromiums, registered at two different peers over WS: a call through the overlay,
    established on both sides, RTP both ways (inbound-rtp packetsReceived grows on each end), DTMF and
    mute, then a clean hang-up on both."""
    p0 = await make_peer(http=True, ws=True)
    p1 = await make_peer(p0, http=True, ws=True)
    await wait_until_settled([p0, p1], timeout=20)
    alice, bob = await browsers(), await browsers()
    await register_page(alice, p0, "sip:alice@p2p.example")
    await register_page(bob, p1, "sip:bob@p2p.example")
    assert any(r["aor"] == "sip:alice@p2p.example" for r in p0.status()["registrations"])
    await alice.type("target", "sip:bob@p2p.example")
    await alice.click("call")
    await bob.wait_for("window.p2psipPhone.state === 'incoming'", what="bob's phone ringing")
    await bob.click("answer")
    for side in (alice, bob):
        await side.wait_for("window.p2psipPhone.state === 'established'", what="the call established")
    assert any(c["state"] == "established" for c in p0.status()["calls"] + p1.status()["calls"])
    before = [await packets(side) for side in (alice, bob)]
    await asyncio.sleep(1.5)
    after = [await packets(side) for side in (alice, bob)]
    assert after[0] > before[0] and after[1] > before[1], f"RTP must flow both ways: {before} -> {after}"
    await alice.click("mute")
    await alice.js("document.querySelector('#keypad button').click();")
    assert await alice.js("return window.p2psipPhone.dtmfSent") == 1
    await bob.wait_for("window.p2psipPhone.dtmfReceived.join('') === '1'", what="the DTMF tone at bob (INFO)")
    assert await alice.js("return document.getElementById('mute').textContent") == "Unmute"
    await alice.screenshot("browser-phone.png")
    await alice.click("hangup")
    for side in (alice, bob):
        await side.wait_for("window.p2psipPhone.state === 'ended'", what="the call ended")
    for _ in range(50):
        if not (p0.status()["calls"] or p1.status()["calls"]):
            break
        await asyncio.sleep(0.1)
    assert p0.status()["calls"] == [] and p1.status()["calls"] == []


async def packets(browser: Browser) -> int:
    script = "const done = arguments[arguments.length - 1]; window.p2psipPhone.inboundPackets().then(done);"
    return int(await browser.js_async(script))


async def test_demo_prints_the_ring_page_and_keep_leaves_it_up() -> None:
    """``p2psip demo --keep``: the ring page's address is printed, it answers while the overlay stays up,
    and Ctrl-C (SIGINT) ends the demo with exit status 0."""
    import os
    import re
    import signal
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    # Under `timeout` so the child gets default SIGINT handling (a background job would ignore it). The
    # Ctrl-C goes to `timeout` alone, which passes it on once (--foreground: to the demo only): sent to the
    # whole group, the demo got it from us and again from `timeout` (1-3 SIGINTs, by how the scheduler
    # interleaved them), and a second one interrupts the clean-up as a second Ctrl-C should (exit -2).
    proc = await asyncio.create_subprocess_exec(
        "timeout", "--foreground", "-s", "KILL", "120", sys.executable, "-m", "p2psip.cli", "demo", "--keep",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env, cwd=root,
        start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    seen: list[str] = []
    url = None
    try:
        while True:
            line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
            assert line, "demo ended early:\n" + "".join(seen)
            seen.append(line)
            if url is None:
                match = re.search(r"ring page \(live, in a browser\): (http://127\.0\.0\.1:(\d+)/)", line)
                if match:
                    url = match.group(1)
            if line.startswith("--keep:"):
                break
        assert url is not None and url in seen[-1], "".join(seen)
        port = int(url.rsplit(":", 1)[1].strip("/"))
        status, _, body = await http_get(port, "/status.json")
        assert status == 200 and json.loads(body)["overlay_name"] == "p2psip-demo"
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


def test_browser_doc_commands_are_the_real_ones() -> None:
    """docs/browser.md: its install command is the one .ci/run runs; its start command parses into a
    config with a ws: listener and --http (the listeners themselves are exercised above)."""
    import re
    import shlex

    from p2psip.cli import build_parser
    from p2psip.cli.peer import _peer_flags
    from p2psip.config import load_config

    root = Path(__file__).resolve().parent.parent
    blocks = re.findall(r"```sh\n(.*?)```", (root / "docs" / "browser.md").read_text(), flags=re.S)
    install, start = (b.strip() for b in blocks)
    assert install in (root / ".ci" / "run").read_text()
    args = build_parser().parse_args(shlex.split(start)[1:])
    config = load_config(None, _peer_flags(args))
    assert [s.transport for s in config.listen] == [None, "ws"] and config.http is not None


SIPJS_START = """
const done = arguments[arguments.length - 1];
(async () => {
  const { Web } = await import('/static/sip.js/index.js');
  const audio = document.getElementById('remote-audio');
  const state = { events: [], user: null };
  window.sipjs = state;
  const user = new Web.SimpleUser(arguments[0], {
    aor: arguments[1],
    media: { constraints: { audio: true, video: false }, remote: { audio } },
    delegate: {
      onRegistered: () => state.events.push('registered'),
      onCallReceived: async () => { state.events.push('incoming'); await user.answer(); },
      onCallAnswered: () => state.events.push('established'),
      onCallHangup: () => state.events.push('ended'),
    },
  });
  state.user = user;
  state.inboundPackets = async () => {
    const pc = user.session && user.session.sessionDescriptionHandler
      && user.session.sessionDescriptionHandler.peerConnection;
    if (!pc) return 0;
    let total = 0;
    (await pc.getStats()).forEach((r) => { if (r.type === 'inbound-rtp') total += r.packetsReceived || 0; });
    return total;
  };
  await user.connect();
  await user.register();
  return 'ok';
})().then(done, (err) => done('error: ' + err));
"""


async def test_sipjs_and_jssip_call_each_other(make_peer: PeerFactory, browsers: Any) -> None:
    """SIP.js (npm sip.js, its SimpleUser) in one Chromium, registered over WS at one peer; the JsSIP phone
    in another, at another peer. SIP.js calls JsSIP, then JsSIP calls SIP.js: both established, RTP flows."""
    p0 = await make_peer(http=True, ws=True)
    p1 = await make_peer(p0, http=True, ws=True)
    await wait_until_settled([p0, p1], timeout=20)
    carol, bob = await browsers(), await browsers()
    await register_page(bob, p1, "sip:bob@p2p.example")
    await carol.get(f"{p0.web.origin}/phone")  # an origin the peer admits; SIP.js is loaded from it
    result = await carol.js_async(SIPJS_START, p0.ws_urls()["ws"], "sip:carol@p2p.example")
    assert result == "ok", result
    await carol.wait_for("window.sipjs.events.includes('registered')", what="SIP.js registered")
    assert any(r["aor"] == "sip:carol@p2p.example" for r in p0.status()["registrations"])

    # SIP.js calls JsSIP.
    await carol.js("window.sipjs.user.call('sip:bob@p2p.example');")
    await bob.wait_for("window.p2psipPhone.state === 'incoming'", what="bob ringing")
    await bob.click("answer")
    await carol.wait_for("window.sipjs.events.includes('established')", what="SIP.js call established")
    await bob.wait_for("window.p2psipPhone.state === 'established'")
    first = await packets(bob)
    await asyncio.sleep(1.0)
    assert await packets(bob) > first, "RTP from SIP.js to JsSIP"
    await carol.js("window.sipjs.user.hangup();")
    await bob.wait_for("window.p2psipPhone.state === 'ended'", what="bob's side ended")
    await carol.wait_for("window.sipjs.events.includes('ended')")

    # JsSIP calls SIP.js (which answers by itself).
    await bob.type("target", "sip:carol@p2p.example")
    await bob.click("call")
    await bob.wait_for("window.p2psipPhone.state === 'established'", what="JsSIP -> SIP.js established")
    await carol.wait_for("window.sipjs.events.filter(e => e === 'established').length === 2")
    first = await carol.js_async(
        "const done = arguments[arguments.length - 1]; window.sipjs.inboundPackets().then(done);"
    )
    await asyncio.sleep(1.0)
    later = await carol.js_async(
        "const done = arguments[arguments.length - 1]; window.sipjs.inboundPackets().then(done);"
    )
    assert later > first, "RTP from JsSIP to SIP.js"
    await bob.click("hangup")
    await carol.wait_for("window.sipjs.events.filter(e => e === 'ended').length === 2", what="SIP.js ended")


async def test_softphone_over_https_and_wss(make_peer: PeerFactory) -> None:
    """--http-tls and a wss: listener (self-signed certificates): the page is a secure context, finds the
    wss: URL, and JsSIP registers over WSS."""
    listen = [ListenSpec(None, "127.0.0.1", 0), ListenSpec("wss", "127.0.0.1", 0)]
    peer = await make_peer(http=True, http_tls=True, listen=listen)
    assert peer.web.origin.startswith("https://") and peer.ws_urls()["wss"].startswith("wss://")
    browser = await asyncio.to_thread(lambda: Browser(accept_self_signed=True))
    try:
        await register_page(browser, peer, "sip:dave@p2p.example")
        assert await browser.js("return window.isSecureContext && location.protocol") == "https:"
        assert await browser.js("return window.p2psipPhone.config.ws") == peer.ws_urls()["wss"]
        assert any(r["aor"] == "sip:dave@p2p.example" for r in peer.status()["registrations"])
    finally:
        await browser.quit()


async def test_status_json_equals_p2psip_status_json(tmp_path: Path) -> None:
    """A peer process started with --http: its /status.json and ``p2psip status --json`` agree (but for
    the uptime and the counters, which move between the two reads)."""
    import os
    import re
    import signal
    import sys

    from conftest import free_port

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    data = tmp_path / "peer"
    http = free_port()
    cli = [sys.executable, "-m", "p2psip.cli"]
    proc = await asyncio.create_subprocess_exec(
        *cli, "start", "--listen", f"127.0.0.1:{free_port()}", "--overlay", f"127.0.0.1:{free_port()}",
        "--data-dir", str(data), "--http", f"127.0.0.1:{http}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        seen = ""
        while "control socket" not in seen:
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            assert line, seen
            seen += line
        assert re.search(rf"ring page http://127\.0\.0\.1:{http}/", seen), seen
        status_cli = await asyncio.create_subprocess_exec(
            *cli, "status", "--json", "--data-dir", str(data), stdout=asyncio.subprocess.PIPE, env=env
        )
        out, _ = await asyncio.wait_for(status_cli.communicate(), 30)
        from_cli = json.loads(out)
        code, _, body = await http_get(http, "/status.json")
        from_web = json.loads(body)
        assert code == 200
        for moving in ("uptime_s", "counters"):
            from_cli.pop(moving)
            from_web.pop(moving)
        assert from_web == from_cli
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--ws-origin", "phone.example"], "is not an origin"),
        (["--http", "127.0.0.1"], "needs a port"),
        (["--http", "127.0.0.1:8088", "--http-token", "short"], "at least 16"),
        (["--listen", "wss:127.0.0.1"], None),  # a default port (443) is fine for parsing
    ],
)
def test_web_flags_are_checked(args: list[str], fragment: str | None) -> None:
    """Bad --ws-origin/--http/--http-token values are ConfigErrors (start prints one line, exits 2)."""
    from p2psip.cli.parser import build_parser
    from p2psip.cli.peer import _peer_flags
    from p2psip.config import load_config
    from p2psip.errors import ConfigError

    parsed = build_parser().parse_args(["start", *args])
    if fragment is None:
        assert load_config(None, _peer_flags(parsed)).listen[0].port == 443
        return
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, _peer_flags(parsed))


def test_phone_config_names_a_wildcard_listener_by_the_page_host() -> None:
    web = WebServer(dict, lambda: {"ws": "ws://0.0.0.0:8080", "wss": "wss://[::]:8443"}, host="127.0.0.1")
    assert web.phone_config("127.0.0.1")["ws"] == "ws://127.0.0.1:8080"
    assert web.phone_config("::1")["ws"] == "ws://[::1]:8080"
    assert web.phone_config(None)["ws"] == "ws://0.0.0.0:8080"
