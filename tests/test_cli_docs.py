"""docs/cli.md is true to the command: its table names exactly the sub-commands there are, each synopsis
names exactly the flags its sub-command takes, the config file example loads, the error it quotes is the
one printed, and the `p2psip call` examples (text and JSON) are what a real call prints, numbers aside."""

from __future__ import annotations

import json
import re
from pathlib import Path

from test_cli_call_audio import Bob, run_cli

from p2psip.cli import build_parser
from p2psip.config import load_config
from p2psip.media import ToneSource
from p2psip.media.sources import write_wav

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "cli.md").read_text()
DOC_ADDRESS = "127.0.0.1:5070"  # the address the examples call


def blocks(language: str) -> list[str]:
    """The fenced blocks whose opening fence names ``language`` ("" for a bare fence)."""
    found: list[str] = []
    current: list[str] | None = None
    kind = ""
    for line in DOC.splitlines():
        if line.startswith("```"):
            if current is None:
                current, kind = [], line[3:].strip()
            else:
                if kind == language:
                    found.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    return found


def subcommands() -> dict[str, object]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if a.dest == "command"]
    return dict(action.choices)  # type: ignore[arg-type]


def test_the_table_names_every_subcommand() -> None:
    table = set(re.findall(r"^\| `p2psip ([a-z]+)", DOC, flags=re.M))
    assert table - {"proxy"} == set(subcommands()) - {"proxy"}
    assert "proxy" in table and "proxy" in subcommands()  # its flags are documented in stack.md


def test_each_synopsis_names_exactly_its_flags() -> None:
    synopses: dict[str, str] = {}
    for block in blocks(""):
        for entry in re.split(r"\n(?=p2psip )", block.strip()):
            if entry.startswith("p2psip "):
                words = entry.split()
                synopses[" ".join(words[1:3]) if words[1] in ("user", "enroll") else words[1]] = entry
    assert set(synopses) == {
        "start", "status", "lookup", "register", "call", "message", "user add", "user key",
        "enroll init", "enroll user", "enroll node", "enroll token", "enroll serve",
    }  # fmt: skip
    for name, synopsis in synopses.items():
        parser = subcommands()[name.split()[0]]
        if " " in name:  # "p2psip user add ...": the flags are the action's
            dest = name.split()[0] + "_command"
            (action,) = [a for a in parser._actions if a.dest == dest]  # type: ignore[attr-defined]
            parser = action.choices[name.split()[1]]
        documented = set(re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", synopsis))
        actions = [a for a in parser._actions if a.option_strings and a.dest != "help"]  # type: ignore[attr-defined]
        for action in actions:
            assert documented & set(action.option_strings), f"{name}: {action.option_strings} undocumented"
        known = {flag for action in actions for flag in action.option_strings}
        assert documented <= known, f"{name}: documented but unknown: {documented - known}"


def test_the_config_example_loads(tmp_path: Path) -> None:
    (toml,) = blocks("toml")
    path = tmp_path / "peer.toml"
    path.write_text(toml)
    config = load_config(path)
    assert config.data_dir == Path("/var/lib/p2psip") and config.replicas == 3
    assert config.join is not None and config.join.port == 7061


async def test_the_quoted_config_error_is_the_printed_one(tmp_path: Path) -> None:
    (quoted,) = re.findall(r"`(p2psip: error: config: [^`]*)`", DOC)
    (tmp_path / "peer.toml").write_text("dns = 1\n")
    code, _out, err = await run_cli("start", "--config", str(tmp_path / "peer.toml"))
    assert code == 2 and err.strip() == quoted


def numbers_masked(text: str) -> list[str]:
    return [re.sub(r"\d+(\.\d+)?", "N", line) for line in text.strip().splitlines()]


async def test_the_call_examples_are_what_a_call_prints(tmp_path: Path) -> None:
    (example,) = [b for b in blocks("") if b.startswith("$ p2psip call")]
    command, *shown = example.strip().splitlines()
    (shown_json,) = blocks("json")
    write_wav(tmp_path / "hello.wav", ToneSource(1000, duration=1.5))
    bob = await Bob.start(play=ToneSource(440))
    address = f"{bob.host}:{bob.port}"
    args = [
        str(tmp_path / arg) if arg.endswith(".wav") else arg.replace(DOC_ADDRESS, address)
        for arg in command.split()[2:]
    ]
    try:
        code, out, err = await run_cli(*args)
        assert code == 0, out + err
        assert numbers_masked(out) == numbers_masked("\n".join(shown).replace(DOC_ADDRESS, address))
        code, out, err = await run_cli(*args, "--json")
        assert code == 0, out + err
        printed, documented = json.loads(out), json.loads(shown_json)
        assert list(printed) == list(documented)
        assert {k: type(v) for k, v in printed.items()} == {k: type(v) for k, v in documented.items()}
        assert printed["responses"] == documented["responses"] and printed["codec"] == documented["codec"]
        await bob.until_ended(2)
    finally:
        await bob.close()
