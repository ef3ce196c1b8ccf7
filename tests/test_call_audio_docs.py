"""The voicemail example of docs/media.md (docs/examples/media_voicemail.py, sipapi's source-code API) runs
as its own process: our UserAgent calls it, hears the greeting, speaks a 1 kHz tone, presses '#', and the
voicemail hangs up and leaves a WAV file holding the tone. A second caller hangs up during the greeting
and leaves no message. A phone subscribed to its message-summary (RFC 3842) hears "no messages", then
"1 voice message" once a caller left one, and "no messages" again once the file is deleted."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from queue import Empty, Queue

import pytest
from conftest import free_port

from p2psip import mwi
from p2psip.media import MemorySink, ToneSource, dominant_frequency
from p2psip.media.sources import read_wav, write_wav
from p2psip.stack import Stack
from p2psip.subscription import SubState
from p2psip.useragent import UserAgent

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "media_voicemail.py"
CANDIDATES = [440, 700, 1000, 1500]


class Voicemail:
    """The example in a child process; its output lines are read by a thread into a queue."""

    def __init__(self, port: int, greeting: Path, folder: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLE), str(port), str(greeting), str(folder)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: Queue[str] = Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    async def line(self, timeout: float = 30.0) -> str:
        loop = asyncio.get_running_loop()
        try:
            line = await loop.run_in_executor(None, lambda: self.lines.get(timeout=timeout))
        except Empty:
            raise AssertionError(f"no output from the voicemail; so far: {self.seen}") from None
        self.seen.append(line)
        return line

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@pytest.fixture
def voicemail(tmp_path: Path) -> Iterator[tuple[Voicemail, int, Path]]:
    port = free_port()
    folder = tmp_path / "messages"
    folder.mkdir()
    box = Voicemail(port, write_wav(tmp_path / "greeting.wav", ToneSource(440, duration=0.6)), folder)
    try:
        yield box, port, folder
    finally:
        box.stop()


async def test_the_voicemail_example_records_a_message(voicemail: tuple[Voicemail, int, Path]) -> None:
    box, port, folder = voicemail
    assert await box.line() == "voicemail ready"
    stack = await Stack.start(["udp:127.0.0.1:0"])
    try:
        caller = UserAgent(stack, "sip:carol@127.0.0.1")
        heard = MemorySink()
        call = await caller.call(f"sip:voicemail@127.0.0.1:{port}", record=heard, timeout=30)
        assert call.media is not None
        session = call.media.session
        # the greeting (0.6 s = 30 packets) and the beep (10): then speak
        await asyncio.wait_for(_until(lambda: session.stats.packets_received >= 40), 30)
        await asyncio.wait_for(session.play(ToneSource(1000, duration=1.0)), 30)
        await call.send_dtmf("#")
        assert await call.wait_ended(30) == "bye received"  # the voicemail hung up on the key
        line = await box.line()
        match = re.fullmatch(r"message (\S+)", line)
        assert match, line
        path = Path(match.group(1))
        assert path.parent == folder / "voicemail" and path.name.endswith("-from-carol.wav")  # its mailbox
        assert dominant_frequency(bytes(heard.pcm), CANDIDATES) == 440  # we heard the greeting
        message = read_wav(path)
        assert dominant_frequency(message, CANDIDATES) == 1000  # it recorded what we said
        assert 0.95 <= len(message) / 16000 <= 2.5, len(message) / 16000  # the 1 s tone (5%), the key

        # a caller who hangs up during the greeting leaves no message, and the voicemail goes on
        early = await caller.call(f"sip:voicemail@127.0.0.1:{port}", record=MemorySink(), timeout=30)
        assert (await early.bye()).status == 200
        third = await caller.call(f"sip:voicemail@127.0.0.1:{port}", record=MemorySink(), timeout=30)
        assert third.media is not None
        await asyncio.wait_for(_until(lambda: third.media.session.stats.packets_received >= 40), 30)
        await third.send_dtmf("1")
        assert await third.wait_ended(30) == "bye received"
        second = await box.line()
        assert second.startswith("message ") and second != line
        assert sorted((folder / "voicemail").iterdir()) == sorted([path, Path(second.split()[1])])  # not 2
        await caller.close()
    finally:
        await stack.close()
    assert box.proc.poll() is None  # still serving


async def _until(condition: object) -> None:
    assert callable(condition)
    while not condition():
        await asyncio.sleep(0.02)


def test_media_md_shows_the_example_verbatim() -> None:
    text = (ROOT / "docs" / "media.md").read_text()
    assert EXAMPLE.read_text().strip("\n") in text
    assert "(examples/media_voicemail.py)" in text


def check_summary(request: object) -> None:
    mwi.parse(request.body)  # type: ignore[attr-defined]


async def test_the_voicemail_example_tells_subscribers_when_messages_wait(
    voicemail: tuple[Voicemail, int, Path],
) -> None:
    box, port, folder = voicemail
    assert await box.line() == "voicemail ready"
    stacks = [await Stack.start(["udp:127.0.0.1:0"]) for _ in range(2)]
    try:
        phone = UserAgent(stacks[0], "sip:jones@127.0.0.1")
        sub = await phone.subscribe(
            f"sip:voicemail@127.0.0.1:{port}", mwi.EVENT, accept=mwi.CONTENT_TYPE, body_check=check_summary
        )
        first = await sub.next(10)
        assert first.state.state is SubState.ACTIVE and not mwi.parse(first.body).waiting

        caller = UserAgent(stacks[1], "sip:carol@127.0.0.1")
        call = await caller.call(f"sip:voicemail@127.0.0.1:{port}", record=MemorySink(), timeout=30)
        assert call.media is not None
        session = call.media.session
        await asyncio.wait_for(_until(lambda: session.stats.packets_received >= 40), 30)
        await asyncio.wait_for(session.play(ToneSource(1000, duration=0.5)), 30)
        await call.send_dtmf("#")
        assert await call.wait_ended(30) == "bye received"
        line = await box.line()
        assert line.startswith("message ")

        note = await sub.next(10)
        summary = mwi.parse(note.body)
        assert summary.waiting and summary.counts["voice-message"] == (1, 0, 0, 0)
        assert note.request.get("Content-Type") == mwi.CONTENT_TYPE

        # the message is deleted: the phone hears "no" (the example looks at its folder every second)
        Path(line.split()[1]).unlink()
        gone = mwi.parse((await sub.next(10)).body)
        assert not gone.waiting and gone.counts["voice-message"] == (0, 0, 0, 0)
        assert not list(folder.rglob("*.wav"))
        await sub.unsubscribe()
        await caller.close()
        await phone.close()
    finally:
        for stack in stacks:
            await stack.close()
