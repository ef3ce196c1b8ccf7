"""The enrollment service (``p2psip enroll serve``, p2psip/cli/enroll_service.py): one-time tokens
(``p2psip enroll token``) kept only as hashes, each enrolling one user AOR or one node, once, before it
expires; the service signs the key a peer posts, so neither the peer's keys nor the authority's key travel.
The desk is tested sans-IO; the commands as real processes over loopback HTTP."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_cli import CLI, ROOT, run

from overlay.identity import (
    KeyPair,
    load_public_key,
    node_cert_problem,
    node_id_of,
    node_identity,
    user_cert_problem,
)
from overlay.ids import key_for
from p2psip.cli.enroll_service import TOKENS_FILE, EnrollmentDesk, issue_token
from p2psip.peer import USERS_DIR, UserKeys

AOR = "sip:alice@corp.example"
NOW = 1_900_000_000.0


def _ask(desk: EnrollmentDesk, token: str, key: bytes, kind: str = "user", subject: str = AOR,
         now: float = NOW) -> tuple[int, dict]:  # fmt: skip
    body = json.dumps({"kind": kind, "subject": subject, "public_key": key.hex(), "token": token}).encode()
    return desk.answer(body, now)


def test_a_token_enrolls_its_subject_once(tmp_path: Path) -> None:
    ca, alice = KeyPair.generate(), KeyPair.generate()
    desk = EnrollmentDesk(ca, tmp_path, days=30)
    token = issue_token(tmp_path, "user", "sip:alice@Corp.Example", now=NOW, days=1)
    # the file holds only the token's hash, readable by the authority alone
    tokens = tmp_path / TOKENS_FILE
    assert token not in tokens.read_text() and stat.S_IMODE(tokens.stat().st_mode) == 0o600
    assert _ask(desk, token, alice.public_key, subject="sip:bob@corp.example") == (
        403, {"error": "the token enrolls another AOR"})  # fmt: skip
    status, answer = _ask(desk, token, alice.public_key, subject="sip:alice@corp.example;transport=udp")
    assert status == 200, answer
    from overlay.identity import Certificate

    cert = Certificate.from_bytes(bytes.fromhex(answer["certificate"]))
    assert cert.subject == AOR and cert.not_after - NOW == pytest.approx(30 * 86400, abs=1)
    assert user_cert_problem(ca.public_key, cert.to_bytes(), key_for(AOR), alice.public_key, NOW) is None
    assert _ask(desk, token, alice.public_key) == (403, {"error": "unknown or already used token"})
    assert desk.counts == {"issued": 1, "refused": 2, "malformed": 0}


def test_expired_wrong_kind_and_malformed_requests(tmp_path: Path) -> None:
    ca, node = KeyPair.generate(), KeyPair.generate()
    desk = EnrollmentDesk(ca, tmp_path, days=30)
    token = issue_token(tmp_path, "node", "", now=NOW, days=1)
    assert _ask(desk, token, node.public_key, kind="user")[0] == 403  # a node token enrolls no user
    assert _ask(desk, token, node.public_key, kind="node", now=NOW + 2 * 86400) == (
        403, {"error": "the token has expired"})  # fmt: skip
    for body in (b"not json", b"{}", json.dumps({"kind": "root", "token": "x", "public_key": "00"}).encode()):
        assert desk.answer(body, NOW)[0] == 400
    assert _ask(desk, token, b"short", kind="node")[0] == 400  # not a 32-byte key: nothing signed
    status, answer = _ask(desk, token, node.public_key, kind="node", subject="ignored")
    assert status == 200
    blob = bytes.fromhex(answer["certificate"])
    assert node_cert_problem(ca.public_key, blob, node_id_of(node.public_key), NOW) is None
    # a new token drops the expired ones from the file
    issue_token(tmp_path, "user", AOR, now=NOW + 30 * 86400, days=1)
    assert len(json.loads((tmp_path / TOKENS_FILE).read_text())["tokens"]) == 1


def test_enroll_through_the_service_as_processes(tmp_path: Path) -> None:
    assert run("enroll", "init", str(tmp_path / "ca")).returncode == 0
    proc = subprocess.Popen(
        [*CLI, "enroll", "serve", str(tmp_path / "ca"), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(30)
        assert ready and " ready" in ready[0], ready
        url = ready[0].split(" on ")[1].split("/enroll")[0]
        data_dir = tmp_path / "peer"
        token = run("enroll", "token", AOR, "--ca-dir", str(tmp_path / "ca")).stdout.strip()
        done = run("enroll", "user", AOR, "--server", url, "--token", token, "--data-dir", str(data_dir))
        assert done.returncode == 0, done.stderr
        # the certificate is for the user key in the peer's data dir, under the authority's public key
        ca_pub = load_public_key(tmp_path / "ca" / "ca.pub")
        users = UserKeys(data_dir / USERS_DIR)
        cert = users.certificate(AOR)
        assert cert is not None
        problem = user_cert_problem(
            ca_pub, cert.to_bytes(), key_for(AOR), users.get(AOR).public_key, cert.not_before + 120
        )
        assert problem is None
        again = run("enroll", "user", AOR, "--server", url, "--token", token, "--data-dir", str(data_dir))
        assert again.returncode == 1 and again.stderr.strip() == (
            "p2psip: error: the enrollment service refused: unknown or already used token")  # fmt: skip
        node_token = run("enroll", "token", "--node", "--ca-dir", str(tmp_path / "ca"), "--json")
        token = json.loads(node_token.stdout)["token"]
        done = run("enroll", "node", "--server", url, "--token", token, "--data-dir", str(data_dir), "--json")
        assert done.returncode == 0 and json.loads(done.stdout)["kind"] == "node", done.stderr
        node_key = node_identity(data_dir).public_key
        blob = (data_dir / "node.cert").read_bytes()
        assert node_cert_problem(ca_pub, blob, node_id_of(node_key), cert.not_before + 120) is None
        # anything but a small POST /enroll: refused with a reason, the service unharmed
        for path, data, code in (
            ("/enroll", b"x" * 5000, 413),
            ("/other", b"{}", 404),
            ("/enroll", b"[", 400),
        ):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(
                    urllib.request.Request(url + path, data=data, method="POST"), timeout=10
                )
            assert refused.value.code == code and "error" in json.loads(refused.value.read())
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0 and "2 certificates issued, 1 refused" in out, out + err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["enroll", "user", AOR], "give --ca-key FILE"),
        (["enroll", "user", AOR, "--server", "http://127.0.0.1:9"], "--server needs --token"),
        (["enroll", "node", "--ca-key", "k", "--server", "http://127.0.0.1:9"], "give --ca-key FILE"),
        (["enroll", "token", "--ca-dir", "nowhere"], "a SIP-URI (a user) or --node"),
        (["enroll", "token", AOR, "--ca-dir", "nowhere"], "no ca.key there"),
        (["enroll", "serve", "nowhere", "--listen", "127.0.0.1"], "needs a port"),
    ],
)
def test_enroll_usage_errors_are_one_line_exit_2(args: list[str], fragment: str) -> None:
    done = run(*args)
    assert done.returncode == 2 and fragment in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_an_unreachable_service_is_one_line_exit_1(tmp_path: Path) -> None:
    from conftest import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    done = run("enroll", "user", AOR, "--server", url, "--token", "t", "--data-dir", str(tmp_path))
    assert done.returncode == 1 and "cannot reach the enrollment service" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert os.path.isdir(tmp_path)
