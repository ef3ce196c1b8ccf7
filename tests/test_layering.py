"""The layering rules of DESIGN.md, checked by walking every module's imports with ``ast``.

- the SIP stack (p2psip except peer and the cli package) and overlay never import each other;
- only the p2psip.cli package may import sipapi from inside p2psip;
- nothing outside the p2psip.cli package imports it;
- no two modules import each other at run time, directly or round a longer loop (imports under
  ``if TYPE_CHECKING:`` are for annotations only and do not count);
- host/port/target parsing and the RFC 3261 §18 rules live in p2psip.address only, and p2psip.transport
  holds the sockets only (others import nothing else from it);
- one agreed exception: ``p2psip.ratelimit`` (the one rate limiter of the project) is a stdlib-only leaf
  that ``overlay`` may import; it imports nothing from the project.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("p2psip", "overlay", "sipapi")
# The single module of the SIP package that overlay may import (it must stay a stdlib-only leaf).
SHARED_LEAF = "p2psip.ratelimit"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_only(tree: ast.Module) -> set[ast.AST]:
    """The nodes inside ``if TYPE_CHECKING:`` blocks."""
    hidden: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                hidden.update(ast.walk(child))
    return hidden


def _imports(path: Path, *, run_time: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    hidden = _type_checking_only(tree) if run_time else set()
    for node in ast.walk(tree):
        if node in hidden:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                prefix = ".".join(base)
                name = f"{prefix}.{node.module}" if node.module else prefix
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return found


def _all_modules() -> dict[str, set[str]]:
    return {
        _module_name(path): _imports(path) for pkg in PACKAGES for path in sorted((ROOT / pkg).rglob("*.py"))
    }


def _hits(imports: set[str], target: str) -> bool:
    return any(name == target or name.startswith(target + ".") for name in imports)


def _in_cli(module: str) -> bool:
    return module == "p2psip.cli" or module.startswith("p2psip.cli.")


def _is_sip_stack(module: str) -> bool:
    return module.startswith("p2psip") and module != "p2psip.peer" and not _in_cli(module)


def test_modules_were_found() -> None:
    modules = _all_modules()
    assert "p2psip.errors" in modules
    assert "overlay.errors" in modules
    assert "p2psip.cli.parser" in modules


def test_sip_stack_and_overlay_never_import_each_other() -> None:
    for module, imports in _all_modules().items():
        if _is_sip_stack(module):
            assert not _hits(imports, "overlay"), f"{module} imports overlay"
        if module.startswith("overlay"):
            others = {name for name in imports if not _hits({name}, SHARED_LEAF)}
            assert not _hits(others, "p2psip"), f"{module} imports p2psip"


def test_shared_leaf_imports_nothing_from_the_project() -> None:
    modules = _all_modules()
    assert SHARED_LEAF in modules
    for package in PACKAGES:
        assert not _hits(modules[SHARED_LEAF], package), f"{SHARED_LEAF} imports {package}"


def test_only_cli_imports_sipapi_from_p2psip() -> None:
    for module, imports in _all_modules().items():
        if module.startswith("p2psip") and not _in_cli(module):
            assert not _hits(imports, "sipapi"), f"{module} imports sipapi"


def test_nothing_imports_cli() -> None:
    for module, imports in _all_modules().items():
        if not _in_cli(module):
            assert not _hits(imports, "p2psip.cli"), f"{module} imports p2psip.cli"


def test_no_import_cycles() -> None:
    """A cycle (e.g. the UA importing its media glue and the glue importing the UA back, lazily) means two
    modules hold one concept between them; the dependency must go one way."""
    paths = {_module_name(path): path for pkg in PACKAGES for path in sorted((ROOT / pkg).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        edges = set()
        for name in _imports(path, run_time=True):
            while name and name not in paths:
                name = name.rpartition(".")[0]
            # a package's own ancestors are imported with it: not an edge of the design
            if name and name != module and not module.startswith(name + "."):
                edges.add(name)
        graph[module] = edges

    def reaches(start: str, goal: str) -> list[str] | None:
        stack, seen = [(start, [start])], {start}
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == goal:
                    return [*path, nxt]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    cycles = [loop for module in graph if (loop := reaches(module, module))]
    assert not cycles, "import cycle: " + " -> ".join(cycles[0])


# Names of p2psip.transport that other modules may import: the socket side (listeners, connections, TLS
# contexts, the Server header it stamps). Address parsing and the §18 rules are p2psip.address's.
SOCKET_SIDE = {
    "TransportLayer", "Source", "StreamConnection", "Observer", "TLSConfig", "generate_self_signed", "SERVER",
}  # fmt: skip


def _top_level_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_address_rules_live_in_address_only() -> None:
    """One home for host/port/target/listen-spec parsing and the RFC 3261 §18 decisions: no other module
    defines a name p2psip.address exports, and no other module brackets IPv6 hosts by hand."""
    import p2psip.address

    rules = set(p2psip.address.__all__)
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            module = _module_name(path)
            if module == "p2psip.address":
                continue
            twice = _top_level_names(path) & rules
            assert not twice, f"{module} defines {sorted(twice)}: use p2psip.address"
            text = path.read_text()
            for snippet in ('f"[{', "'[' +", '"[" +'):
                assert snippet not in text, f"{module} brackets a host by hand ({snippet!r}): use bracket()"


def test_transport_holds_sockets_only() -> None:
    """p2psip.transport takes the address rules from p2psip.address; others import only its socket side."""
    tree = ast.parse((ROOT / "p2psip" / "transport.py").read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "p2psip.address"
        for alias in node.names
    }
    assert {"stamp_via", "response_target", "Target"} <= imported, "transport should use p2psip.address"
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module == "p2psip.transport":
                    extra = {alias.name for alias in node.names} - SOCKET_SIDE
                    assert not extra, f"{_module_name(path)} imports {sorted(extra)} from p2psip.transport"


def test_docs_module_map_names_every_module() -> None:
    """docs/index.md's module map stays true: every module is named there, in full or (a submodule) as
    ``.name`` / ``name`` on the row of its package, as in "`p2psip.media.rtp`, `.rtcp`"."""
    text = (ROOT / "docs" / "index.md").read_text()
    rows = text[text.index("## Module map") :].splitlines()
    missing = []
    for module in _all_modules():
        package, _, last = module.rpartition(".")
        if not any(
            f"`{module}`" in row
            or (f"`{package}" in row and (f"`.{last}`" in row or f"`{last}`" in row))
            for row in rows
        ):
            missing.append(module)
    assert not missing, f"docs/index.md's module map does not name {missing}"
