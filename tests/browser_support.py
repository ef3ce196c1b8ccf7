"""Headless Chromium for the browser tests (Debian ``chromium`` + ``chromium-driver``, driven by selenium).

Selenium is synchronous and the peers under test run on the test's event loop, so every browser call goes
through :meth:`Browser.call` (a worker thread): the loop keeps serving SIP and HTTP while the browser waits.
Without chromium here the tests skip, except under ``CI=true``, where a missing browser is a failure.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
WEB = ROOT / "p2psip" / "web"


def chromium_paths() -> tuple[str, str]:
    """(browser, driver) paths, or a skip (a failure under CI) when either is missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None
    )
    missing = [n for n, p in (("chromium", browser), ("chromium-driver", driver)) if p is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    if not (WEB / "dist" / "jssip.js").is_file():
        missing.append("the npm packages (npm install --prefix p2psip/web)")
    if missing:
        message = f"browser tests need {', '.join(missing)}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    assert browser is not None and driver is not None
    return browser, driver


class Browser:
    """One headless Chromium with fake microphone and camera."""

    def __init__(self, *, accept_self_signed: bool = False) -> None:
        """``accept_self_signed``: trust any certificate (the peers' made-up ones for https:/wss: tests)."""
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        browser, driver = chromium_paths()
        options = webdriver.ChromeOptions()
        options.binary_location = browser
        for arg in (
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            "--autoplay-policy=no-user-gesture-required",
            "--window-size=1200,1100",
            "--no-first-run",
            "--disable-extensions",
        ):
            options.add_argument(arg)
        if accept_self_signed:
            options.add_argument("--ignore-certificate-errors")
        self.driver = webdriver.Chrome(service=Service(driver), options=options)
        self.driver.set_page_load_timeout(20)
        self.driver.set_script_timeout(20)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def get(self, url: str) -> None:
        await self.call(self.driver.get, url)

    async def js(self, script: str, *args: Any) -> Any:
        return await self.call(self.driver.execute_script, script, *args)

    async def js_async(self, script: str, *args: Any) -> Any:
        return await self.call(self.driver.execute_async_script, script, *args)

    async def wait_for(self, script: str, timeout: float = 15.0, what: str = "") -> Any:
        """Poll ``script`` (a JS expression) until it is truthy; fail with ``what`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        value: Any = None
        while time.monotonic() < deadline:
            value = await self.js(f"return ({script});")
            if value:
                return value
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out after {timeout} s waiting for {what or script} (last: {value!r})")

    async def click(self, element_id: str) -> None:
        await self.js(f"document.getElementById({element_id!r}).click();")

    async def type(self, element_id: str, text: str) -> None:
        await self.js("document.getElementById(arguments[0]).value = arguments[1];", element_id, text)

    async def screenshot(self, name: str, tmp: Path | None = None) -> Path:
        """Take a screenshot (a non-empty PNG, checked). It replaces ``docs/NAME`` only when
        ``P2PSIP_SCREENSHOTS=1``: a test run must not leave every worktree with modified images."""
        refresh = os.environ.get("P2PSIP_SCREENSHOTS") == "1"
        path = DOCS / name if refresh else Path(tempfile.mkdtemp(prefix="p2psip-shot-")) / name
        await self.call(self.driver.save_screenshot, str(path))
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        return path

    async def quit(self) -> None:
        await self.call(self.driver.quit)
