"""What the sipp/Kamailio benchmarks share besides their conditions (bench/conditions.py): the import path,
our process's CPU time and the check for sipp and Kamailio, written once for bench/memory.py, bench/registrar.py and
bench/register_cpu.py.

Importing this module puts the repository (``p2psip``, ``overlay``), ``tests/`` (the interop drivers for
sipp and Kamailio, ``conftest.free_port``) and ``bench/`` first on ``sys.path``: a bench runs as
``python3 bench/NAME.py`` from a checkout and must measure that checkout's code, not an installed one.
"""

from __future__ import annotations

import resource
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT / "bench", ROOT / "tests", ROOT):
    if str(_path) in sys.path:
        sys.path.remove(str(_path))
    sys.path.insert(0, str(_path))
sys.path.insert(0, str(ROOT / "tools"))
from build_compiled import not_compiled, use_if_asked  # noqa: E402

COMPILED = use_if_asked()
"""``--compiled`` among a bench's arguments: this process (its peers) runs the mypyc build of
tools/build_compiled.py (built first if needed); the bench must accept the switch."""
if COMPILED and (_pure := not_compiled()):  # a "compiled" figure measured on .py files would be a lie
    raise SystemExit(f"bench: --compiled, yet {', '.join(_pure)} import from .py files")
sys.path.remove(str(ROOT / "tools"))


def own_cpu() -> float:
    """User + system CPU seconds of this process so far (where our peers run in-process)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def missing_tool(bench: str, tools: tuple[str, ...] = ("sipp", "kamailio")) -> bool:
    """Whether one of ``tools`` is not installed; if so says which in one line on stderr (exit 2 then)."""
    for tool in tools:
        if shutil.which(tool) is None:
            print(f"bench/{bench}.py: {tool} is not installed", file=sys.stderr)
            return True
    return False
