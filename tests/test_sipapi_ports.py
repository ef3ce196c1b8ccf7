"""Real sipp/SER use cases ported to sipapi (docs/examples), each run against real sipp:

- ser_busy_every_third.py: a test UAS answering 486 to every third INVITE (sipp's UAC counts 2/3 success);
- ser_forwarder.py: SER's t_relay to a gateway (sipp UAC → script server → sipp UAS, Record-Route honoured);
- scripting_b2bua.py: a back-to-back UA with the Layer 1 API (sipp UAC → B2BUA → sipp UAS, both legs
  hung up);
- scenario_uac_auth.py: sipp's "UAC with authentication" as a scenario, against a sipp UAS that challenges
  and checks the digest with its own verifyauth (a wrong password fails every call: the check is real);
- ser_registrar_overlay.py: save/lookup/t_relay through a two-node overlay of script servers, called by
  sipp and answered by sipp.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, require_tool
from test_sipapi_sipp_scenarios import AUTH_UAS, write
from test_sipapi_support import EXAMPLES, ROOT, UdpClient, script_process

pytestmark = [pytest.mark.interop, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _sipp() -> None:
    require_tool("sipp")


def test_uas_busy_every_third_call(tmp_path: Path) -> None:
    from interop.sipp import run_calls

    port = free_port()
    with script_process(EXAMPLES / "ser_busy_every_third.py", str(port)) as server:
        server.wait_ready()
        # sipp's UAC keeps a call that got the unexpected 486 waiting for a 200 until its receive
        # timeout: 3 s, so those calls end (failed) soon after
        result = run_calls(tmp_path, f"127.0.0.1:{port}", calls=30, rate=30, port=free_port(),
                           scenario=None, timeout=60, recv_timeout_ms=3000)  # fmt: skip
    assert (result.successful, result.failed) == (20, 10), f"{result}\n{server.output()}"


def test_forwarder_relays_sipp_calls_to_a_gateway(tmp_path: Path) -> None:
    from interop.sipp import run_calls, uas

    port, gw = free_port(), free_port()
    with (
        uas(tmp_path, gw),
        script_process(EXAMPLES / "ser_forwarder.py", str(port), f"127.0.0.1:{gw}") as server,
    ):
        server.wait_ready()
        result = run_calls(tmp_path, f"127.0.0.1:{port}", calls=50, rate=25, port=free_port(), timeout=60)
    assert (result.successful, result.failed) == (50, 0), f"{result}\n{server.output()}"
    assert "Traceback" not in server.output()


def test_b2bua_bridges_sipp_calls(tmp_path: Path) -> None:
    from interop.sipp import run_calls, uas

    port, far = free_port(), free_port()
    with (
        uas(tmp_path, far, scenario=None),
        script_process(EXAMPLES / "scripting_b2bua.py", str(port), f"127.0.0.1:{far}") as b2bua,
    ):
        b2bua.wait_ready()
        result = run_calls(tmp_path, f"127.0.0.1:{port}", calls=20, rate=20, port=free_port(),
                           scenario=None, timeout=60, recv_timeout_ms=5000)  # fmt: skip
    assert (result.successful, result.failed) == (20, 0), f"{result}\n{b2bua.output()}"
    assert "Traceback" not in b2bua.output()


def run_scenario(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "sipapi.scenario", *args], capture_output=True, text=True,
                          timeout=90, env=env, cwd=ROOT)  # fmt: skip


def test_uac_with_auth_against_sipp_verifyauth(tmp_path: Path) -> None:
    from interop.sipp import uas

    port = free_port()
    with uas(tmp_path, port, scenario=write(tmp_path, "auth.xml", AUTH_UAS)):
        good = run_scenario(str(EXAMPLES / "scenario_uac_auth.py"), "--rate", "10", "--calls", "10",
                            "--target", f"127.0.0.1:{port}", "--json", "--quiet")  # fmt: skip
        wrong = tmp_path / "wrong.py"
        wrong.write_text((EXAMPLES / "scenario_uac_auth.py").read_text().replace('"secret"', '"guess"'))
        bad = run_scenario(str(wrong), "--rate", "10", "--calls", "5", "--target", f"127.0.0.1:{port}",
                           "--json", "--quiet")  # fmt: skip
    assert good.returncode == 0, good.stdout + good.stderr
    stats = json.loads(good.stdout)
    assert (stats["succeeded"], stats["failed"]) == (10, 0), stats
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["failures"] == {"403": 5}


def test_registrar_location_and_relay_through_the_overlay(tmp_path: Path) -> None:
    from interop.sipp import UAC_DOMAIN, run_calls, uas

    sip1, ov1, sip2, ov2, callee = (free_port() for _ in range(5))
    script = EXAMPLES / "ser_registrar_overlay.py"
    with script_process(script, str(sip1), str(ov1)) as first:
        first.wait_ready()
        with (
            script_process(script, str(sip2), str(ov2), f"127.0.0.1:{ov1}") as second,
            uas(tmp_path, callee),
        ):
            second.wait_ready()
            client = UdpClient()
            try:
                deadline = time.monotonic() + 40  # until the new ring can store bob's key (503 before)
                while True:
                    bob = "sip:bob@example.com"
                    register = client.request("REGISTER", f"sip:127.0.0.1:{sip1}", from_=bob, to=bob)
                    register.set("Contact", f"<sip:bob@127.0.0.1:{callee}>;expires=300")
                    status = client.send(register, ("127.0.0.1", sip1), 20).status
                    if status != 503 or time.monotonic() > deadline:
                        break
                assert status == 200
                # nobody as carol: 404 from the script's lookup
                missing = client.request("INVITE", "sip:carol@example.com")
                assert client.send(missing, ("127.0.0.1", sip2), 15).status == 404
            finally:
                client.close()
            result = run_calls(tmp_path, f"127.0.0.1:{sip2}", calls=10, rate=10, port=free_port(),
                               scenario=UAC_DOMAIN, service="bob",
                               extra=["-key", "domain", "example.com"], timeout=60)  # fmt: skip
        assert (result.successful, result.failed) == (10, 0), f"{result}\n{first.output()}\n{second.output()}"
