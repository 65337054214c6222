"""The library/CLI layering (issue 16) and the public API: the library imports no click and no edlab.cli,
no import cycle binds the two layers, `import edlab` stays light, every command has a library function
taking its options with its defaults, and docs/api.md's worked example runs as written."""

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click import Context

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import import_graph  # noqa: E402

from edlab.cli import cli  # noqa: E402


@pytest.fixture(scope="module")
def graph():
    return import_graph.graph()


def test_the_library_imports_no_click_and_no_cli(graph):
    library = {m: d for m, d in graph.items() if not import_graph.is_cli(m)}
    assert len(library) > 20 and any(import_graph.is_cli(m) for m in graph)
    assert not [m for m, d in library.items() if "click" in d["ui"]]
    assert not [m for m, d in library.items() if d["ui_top"]]  # rich: only inside the functions that draw
    assert not [m for m, d in library.items() if any(import_graph.is_cli(i) for i in d["imports"])]


def test_no_import_cycle_between_layers_or_at_load_time(graph):
    assert import_graph.layer_cycles(graph) == []
    # a package importing its own submodules (the model registry) is how registration works, not a cycle
    own = {m: {**d, "top": [i for i in d["top"] if not i.startswith(m + ".")]} for m, d in graph.items()}
    assert import_graph.cycles(own, "top") == []


def test_the_graph_sees_a_cycle_and_a_lazy_import():
    """The checks above can fail: the graph finds a cycle and tells lazy imports from load-time ones."""
    g = {"a": {"imports": ["b"], "top": ["b"]}, "b": {"imports": ["a"], "top": []}}
    assert import_graph.cycles(g) == [["a", "b"]] and import_graph.cycles(g, "top") == []
    checkpoint = graph_of("checkpoint")
    assert "edlab.config" in checkpoint["imports"] and "edlab.config" not in checkpoint["top"]


def graph_of(name: str) -> dict:
    return import_graph.graph()[f"edlab.{name}"]


def test_import_edlab_loads_no_click_rich_or_torch():
    code = ("import sys, edlab\nfrom edlab import EdlabError\nassert edlab.__all__\n"
            "print(sorted(m for m in ('click', 'rich', 'torch') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_the_public_api_resolves():
    import edlab

    missing = [n for n in edlab.__all__ if not callable(getattr(edlab, n))]
    assert missing == [] and len(edlab.__all__) >= 30
    with pytest.raises(AttributeError):
        edlab.no_such_function  # noqa: B018
    import edlab.scoring
    import edlab.train

    assert inspect.ismodule(edlab.train) and inspect.ismodule(edlab.scoring)  # no API name hides a module
    assert edlab.score(w=5.6e6, f=2.8e8) == 2.0  # the course formula itself (edlab.scoring.score)


def test_every_command_is_a_library_stage_with_the_same_options_and_defaults():
    """Each command's options reach its library function (edlab.stages) with the CLI's defaults."""
    from edlab.stages import STAGES, stage_kwargs

    ctx = Context(cli)
    commands = set(cli.list_commands(ctx)) - {"run"}
    assert commands == set(STAGES)
    for name in commands:
        st = STAGES[name]
        params = inspect.signature(st.function()).parameters
        for p in cli.get_command(ctx, name).params:
            if p.name in ("as_json", "sets", "resume", "worker_index", st.positional) or p.param_type_name != "option":
                continue
            key = p.opts[0].lstrip("-")
            keyword = st.all_aliases().get(key, (key.replace("-", "_"), None))[0]
            assert keyword in params or keyword in st.named_options(), (name, key)
            sample = True if p.is_flag else 1 if p.type.name in ("integer", "float") else "x"
            kw = stage_kwargs(name, {key: sample}, "m.ckpt" if st.takes_checkpoint else None, "o")
            assert keyword in kw, (name, key)
            default = None if "UNSET" in repr(p.default) else p.default  # click >= 8.2: a sentinel for "none"
            required = keyword in params and params[keyword].default is inspect.Parameter.empty
            if keyword in params and not (p.multiple or p.is_flag or required) and default is not None:
                assert params[keyword].default == default, (name, key, default, params[keyword].default)
    with pytest.raises(Exception, match="No such option: bogus"):
        stage_kwargs("prune", {"bogus": 1}, "m.ckpt")


def test_the_worked_example_in_docs_api_runs(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "api.md").read_text()
    code = re.search(r"## Worked example.*?```python\n(.*?)```", text, re.S).group(1)
    assert "train_run" in code and "prune_checkpoint" in code and "pack_checkpoint" in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/api.md", "exec"), {})
    assert (tmp_path / "runs" / "api-example" / "model.pack").is_file()
    assert (tmp_path / "runs" / "api-example" / "prune" / "summary.json").is_file()
