"""The README stays true: its test command is the one CI runs, and its Python example is the tested file.

docs/examples/scripting_call.py itself is run against a real sipp UAS by tests/test_sipapi_layer1.py, so
checking the README's block against it proves the README's example runs.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_two_commands_install_and_run() -> None:
    commands = [block.strip() for block in _blocks("sh")[:2]]
    assert commands[0] == "python3 -m pip install -e . && p2psip demo"
    assert commands[1].startswith("python3 -m pip install -e '.[test]'")


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    test_command = _blocks("sh")[1].strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_python_example_is_the_tested_example_file() -> None:
    (block,) = _blocks("python")
    assert block == (ROOT / "docs" / "examples" / "scripting_call.py").read_text()
    # it says it can call an AOR through a peer: it shows how to name the peer
    assert "outbound=via" in block and "through a peer" in block


def test_documented_peer_flags_exist() -> None:
    from p2psip.cli import build_parser

    parser = build_parser()
    for line in _blocks("sh")[2].strip().splitlines():
        argv = line.split()[1:]
        assert argv[0] == "start"
        parser.parse_args(argv)  # raises on an unknown flag


def test_status_and_lookup_name_the_data_dir_the_peers_were_started_with() -> None:
    """A bare `p2psip status` asks the default data dir, where the README's peers do not run."""
    started = re.findall(r"--data-dir (\S+)", _blocks("sh")[2])
    for command in ("p2psip status", "p2psip lookup"):
        (mention,) = re.findall(rf"`{command}[^`]*`", README.replace("\n", " "))
        assert "--data-dir" in mention and mention.split("--data-dir ")[1].split()[0].rstrip("`") in started
