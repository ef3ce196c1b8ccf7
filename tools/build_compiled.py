"""The optional compiled build: the hot sans-IO cores compiled with mypyc, beside the pure-Python source.

One command::

    python3 tools/build_compiled.py            # build into build/compiled (skipped when up to date)
    python3 tools/build_compiled.py --force    # build again
    PYTHONSAFEPATH=1 PYTHONPATH=build/compiled python3 -m p2psip.cli proxy ...   # run it

Pure Python stays the default and is what the README's test command tests. This copies the packages
(``p2psip``, ``overlay``, ``sipapi``) into a directory of their own and compiles :data:`MODULES` there, so
no ``.so`` file ever lands in the source tree (one there would shadow its ``.py`` for every normal run).
Put that directory first on the path to use it: ``PYTHONPATH=build/compiled``, with ``PYTHONSAFEPATH=1``
so that Python does not put the current directory (a checkout holding the pure modules) before it.
What is compiled is what a forwarded INVITE goes through (docs/benchmarks.md, "The compiled build"):
the message model and parser, URIs, the transaction and timer cores, the proxy core, the stack and
the transport; the media path (RTP, RTCP, the jitter buffer, the session: bench/media.py); and a
registration's path through the DHT (the registrar's plan, the overlay's wire codec and sans-IO cores:
bench/register_cpu.py); the rest is imported from the copied ``.py`` files as usual.

Needs gcc, the Python headers and ``pip install -e '.[compiled]'`` (mypy with mypyc).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.machinery
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "build" / "compiled"
PACKAGES = ("p2psip", "overlay", "sipapi")

# The modules compiled, by path from the repository root: the forwarded-INVITE path
# (bench/proxy_path.py replays it), leaves first.
MODULES = (
    "p2psip/message/__init__.py",
    "p2psip/message/authheaders.py",
    "p2psip/message/framing.py",
    "p2psip/message/ids.py",
    "p2psip/message/limits.py",
    "p2psip/message/model.py",
    "p2psip/message/names.py",
    "p2psip/message/parser.py",
    "p2psip/message/values.py",
    "p2psip/uri.py",
    "p2psip/address.py",
    "p2psip/timers.py",
    "p2psip/transaction.py",
    "p2psip/proxy.py",
    "p2psip/handoff.py",
    "p2psip/stack.py",
    "p2psip/transport.py",
    # the media path (issue 19, target 8): the codecs' frame memory, the sources and sinks a tick reads and
    # writes (each left interpreted cost a Python frame per call and tick: -14 % instructions per call-tick),
    # G.711's wrappers around audioop (the decoder ran as an interpreted frame per received packet: -6.9 %),
    # RTP, RTCP statistics, the jitter buffer, the session's tick and receive path
    "p2psip/media/g711.py",
    "p2psip/media/codecs.py",
    "p2psip/media/sources.py",
    "p2psip/media/rtp.py",
    "p2psip/media/rtcp.py",
    "p2psip/media/jitter.py",
    "p2psip/media/session.py",
    # a registration through the DHT (issue 19, target 3): the registrar's plan and the location cache, and
    # the overlay's sans-IO cores every overlay datagram goes through: the wire codec, the Chord routing
    # core, the storage protocol, the entry store (with its SQLite subclass), the quorum read, the key
    # types and errors they share. overlay.node (the asyncio adapter) stays Python.
    "p2psip/registrar.py",
    "p2psip/location.py",
    "overlay/errors.py",
    "overlay/ids.py",
    "overlay/wire.py",
    "overlay/identity.py",
    "overlay/storage.py",
    "overlay/storage_core.py",
    "overlay/store.py",
    "overlay/chord.py",
    "overlay/reads.py",
)

# What CI runs against the compiled build (.ci/run): the core unit tests of those modules, the torture
# corpus and the proxy interop tests (sipp). Chosen to take about three minutes with the build.
TESTS = (
    "tests/test_message.py",
    "tests/test_message_torture.py",
    "tests/test_uri.py",
    "tests/test_address.py",
    "tests/test_transaction.py",
    "tests/test_transaction_layer.py",
    "tests/test_transaction_sim.py",
    "tests/test_proxy.py",
    "tests/test_stack.py",
    "tests/test_stack_examples.py",
    "tests/test_handoff.py",
    "tests/test_transport.py",
    "tests/interop/test_proxy_sipp.py",
    # the media path (test_media_pacing drives the ticker with fake sessions, which compiled code refuses)
    "tests/test_media_jitter.py",
    "tests/test_media_sources.py",
    "tests/test_media_g711.py",
    "tests/test_media_rtp.py",
    "tests/test_media_session.py",
    # the registrar and the overlay's cores (test_sim and the node tests are left to the pure run: 30 s and
    # more), and test_overlay_liars: a ring of 5 real nodes on loopback, their cores compiled
    "tests/test_registrar.py",
    "tests/test_wire.py",
    "tests/test_identity.py",
    "tests/test_storage.py",
    "tests/test_storage_core.py",
    "tests/test_store.py",
    "tests/test_chord.py",
    "tests/test_chord_fuzz.py",
    "tests/test_reads.py",
    "tests/test_overlay_liars.py",
)

_STAMP = "BUILT-FROM"


def module_names() -> list[str]:
    """The dotted names of :data:`MODULES` (``p2psip.message`` for its ``__init__.py``)."""
    names = []
    for path in MODULES:
        parts = Path(path).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _digest() -> str:
    """What a build depends on: every source file copied (a compiled module binds the others' types),
    the module list and the mypyc version."""
    import mypy.version

    h = hashlib.sha256(f"{sys.version}\n{mypy.version.__version__}\n{MODULES}\n".encode())
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "node_modules" not in path.parts:
                h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def up_to_date(out: Path = DEFAULT_OUT) -> bool:
    try:
        return (out / _STAMP).read_text().strip() == _digest()
    except OSError:
        return False


def _check_toolchain() -> None:
    include = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not include.exists():
        raise SystemExit(f"build_compiled: {include} is missing: install the Python headers (python3-dev)")
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        raise SystemExit("build_compiled: no C compiler: install gcc")
    try:
        import mypyc  # noqa: F401
    except ImportError:
        raise SystemExit("build_compiled: mypyc is missing: pip install -e '.[compiled]'") from None


def _mypy_ini() -> str:
    """pyproject.toml's ``[tool.mypy]`` as a mypy.ini (a copied pyproject.toml would also make setuptools,
    which mypyc drives, read the project's packaging settings)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]

    def section(name: str, settings: dict[str, object]) -> list[str]:
        lines = [f"[{name}]"]
        for key, value in settings.items():
            if key not in ("module", "files", "overrides"):
                lines.append(f"{key} = {value}")
        return lines

    lines = section("mypy", config)
    for override in config.get("overrides", []):
        modules = override["module"]
        lines += section("mypy-" + ",".join(modules if isinstance(modules, list) else [modules]), override)
    return "\n".join(lines) + "\n"


def build(out: Path = DEFAULT_OUT, *, force: bool = False, quiet: bool = False) -> Path:
    """Copy the packages to ``out`` and compile :data:`MODULES` there (skipped when ``out`` already holds
    a build of the same sources). Returns ``out``; raises SystemExit with one line when the build fails."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with (out.parent / f".{out.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time: a bench and its children may all ask
        if force or not up_to_date(out):
            _build(out, quiet)
    return out


def _build(out: Path, quiet: bool) -> None:
    _check_toolchain()
    started = time.monotonic()
    digest = _digest()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "node_modules")
    for package in PACKAGES:
        shutil.copytree(ROOT / package, out / package, ignore=ignore)
    modules = ROOT / "p2psip" / "web" / "node_modules"
    if modules.exists():  # the browser pages' libraries, if installed: linked, not copied
        (out / "p2psip" / "web" / "node_modules").symlink_to(modules)
    (out / "mypy.ini").write_text(_mypy_ini())  # the project's mypy settings, which mypyc checks with
    env = dict(os.environ, PYTHONSAFEPATH="1")
    env.pop("PYTHONPATH", None)
    command = [sys.executable, "-m", "mypyc", *MODULES]
    result = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
        raise SystemExit(f"build_compiled: mypyc failed (exit {result.returncode}); see above")
    shutil.rmtree(out / "build", ignore_errors=True)  # mypyc's C files and objects
    missing = [name for name in module_names() if not _compiled_file(out, name)]
    if missing:
        raise SystemExit(f"build_compiled: no extension module built for {', '.join(missing)}")
    (out / _STAMP).write_text(digest + "\n")
    if not quiet:
        took = time.monotonic() - started
        print(f"build_compiled: {len(MODULES)} modules compiled into {out} in {took:.0f} s", file=sys.stderr)


def _compiled_file(out: Path, name: str) -> Path | None:
    base = out.joinpath(*name.split("."))
    candidates = [base.parent / (base.name + suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    candidates += [base / ("__init__" + suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    return next((c for c in candidates if c.exists()), None)


def not_compiled() -> list[str]:
    """The modules of :data:`MODULES` this process imports from ``.py`` files: empty when it runs the
    compiled build (tests/conftest.py checks this when ``P2PSIP_COMPILED=1``)."""
    import importlib

    return [
        name
        for name in module_names()
        if not (getattr(importlib.import_module(name), "__file__", None) or "").endswith(
            tuple(importlib.machinery.EXTENSION_SUFFIXES)
        )
    ]


def activate(out: Path = DEFAULT_OUT) -> Path:
    """Build if needed, then make this process and the programs it starts import the compiled build
    (the benches' ``--compiled``). Call before anything imports ``p2psip``."""
    out = build(out)
    _use(out)
    return out


def _use(out: Path) -> None:
    sys.path.insert(0, str(out))
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = f"{out}{os.pathsep}{previous}" if previous else str(out)
    os.environ["PYTHONSAFEPATH"] = "1"
    os.environ["P2PSIP_COMPILED"] = "1"


def use_if_asked(argv: list[str] | None = None) -> bool:
    """The benches' switch, called before they import ``p2psip``: ``--compiled`` among the arguments (or
    ``P2PSIP_COMPILED=1`` inherited from a bench that started this process) activates the compiled
    build. True when it did."""
    args = sys.argv[1:] if argv is None else argv
    if "--compiled" in args:
        activate()
        return True
    if os.environ.get("P2PSIP_COMPILED") == "1":  # started by a bench that built it: use, never rebuild
        _use(DEFAULT_OUT)
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="build directory (build/compiled)")
    parser.add_argument("--force", action="store_true", help="build even when the build is up to date")
    parser.add_argument("--tests", action="store_true", help="print the test files CI runs against it")
    args = parser.parse_args(argv)
    if args.tests:
        print(" ".join(TESTS))
        return 0
    out = build(args.out, force=args.force)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
