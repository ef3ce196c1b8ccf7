"""The compiled build's recipe (tools/build_compiled.py) names modules and tests that exist, and a normal
run imports the pure-Python modules: no ``.so`` in the source tree shadows them. The build itself and
the tests against it run in CI's extra step (.ci/run)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import build_compiled  # noqa: E402


def test_the_recipe_names_existing_modules_and_tests() -> None:
    assert all((ROOT / path).is_file() for path in build_compiled.MODULES)
    assert all((ROOT / path).is_file() for path in build_compiled.TESTS)
    names = build_compiled.module_names()
    assert "p2psip.message" in names and "p2psip.message.parser" in names and "p2psip.transaction" in names


def test_the_source_tree_holds_no_compiled_module() -> None:
    packages = [ROOT / package for package in build_compiled.PACKAGES]
    stray = [p for package in packages for p in package.rglob("*.so") if "node_modules" not in p.parts]
    assert stray == []
    if os.environ.get("P2PSIP_COMPILED") != "1":
        assert build_compiled.not_compiled() == build_compiled.module_names()  # this run is pure Python
