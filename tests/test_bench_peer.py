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


async def test_stalls_record_a_long_loop_callback_and_the_collector_passes_then_let_go() -> None:
    import asyncio
    import gc
    import time

    def hold_the_loop() -> None:
        end = time.perf_counter() + 2 * bench_peer.STALL_S
        while time.perf_counter() < end:
            pass
        gc.collect(0)

    run_before, callbacks_before = asyncio.events.Handle._run, list(gc.callbacks)
    stalls = bench_peer.Stalls(["entry"])
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.call_soon(hold_the_loop)
    loop.call_soon(done.set)
    await asyncio.wait_for(done.wait(), 5)
    stalls.close()
    names = [what for _start, _end, what in stalls.events]
    assert "gc gen0" in names
    held = [(start, end) for start, end, what in stalls.events if what.endswith("hold_the_loop")]
    assert len(held) == 1 and held[0][1] - held[0][0] >= 2 * bench_peer.STALL_S
    assert asyncio.events.Handle._run is run_before and gc.callbacks == callbacks_before


def test_the_slowest_calls_are_named_with_their_largest_stage_and_what_held_their_loops() -> None:
    def call(start: float, callee_ms: float) -> dict[str, float]:
        marks = [a for _n, a, _b in bench_peer.CALL_STAGES] + ["entry out 180"]
        seen = {mark: start + i * 0.0001 for i, mark in enumerate(marks)}
        for mark in marks[marks.index("home in 180") :]:
            seen[mark] += callee_ms / 1000
        return seen

    calls = {f"c{i}": call(float(i), 5.0 if i == 7 else 0.1) for i in range(10)}
    # the entry peer ran 0.1 ms of CPU in the 0.1 ms of each of its stages; the home peer none in 0.1 ms
    cpu = {cid: {mark: (0.0 if mark.startswith("home") else at) for mark, at in seen.items()}
           for cid, seen in calls.items()}  # fmt: skip
    stall = {"roles": ["home"], "stalls": [(7.0001, 7.004, "gc gen1"), (3.0, 3.001, "Node._read_burst")]}
    client = [1.0] * 7 + [9.0] + [1.0] * 2
    lines = bench_peer.tail_lines(calls, cpu, [stall], client, share=0.1)
    assert lines[1].startswith("    9.00 ms: callee: INVITE out -> 180 in (sipp) 5.10")
    assert "not running 0.20" in lines[1] and "home: gc gen1 3.90" in lines[1]
    assert "Node._read_burst" not in lines[1]
    assert lines[2] == "  1 of the 1 overlapped a stall or collector pass of 1 ms or more"
    assert any(line.strip().startswith("home: gc gen1") for line in lines[3:])
