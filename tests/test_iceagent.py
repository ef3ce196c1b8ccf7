"""The aioice internals we use (p2psip.media.iceagent) are still there in the installed aioice, and its
version is in the range pyproject pins: an aioice release that moves them fails here, by name, instead
of a call failing half-way."""

from __future__ import annotations

import re
from pathlib import Path

from p2psip.media import iceagent


def test_the_installed_aioice_has_every_internal_we_use() -> None:
    assert iceagent.check() == []


def test_pyproject_pins_aioice_to_the_tested_range() -> None:
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    pinned = re.search(r'"aioice([^"]*)"', pyproject)
    assert pinned is not None
    assert pinned.group(1) == ",".join(iceagent.TESTED)


def test_the_range_check_reads_versions() -> None:
    assert iceagent._in_range("0.13.0") and iceagent._in_range("0.10.3")
    assert not iceagent._in_range("0.14.0") and not iceagent._in_range("0.9.1")


def test_no_other_module_touches_aioice_internals() -> None:
    """Every access to a private attribute of an aioice object stays in iceagent."""
    root = Path(__file__).resolve().parents[1] / "p2psip"
    internals = "|".join(re.escape(name) for name in iceagent._INTERNALS)
    pattern = re.compile(rf"\.({internals}|_nominated|_protocols)\b")
    offenders = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if path.name != "iceagent.py" and pattern.search(path.read_text())
    ]
    assert offenders == []
