"""The import structure the README's layout table states: the library (`tsjax/`) never imports
the server (`serve/`) or the benchmarks, and no `serve/` module reaches itself through imports.

Read from the source with `ast`, so it costs no imports: module-level and function-level imports
both count (a deferred import is still a dependency), imports under `if TYPE_CHECKING:` do not
(they exist only for the type checker).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under `node`, skipping `if TYPE_CHECKING:` bodies."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for sub in child.orelse:
                yield from _import_nodes(ast.Module(body=[sub], type_ignores=[]))
            continue
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        yield from _import_nodes(child)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Names of the modules `path` imports. `from a.b import c` names `a.b.c` when that is a
    module of the repository, else `a.b`; relative imports are resolved against `path`."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            out.add(sub if sub in known else base)
    return out


def import_graph(*packages: str) -> dict[str, set[str]]:
    """module -> the repository modules it imports, for every module under `packages`."""
    files = [p for pkg in packages for p in sorted((ROOT / pkg).rglob("*.py"))]
    known = {module_name(p) for p in files}
    return {module_name(p): imported_modules(p, known) & known for p in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a self-import)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the graphs here are a few dozen nodes
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_library_never_imports_the_server_or_the_benchmarks():
    files = sorted((ROOT / "tsjax").rglob("*.py"))
    upward = {
        module_name(p): sorted(
            m for m in imported_modules(p, set()) if m.split(".")[0] in ("serve", "benchmarks")
        )
        for p in files
    }
    assert files and not {k: v for k, v in upward.items() if v}


def test_no_import_circles_in_the_server():
    graph = import_graph("serve")
    assert len(graph) > 10 and not cycles(graph)


# The server's layers, lowest first (README, "Repository layout"): a module imports only from
# its own group or from a lower layer. Adapters never import each other; translation never
# imports an adapter; the engine and the output parsers know nothing of HTTP.
SERVER_LAYERS = [
    ["serve.settings", "serve.errors", "serve.sessions", "serve.streaming", "serve.requestlog"],
    ["serve.engine", "serve.outputs"],
    ["serve.state", "serve.bodies", "serve.access", "serve.uploads"],
    ["serve.translation", "serve.guard"],
    [
        "serve.protocols.ollama",
        "serve.protocols.openai",
        "serve.protocols.responses",
        "serve.protocols.anthropic",
        "serve.protocols.webui",
        "serve.metrics",
    ],
    ["serve.app"],
    ["serve.cli", "serve.__main__"],
]


def _group(module: str) -> tuple[int, str] | None:
    """(layer, group) of a serve module: the longest group name it is, or lies under."""
    found = [(i, g) for i, layer in enumerate(SERVER_LAYERS) for g in layer
             if module == g or module.startswith(g + ".")]  # fmt: skip
    return max(found, key=lambda f: len(f[1])) if found else None


def test_server_imports_go_down_the_layers():
    graph = import_graph("serve")
    placed = {m: _group(m) for m in graph if m not in ("serve", "serve.protocols")}
    assert not [m for m, g in placed.items() if g is None], "every module has a layer"
    upward = [
        (a, b)
        for a, imports in graph.items()
        for b in imports
        if a in placed and b in placed and placed[a][1] != placed[b][1]
        and placed[b][0] >= placed[a][0]
    ]  # fmt: skip
    assert not upward


def test_the_checks_see_what_they_look_for(tmp_path):
    """The walker finds function-level imports and skips TYPE_CHECKING ones, and the cycle
    finder finds a circle: the two tests above cannot pass for want of looking."""
    src = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from serve.hidden import X\n"
        "def f():\n    from serve.app import create_app\n    import benchmarks.decode\n"
    )
    path = ROOT / "tsjax" / "_layout_probe.py"
    tree = ast.parse(src)
    found = {
        (n.module if isinstance(n, ast.ImportFrom) else n.names[0].name)
        for n in _import_nodes(tree)
    }
    assert found == {"typing", "serve.app", "benchmarks.decode"}
    assert module_name(path) == "tsjax._layout_probe"
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert _group("serve.protocols.webui.chat") == (4, "serve.protocols.webui")
    assert _group("serve.translation.plan")[0] > _group("serve.state")[0]


def test_the_tsjax_command_offers_the_server_and_the_benchmarks(capsys):
    """`tsjax serve` and `tsjax bench` arrive through the `tsjax.commands` entry points."""
    import pytest

    from tsjax.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    listed = capsys.readouterr().out
    for name in ("pull", "list", "generate", "serve", "bench"):
        assert f"    {name} " in listed
    for name, flag in (("serve", "--max-tokens"), ("bench", "--concurrency")):
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0 and flag in capsys.readouterr().out
