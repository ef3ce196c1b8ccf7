"""Exit codes follow docs/cli.md for every command: a usage error (bad flag, bad value, bad config file) is
one line on standard error and status 2, before anything runs or is printed on standard output; a runtime
failure is status 1. Walks every sub-command the parser has, so a new one is covered as it is added."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2psip.cli import build_parser, main


def subcommands() -> list[str]:
    (action,) = [a for a in build_parser()._actions if a.dest == "command"]
    return sorted(action.choices)  # type: ignore[arg-type]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_usage_error(code: int, out: str, err: str) -> None:
    assert code == 2, (code, out, err)
    assert out == "" and len(err.strip().splitlines()) == 1 and err.startswith("p2psip: error: "), err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", subcommands())
def test_every_command_refuses_an_unknown_flag(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    one_usage_error(*run(capsys, command, "--no-such-flag"))


@pytest.fixture
def bad_configs(tmp_path: Path) -> dict[str, Path]:
    files = {
        "latin1": "# caf\xe9 on the corner\ndns = false\n".encode("latin-1"),
        "random": bytes(range(128, 256)) * 4,
        "bom": b"\xef\xbb\xbfdns = false\n",
        "syntax": b"dns = \n",
        "value": b"dns = 1\n",
    }
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / f"{name}.toml"
        paths[name].write_bytes(data)
    return paths


BAD_VALUES = {
    "call": [["bob"], ["sip:bob@p2p.example", "--via", "nonsense"], ["sip:bob@x", "--timeout", "0"]],
    "enroll": [
        [],
        ["user", "sip:a@b"],
        ["node", "--ca-key", "/nonexistent/ca.key"],
        ["node", "--ca-key", "x", "--days", "0"],
    ],
    "demo": [["--peers", "1"]],
    "lookup": [["bob"], ["sip:"]],
    "message": [["bob", "hi"], ["sip:bob@x", "hi", "--via", "nonsense"]],
    "user": [[], ["add", "bob"]],
    "proxy": [["--listen", "nonsense:port"], ["--recurse", "--stateless"], ["--workers", "65"]],
    "register": [["bob", "--via", "127.0.0.1:9"], ["sip:bob@x", "--via", "127.0.0.1:9", "--expires", "-1"]],
    "start": [["--listen", "udp:nowhere"], ["--join", "127.0.0.1:99999"]],
    "status": [["--data-dir"]],
}


def test_the_bad_value_table_covers_every_command() -> None:
    assert set(BAD_VALUES) >= set(subcommands()), "add a bad value for the new command here"


@pytest.mark.parametrize(("command", "args"), [(c, a) for c, cases in BAD_VALUES.items() for a in cases])
def test_a_bad_value_is_a_usage_error(
    command: str, args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    if command not in subcommands():
        pytest.fail(f"no sub-command {command!r} any more: update BAD_VALUES")
    one_usage_error(*run(capsys, command, *args))


@pytest.mark.parametrize("kind", ["latin1", "random", "bom", "syntax", "value"])
@pytest.mark.parametrize("command", [["start"], ["status"], ["lookup", "sip:bob@p2p.example"]])
def test_a_bad_config_file_is_one_line_and_exit_2(
    command: list[str], kind: str, bad_configs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, *command, "--config", str(bad_configs[kind]))
    one_usage_error(code, out, err)
    if kind in ("latin1", "random"):
        assert "is not UTF-8 text" in err
    if kind == "bom":
        assert "byte order mark" in err


def test_a_runtime_failure_is_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["status"], ["lookup", "sip:bob@p2p.example"]):
        code, out, err = run(capsys, *argv, "--data-dir", str(tmp_path))
        assert code == 1 and out == "" and err.startswith("p2psip: error: no peer is running"), err
        assert "--data-dir" in err  # it names the flag that would find the peer


def test_the_join_hint_names_the_overlay_port(capsys: pytest.CaptureFixture[str]) -> None:
    """--join takes a peer's overlay address: its examples show the overlay port, not SIP's 5060."""
    for bad in ("127.0.0.1", "127.0.0.1:x", "::1"):
        code, out, err = run(capsys, "start", "--join", bad)
        one_usage_error(code, out, err)
        assert ":7060" in err and "5060" not in err, err
