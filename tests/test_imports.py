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
        for node, _lazy in import_graph.imports_in(ast.parse(f.read_text(), str(f))):
            if not isinstance(node, ast.ImportFrom):
                continue
            bases = [b for b in import_graph.resolve_from(mod, f.name == "__init__.py", node, modules)
                     if b in modules]
            for a in node.names:
                if not a.name.startswith("_") or a.name.startswith("__"):
                    continue
                base = next((b for b in bases if not b.endswith("." + a.name)), None)
                if base is not None and base != mod and f"{base}.{a.name}" not in modules:
                    found.append(f"{mod}: from {base} import {a.name}")
    return found


def private_imports_from_outside(files: list[Path], src: Path = SRC) -> list[str]:
    """"file: from edlab.x import _name" for every private name a test or benchmark takes from edlab (a name
    they need is part of the contract, so it is public). A private module (edlab.cli._common, whose
    constants a test compares with the config's) is a module, not a name taken from one."""
    modules = {import_graph.module_name(f, src) for f in (src / "edlab").rglob("*.py")}
    found = []
    for f in files:
        for node, _lazy in import_graph.imports_in(ast.parse(f.read_text(), str(f))):
            if not isinstance(node, ast.ImportFrom) or node.level or not (node.module or "").startswith("edlab"):
                continue
            for a in node.names:
                private = a.name.startswith("_") and not a.name.startswith("__")
                if private and f"{node.module}.{a.name}" not in modules:
                    found.append(f"{f.name}: from {node.module} import {a.name}")
    return found


def test_no_import_cycle_lazy_imports_counted(graph):
    assert import_graph.cycles(graph) == []
    assert import_graph.cycles(graph, "top") == []


def test_no_module_imports_another_modules_private_name():
    assert private_imports() == []


def test_tests_and_benchmarks_take_no_private_name_from_edlab(tmp_path):
    files = sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    assert len(files) > 50 and private_imports_from_outside(files) == []
    (tmp_path / "t.py").write_text("def f():\n    from edlab.export import _x, plain_batches\n"
                                   "from edlab.cli import _common\n")
    assert private_imports_from_outside([tmp_path / "t.py"]) == ["t.py: from edlab.export import _x"]


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


ARCHITECTURE = ROOT / "docs" / "architecture.md"


def layer_table(text: str) -> list[list[str]]:
    """The modules of each row of docs/architecture.md's layer table (rows "| N. name | `mod`, ... | ... |"),
    as globs (``cli.*``) over names without the ``edlab.`` prefix."""
    import re

    rows = [line.split("|") for line in text.splitlines() if re.match(r"\| \d+\. ", line)]
    return [re.findall(r"`([^`]+)`", cells[2]) for cells in rows]


def layer_violations(graph: dict, table: list[list[str]]) -> list[str]:
    """What breaks the table: a module in no row, or one importing a module of a later row."""
    from fnmatch import fnmatchcase

    def row_of(mod: str) -> int | None:
        name = mod.removeprefix("edlab.") if mod != "edlab" else "edlab"
        exact = [k for k, row in enumerate(table) if name in row]
        return exact[0] if exact else next((k for k, row in enumerate(table)
                                            if any(fnmatchcase(name, g) for g in row)), None)

    found = [f"{m}: in no row" for m in graph if row_of(m) is None]
    for m, d in graph.items():
        for i in d["imports"]:
            if None not in (row_of(m), row_of(i)) and row_of(i) > row_of(m):
                found.append(f"{m} (row {row_of(m) + 1}) imports {i} (row {row_of(i) + 1})")
    return found


def test_the_layers_in_docs_architecture_hold(graph):
    """docs/architecture.md's layer table is a rule, not a picture: every module is in a row, and imports
    (lazy ones too) only from its row or the rows above."""
    table = layer_table(ARCHITECTURE.read_text())
    assert len(table) == 8
    assert layer_violations(graph, table) == []


def test_the_layer_check_sees_a_missing_module_and_an_upward_import(graph):
    table = layer_table(ARCHITECTURE.read_text())
    without_prune = [[m for m in row if m != "prune"] for row in table]
    assert layer_violations(graph, without_prune) == ["edlab.prune: in no row"]
    swapped = [table[5], *table[:5], *table[6:]]  # compression above foundations
    assert any(v.startswith("edlab.prune (row 1) imports edlab.train") for v in layer_violations(graph, swapped))
