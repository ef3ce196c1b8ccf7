"""The conditions a benchmark ran under, printed with every table (issue 19's rules).

Figures from a shared or another machine are not comparable without them: the date, the load average,
the CPU model and the steal time *over the run* (from /proc/stat, so a VM whose host is busy shows it).
``Conditions()`` snapshots the counters when the run starts; ``str(conditions)`` reports since then.
"""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (``platform.processor()`` is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_ticks() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs; (0, 0) where /proc/stat is missing."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return 0, 0
    values = [int(v) for v in fields]
    steal = values[7] if len(values) > 7 else 0
    # guest time is already counted in user/nice: the first 8 fields are the whole
    return steal, sum(values[:8])


class Conditions:
    """Snapshot at the start of a run; ``str()`` gives one line for the table's footer."""

    def __init__(self) -> None:
        self.steal0, self.total0 = _cpu_ticks()

    def steal_percent(self) -> float:
        steal, total = _cpu_ticks()
        elapsed = total - self.total0
        return 100.0 * (steal - self.steal0) / elapsed if elapsed > 0 else 0.0

    def __str__(self) -> str:
        load = "/".join(f"{x:.2f}" for x in os.getloadavg())
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        return (
            f"{now}; load average {load} (1/5/15 min); {cpu_model()}, {os.cpu_count()} CPUs; "
            f"steal {self.steal_percent():.1f} % over the run; "
            f"{platform.python_implementation()} {platform.python_version()}"
        )
