"""bench/peer.py's worker layout (``--processes N``) keeps its rules: peers started in worker processes form
one ring that the bench reads back across the processes, a command reaches every worker, counters and CPU
come back, and every worker ends when the bench closes the layout."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import peer as bench_peer


async def test_peers_in_two_worker_processes_form_one_ring_and_every_worker_ends(tmp_path: Path) -> None:
    layout = bench_peer.Workers(2, tmp_path / "workers")
    await layout.start()
    try:
        join = None
        for i in range(3):
            _sip, overlay = await layout.on(
                i, "start", index=i, join=join, data_dir=str(tmp_path / f"peer{i}"), maintenance=0.2
            )
            join = join or overlay
        await bench_peer.ring_of(layout, 3, timeout=30)
        # peer i runs in worker i mod 2: peers 0 and 2 in one process, peer 1 in the other
        assert sorted(len(part) for part in await layout.each("ring")) == [1, 2]
        await layout.each("set", cache_ttl=5.0, home_routing=False)
        counters = await bench_peer.counters_of(layout)
        assert counters["sip_received"] == 0 and counters["lookups"] == 0
        assert await bench_peer.cpu_seconds(layout) > 0
    finally:
        await layout.close()
    assert [proc.returncode for proc in layout.procs] == [0, 0]


def test_bad_arguments_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["bench/peer.py", "--processes", "0"])
    assert bench_peer.main() == 2
