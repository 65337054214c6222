"""The import rules of issue 28 ("one house"), read from the source (scripts/import_graph.py: nothing is
imported to check them): no cycle between edlab's modules, lazy imports inside functions counted; no module
importing another module's ``_private`` name (a name another module needs is public, so a refactor sees the
contract); and no library module (outside edlab.cli) importing click or rich when it loads."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import import_graph  # noqa: E402

SRC = import_graph.SRC


@pytest.fixture(scope="module")
def graph():
    return import_graph.graph()


def private_imports(src: Path = SRC, package: str = "edlab") -> list[str]:
    """"module: from other import _name" for every import of a private name of another edlab module (a
    private submodule, ``from . import _registry``, is a module of the package, not a name taken from one)."""
    files = sorted((src / package).rglob("*.py"))
    modules = {import_graph.module_name(f, src): f for f in files}
    found = []
    for mod, f in modules.items():
        for node, _lazy in import_graph._imports(ast.parse(f.read_text(), str(f))):
            if not isinstance(node, ast.ImportFrom):
                continue
            bases = [b for b in import_graph._resolve(mod, f.name == "__init__.py", node, modules)
                     if b in modules]
            for a in node.names:
                if not a.name.startswith("_") or a.name.startswith("__"):
                    continue
                base = next((b for b in bases if not b.endswith("." + a.name)), None)
                if base is not None and base != mod and f"{base}.{a.name}" not in modules:
                    found.append(f"{mod}: from {base} import {a.name}")
    return found


def test_no_import_cycle_lazy_imports_counted(graph):
    assert import_graph.cycles(graph) == []
    assert import_graph.cycles(graph, "top") == []


def test_no_module_imports_another_modules_private_name():
    assert private_imports() == []


def test_no_library_module_imports_click_or_rich_when_it_loads(graph):
    library = {m: d for m, d in graph.items() if not import_graph.is_cli(m)}
    assert len(library) > 20
    assert [m for m, d in library.items() if d["ui_top"]] == []


def test_the_checks_can_fail(tmp_path):
    """A cycle through a lazy import, a private name taken from another module, and a load-time rich import
    in a small package of three files: each check sees its fault."""
    pkg = tmp_path / "edlab"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import rich\nfrom .b import _hidden\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n_hidden = 1\n")
    g = import_graph.graph(tmp_path)
    assert import_graph.cycles(g) == [["edlab.a", "edlab.b"]] and import_graph.cycles(g, "top") == []
    assert g["edlab.a"]["ui_top"] == ["rich"]
    assert private_imports(tmp_path) == ["edlab.a: from edlab.b import _hidden"]
