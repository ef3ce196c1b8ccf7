"""Client scenarios: ``python -m sipapi.scenario`` with send/expect/pause steps and with the UA API,
against a real sipp UAS and through our own proxy; statistics and failure accounting; usage errors."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port, require_tool
from test_sipapi_support import EXAMPLES, ROOT

from p2psip.proxy import Proxy
from p2psip.stack import Stack
from sipapi.scenario import Runner, ScenarioError, expect, load, send

pytestmark = pytest.mark.interop


def run_scenario(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "sipapi.scenario", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


@pytest.fixture
def sipp_uas(tmp_path: Path):
    require_tool("sipp")
    from interop.sipp import uas

    port = free_port()
    with uas(tmp_path, port, scenario=None) as server:
        yield port, server


@pytest.mark.parametrize("example", ["scenario_uac.py", "scenario_uac_api.py"])
def test_scenario_against_sipp_uas(sipp_uas, example: str) -> None:
    port, _server = sipp_uas
    done = run_scenario(
        str(EXAMPLES / example), "--rate", "50", "--calls", "60", "--target", f"127.0.0.1:{port}",
        "--json", "--interval", "0.5",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    stats = json.loads(done.stdout)
    assert (stats["attempted"], stats["succeeded"], stats["failed"]) == (60, 60, 0), stats
    assert stats["response_ms"]["p50"] is not None and stats["response_ms"]["p50"] > 0
    assert stats["response_ms"]["p50"] <= stats["response_ms"]["p90"] <= stats["response_ms"]["p99"]
    # live statistics on stderr while it ran
    assert "attempted" in done.stderr and "p99" in done.stderr


def test_scenario_over_tcp(tmp_path: Path) -> None:
    require_tool("sipp")
    from interop.sipp import uas

    port = free_port()
    with uas(tmp_path, port, scenario=None, transport="t1"):
        for example in ("scenario_uac.py", "scenario_uac_api.py"):
            done = run_scenario(str(EXAMPLES / example), "--rate", "20", "--calls", "20",
                                "--transport", "tcp", "--target", f"127.0.0.1:{port}", "--json",
                                "--quiet")  # fmt: skip
            assert done.returncode == 0, done.stdout + done.stderr
            assert json.loads(done.stdout)["succeeded"] == 20


async def test_scenario_through_our_peer(tmp_path: Path) -> None:
    """A one-node overlay: sipp's UAS registered as sip:bob@HOST (the peer's own address, so the
    Request-URI of every call is looked up in the DHT), called by the step scenario through the peer. The
    UAS echoes Record-Route (sipp's built-in one answers in-dialog requests to where the INVITE came
    from, which is the peer, not the caller), so ACK and BYE follow the route through the peer."""
    require_tool("sipp")
    from interop.sipp import uas
    from test_sipapi_support import UdpClient

    from overlay.localring import quick_node_config
    from p2psip.config import HostPort, ListenSpec, PeerConfig
    from p2psip.peer import Peer

    port = free_port()
    with uas(tmp_path, port):
        config = PeerConfig(listen=[ListenSpec("udp", "127.0.0.1", 0)], overlay=HostPort("127.0.0.1", 0),
                            data_dir=tmp_path / "peer", cache_ttl=0.0)  # fmt: skip
        peer = await Peer.start(config, node_config=quick_node_config())
        try:
            host, sip_port = peer.sip_address()
            client = UdpClient()
            try:
                register = client.request("REGISTER", f"sip:{host}:{sip_port}", from_=f"sip:bob@{host}",
                                          to=f"sip:bob@{host}")  # fmt: skip
                register.set("Contact", f"<sip:bob@127.0.0.1:{port}>;expires=300")
                reply = await asyncio.to_thread(client.send, register, (host, sip_port), 15.0)
            finally:
                client.close()
            assert reply.status == 200
            runner = Runner(load(EXAMPLES / "scenario_uac.py"), f"{host}:{sip_port}", rate=30, calls=30,
                            service="bob")  # fmt: skip
            stats = await asyncio.wait_for(runner.run(), 60)
        finally:
            await peer.close(leave=False)
    assert (stats.attempted, stats.succeeded, stats.failed) == (30, 30, 0), stats.reasons
    assert peer.counters["routed"] + peer.counters["lookup_cache_hits"] >= 30


def test_cancel_steps_against_a_ringing_sipp(tmp_path: Path) -> None:
    """INVITE, 180, CANCEL (same branch), 200 for the CANCEL, 487 (ACKed by the runner, which sipp's
    scenario requires before it counts the call as done)."""
    require_tool("sipp")
    from interop.sipp import uas
    from test_sipapi_sipp_scenarios import NO_ANSWER, write

    scenario = tmp_path / "cancel.py"
    scenario.write_text(
        "from sipapi.scenario import SDP, expect, send\n"
        "steps = [send('INVITE', body=SDP), expect(100, optional=True), expect(180),\n"
        "         send('CANCEL'), expect(200), expect(487)]\n"
    )
    port = free_port()
    with uas(tmp_path, port, scenario=write(tmp_path, "na.xml", NO_ANSWER), extra=["-m", "10"]) as ringing:
        done = run_scenario(str(scenario), "--rate", "20", "--calls", "10", "--target", f"127.0.0.1:{port}",
                            "--json", "--quiet")  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert json.loads(done.stdout)["succeeded"] == 10
        verdict = ringing.wait(20)  # sipp -m 10 ends once its 10 calls saw their ACK
    assert verdict.returncode == 0, verdict


def test_failures_are_counted_with_their_reason(sipp_uas, tmp_path: Path) -> None:
    """A scenario expecting 486 from a UAS that answers 200 fails every call, with the reason."""
    port, _server = sipp_uas
    scenario = tmp_path / "wrong.py"
    scenario.write_text(
        "from sipapi.scenario import SDP, expect, send\n"
        "steps = [send('INVITE', body=SDP), expect(100, optional=True), expect(180, optional=True),\n"
        "         expect(486)]\n"
    )
    done = run_scenario(str(scenario), "--rate", "20", "--calls", "5", "--target", f"127.0.0.1:{port}",
                        "--json", "--quiet")  # fmt: skip
    assert done.returncode == 1
    stats = json.loads(done.stdout)
    assert (stats["succeeded"], stats["failed"]) == (0, 5)
    assert stats["failures"] == {"unexpected 200 (expected 486)": 5}


@pytest.mark.parametrize("example", ["scenario_uac.py", "scenario_uac_api.py"])
async def test_scenario_through_our_proxy_to_sipp(tmp_path: Path, example: str) -> None:
    """Our stateful proxy in the middle (``--proxy``, like sipp -rsa), for step scenarios and for UA-API
    scenarios (the proxy is the UserAgent's outbound proxy); the sipp UAS echoes the Record-Route, as a
    callee behind a record-routing proxy does, so the in-dialog requests follow it too."""
    require_tool("sipp")
    from interop.sipp import uas

    port = free_port()
    stack = await Stack.start(["udp:127.0.0.1:0"])
    proxy = Proxy(stack)
    try:
        with uas(tmp_path, port):
            host, proxy_port = stack.local_address("udp")
            scenario = load(EXAMPLES / example)
            runner = Runner(scenario, f"127.0.0.1:{port}", rate=40, calls=40, proxy=f"{host}:{proxy_port}")
            stats = await asyncio.wait_for(runner.run(), 60)
    finally:
        await stack.close()
    assert (stats.attempted, stats.succeeded, stats.failed) == (40, 40, 0), stats.reasons
    assert proxy.stats["forwarded_requests"] >= 80  # INVITE and BYE of every call went through it


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sipapi.scenario import main

    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    assert main([str(empty), "--target", "127.0.0.1:5060"]) == 2
    err = capsys.readouterr().err
    assert "neither" in err and "Traceback" not in err
    assert main([str(EXAMPLES / "scenario_uac.py"), "--target", "nowhere"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    broken = tmp_path / "broken.py"
    broken.write_text("steps = [\n")
    assert main([str(broken), "--target", "127.0.0.1:5060"]) == 2
    assert "syntax error" in capsys.readouterr().err
    with pytest.raises(ScenarioError):
        expect("2yy")
    with pytest.raises(ScenarioError):
        Runner(load(EXAMPLES / "scenario_uac.py"), "127.0.0.1:5060", rate=0)
    assert send("invite").method == "INVITE"


async def test_step_call_runs_on_the_user_agent_which_answers_the_callees_bye(tmp_path: Path) -> None:
    """A step call is a script over the one UserAgent: the callee (a UserAgent too) hangs up while the
    scenario pauses, and the runner's UA answers its BYE 200 in the adopted dialog (not 481); after the
    run the dialog is forgotten."""
    from p2psip.useragent import UserAgent

    stack = await Stack.start(["udp:127.0.0.1:0"])
    byes: list[int] = []
    done = asyncio.Event()

    async def hang_up(call) -> None:  # type: ignore[no-untyped-def]
        await asyncio.wait_for(call.confirmed.wait(), 10)
        byes.append((await call.bye()).status)
        done.set()

    tasks: list[asyncio.Task[None]] = []

    def answer(call) -> None:  # type: ignore[no-untyped-def]
        call.accept()
        tasks.append(asyncio.ensure_future(hang_up(call)))

    callee = UserAgent(stack, "sip:service@127.0.0.1", on_call=answer)
    try:
        host, port = stack.local_address("udp")
        scenario = tmp_path / "hangup.py"
        scenario.write_text(
            "from sipapi.scenario import SDP, expect, pause, send\n"
            "steps = [send('INVITE', body=SDP), expect(100, optional=True), expect(200), send('ACK'),\n"
            "         pause(2.0)]\n"
        )
        runner = Runner(load(scenario), f"{host}:{port}", rate=10, calls=1)
        run = asyncio.ensure_future(runner.run())
        await asyncio.wait_for(done.wait(), 10)
        stats = await asyncio.wait_for(run, 10)
    finally:
        await callee.close()
        await stack.close()
    assert (stats.succeeded, stats.failed) == (1, 0), stats.reasons
    assert byes == [200]
