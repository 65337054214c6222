"""Print edlab's intra-package import graph from the source (no import runs), with its cycles and the
modules that import click or rich.

Every import counts, also the lazy ones inside functions: a cycle through a function-level import still
ties two layers together. Used by docs (the layering note), tests/test_api.py (the layering rules) and
tests/test_imports.py (no cycle at all, no private name taken from another module).

    python scripts/import_graph.py            # module -> edlab modules it imports   [click, rich]
    python scripts/import_graph.py --json
    python scripts/import_graph.py --layers   # modules by depth: each imports only from the rows above it
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
UI = ("click", "rich")  # the command-line layer's libraries


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve_from(mod: str, is_pkg: bool, node: ast.ImportFrom, modules) -> list[str]:
    """The absolute module names one `from ... import ...` names: the submodules it names, and the module
    it names them from when some name is an attribute of it (`from . import train` is edlab.train only)."""
    if node.level == 0:
        base = node.module or ""
    else:
        parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
    return subs + ([base] if len(subs) < len(node.names) else [])


def imports_in(tree: ast.AST):
    """(node, lazy) for every import statement, skipping `if TYPE_CHECKING:` blocks; lazy = inside a
    function (runs when the function is called, not when the module loads)."""
    def walk(node, lazy):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, lazy
            yield from walk(child, lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
    yield from walk(tree, False)


def graph(src: Path = SRC, package: str = "edlab") -> dict[str, dict]:
    """module -> {"imports": edlab modules it imports anywhere, "top": those it imports when it loads,
    "ui": click/rich imported anywhere, "ui_top": click/rich imported when it loads}."""
    files = sorted((src / package).rglob("*.py"))
    modules = {module_name(f, src): f for f in files}
    out: dict[str, dict] = {}
    for mod, f in modules.items():
        tree = ast.parse(f.read_text(), str(f))
        names: dict[str, bool] = {}  # name -> imported at load time
        for node, lazy in imports_in(tree):
            found = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                resolve_from(mod, f.name == "__init__.py", node, modules)
            for n in found:
                names[n] = names.get(n, False) or not lazy
        deps = {n: top for n, top in names.items() if n in modules and n != mod}
        ui = {n.split(".")[0]: top for n, top in names.items() if n.split(".")[0] in UI}
        out[mod] = {"imports": sorted(deps), "top": sorted(n for n, t in deps.items() if t),
                    "ui": sorted(ui), "ui_top": sorted(n for n, t in ui.items() if t)}
    return out


def cycles(g: dict[str, dict], key: str = "imports") -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), over all imports or, with
    key="top", over the imports that run when a module loads."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v][key]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return sorted(found)


def is_cli(mod: str) -> bool:
    return mod == "edlab.cli" or mod.startswith("edlab.cli.") or mod == "edlab.__main__"


def layer_cycles(g: dict[str, dict]) -> list[list[str]]:
    """Cycles between the two layers: the command line (edlab.cli*) and the library, over all imports."""
    layered = {"cli": {"imports": sorted({"lib" for m, d in g.items() if is_cli(m) for i in d["imports"]
                                         if not is_cli(i)})},
               "lib": {"imports": sorted({"cli" for m, d in g.items() if not is_cli(m) for i in d["imports"]
                                         if is_cli(i)})}}
    return cycles(layered)


def layers(g: dict[str, dict]) -> list[list[str]]:
    """Modules by depth over all imports (lazy ones too): depth 0 imports no edlab module, depth k imports
    only modules of depth < k. Defined only without cycles, which tests/test_imports.py guarantees."""
    depth: dict[str, int] = {}

    def of(m: str) -> int:
        if m not in depth:
            depth[m] = 1 + max((of(i) for i in g[m]["imports"]), default=-1)
        return depth[m]

    for m in g:
        of(m)
    return [sorted(m for m in g if depth[m] == k) for k in range(max(depth.values(), default=-1) + 1)]


def main() -> None:
    g = graph()
    if "--layers" in sys.argv:
        for k, mods in enumerate(layers(g)):
            print(f"{k:>2}  " + ", ".join(m.removeprefix("edlab.") or "edlab" for m in mods))
        return
    if "--json" in sys.argv:
        print(json.dumps({"graph": g, "cycles": cycles(g), "load_time_cycles": cycles(g, "top")}, indent=2))
        return
    for mod, d in g.items():
        short = [m.removeprefix("edlab.") + ("" if m in d["top"] else "*") for m in d["imports"]]
        ui = ", ".join(u + ("" if u in d["ui_top"] else "*") for u in d["ui"])
        name = mod.removeprefix("edlab.") or "edlab"
        print(f"{name:<16} -> {', '.join(short) or '-'}" + (f"   [{ui}]" if ui else ""))
    print("(* = imported lazily, inside a function)")
    print("cycles at load time:", "; ".join(" <-> ".join(c) for c in cycles(g, "top")) or "none")
    print("cycles between cli and library:", "; ".join(" <-> ".join(c) for c in layer_cycles(g)) or "none")
    print("cycles counting lazy imports:", "; ".join(" <-> ".join(c) for c in cycles(g)) or "none")
    lib_ui = [m for m, d in g.items() if d["ui"] and not is_cli(m)]
    lib_cli = [m for m, d in g.items() if not is_cli(m) and any(is_cli(i) for i in d["imports"])]
    print("library modules importing click/rich:", ", ".join(lib_ui) or "none")
    print("library modules importing edlab.cli:", ", ".join(lib_cli) or "none")


if __name__ == "__main__":
    main()
