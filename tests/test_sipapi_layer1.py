"""Layer 1: ``from sipapi import *`` gives the source-code API and the scripting names, and the
documented ten-line call (docs/examples/scripting_call.py) calls a real sipp UAS."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port, require_tool
from test_sipapi_support import EXAMPLES, ROOT


def test_star_import_gives_every_name() -> None:
    namespace: dict[str, object] = {}
    exec("from sipapi import *", namespace)
    import p2psip.dialog
    import p2psip.message
    import p2psip.peer
    import p2psip.stack
    import p2psip.transaction
    import p2psip.uri
    import p2psip.useragent

    expected = {
        "URI": p2psip.uri.URI,
        "Address": p2psip.uri.Address,
        "Message": p2psip.message.Message,
        "Request": p2psip.message.Request,
        "Response": p2psip.message.Response,
        "Stack": p2psip.stack.Stack,
        "UserAgent": p2psip.useragent.UserAgent,
        "Peer": p2psip.peer.Peer,
        "Transaction": p2psip.transaction.Transaction,  # the article names these two as part of the API
        "Dialog": p2psip.dialog.Dialog,
    }
    for name, obj in expected.items():
        assert namespace[name] is obj, name
    for name in ("open", "run", "basic", "Event", "overlay"):
        assert name in namespace, name
    assert callable(namespace["open"]) and callable(namespace["run"])
    assert hasattr(namespace["basic"], "addEventListener")


@pytest.mark.interop
def test_ten_line_call_against_sipp(tmp_path: Path) -> None:
    require_tool("sipp")
    from interop.sipp import uas

    example = EXAMPLES / "scripting_call.py"
    code_lines = [ln for ln in example.read_text().splitlines() if ln.strip() and not ln.startswith('"""')]
    assert len(code_lines) <= 12, "the call example should stay about ten lines"
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # straight to the URI's host, then (as through a peer) an AOR whose domain only the outbound proxy reaches
    for argv in ([f"sip:service@127.0.0.1:{port}"], ["sip:service@p2p.example", f"127.0.0.1:{port}"]):
        with uas(tmp_path, port, scenario=None):
            done = subprocess.run(
                [sys.executable, str(example), *argv], capture_output=True, text=True, timeout=60, env=env
            )
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == ["answered: 200 OK", "hung up: 200"]
