"""Fixtures of the interop tests: the third-party tools (skipped on a laptop without them, failing under
CI=true), a work directory per test, and ports. Processes are started inside the tests with context
managers from ``sipp``/``kamailio``, which always end them by PID."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import require_tool


@pytest.fixture
def sipp_tool() -> str:
    return require_tool("sipp")


@pytest.fixture
def kamailio_tool() -> str:
    return require_tool("kamailio")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
