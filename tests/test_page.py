"""`edlab report --page`: a sectioned results page rebuilt from run folders and the prose of its page file."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cifar_dir

from edlab.errors import EdlabError
from edlab.page import build_page


def write_run(folder, val, test, score, ps=0.0, pu=0.0, params=1000, macs=50000, epochs=3):
    folder.mkdir(parents=True)
    summary = {"val_accuracy": val, "test_accuracy": test, "score": score, "ps": ps, "pu": pu, "params": params,
               "macs": macs, "bits_w": 32, "bits_a": 32, "views": 1, "seconds": 120.0,
               "epochs": epochs}
    (folder / "summary.json").write_text(json.dumps(summary))
    rows = [{"epoch": e, "train_accuracy": val * e / epochs, "val_accuracy": val * e / epochs, "train_loss": 1.0 / e,
             "val_loss": 1.2 / e} for e in range(1, epochs + 1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "config.yaml").write_text("model: {name: resnet20}\n")


@pytest.fixture
def page_file(tmp_path):
    write_run(tmp_path / "runs" / "bs" / "b32", 0.8123, 0.8001, 0.1944)
    write_run(tmp_path / "runs" / "bs" / "trials" / "0001", 0.8345, 0.8290, 0.1944)
    study = {"trials": [{"run_dir": "elsewhere/bs/trials/0001", "point": {"data.batch_size": 64}}]}
    (tmp_path / "runs" / "bs" / "study.json").write_text(json.dumps(study))  # as the sweep's folder saw it
    write_run(tmp_path / "runs" / "prune" / "pu05", 0.8011, None, 0.1122, pu=0.5)
    write_run(tmp_path / "runs" / "prune" / "pu09", 0.7012, None, 0.0421, pu=0.9)
    page = tmp_path / "pages" / "deck.yaml"
    page.parent.mkdir()
    page.write_text("""title: Seed deck
out: deck.md
intro: The deck's studies.
sections:
  - title: Batch size
    deck: "batch 32 overfits"
    command: edlab sweep studies/batch-size.yaml
    runs: [../runs/bs]
    note: Batch 64 generalises better here too.
  - title: Simple pruning
    runs: [../runs/prune]
    plot: sparsity
  - title: BinaryConnect
    runs: [../runs/bc]
""")
    return page


def test_the_page_holds_each_sections_runs_figures_and_prose(page_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = build_page(page_file)
    text = (page_file.parent / "deck.md").read_text()
    assert "`edlab report --page pages/deck.yaml`" in text.splitlines()[2]  # the rebuild command, at the top
    batch, pruning, binary = text.split("## 1. Batch size")[1].split("## 2.")[0], text.split("## 2.")[1], \
        text.split("## 3. BinaryConnect")[1].split("## The trade-off")[0]
    assert "> batch 32 overfits" in batch and "edlab sweep studies/batch-size.yaml" in batch
    assert "| b32 | 81.23 | 80.01 | 1,000 | 50,000 | 32/32 | 0.00/0.00 | 1 | 0.1944 | 2.0 | 0.67 |" in batch  # 3 epochs
    assert "| data.batch_size=64 | 83.45 |" in batch and "Batch 64 generalises better here too." in batch
    assert "| pu09 | 70.12 | — |" in pruning and "0.00/0.90" in pruning
    assert "Not measured yet" in binary  # laid out before its runs
    # what each section cost, and all of them, summed from the runs' own clocks (4 runs of 120 s each)
    assert "*2 run(s): 4.0 minutes (0.07 hours) by their own clocks.*" in batch
    assert "All sections together (a shared run once): *4 run(s): 8.0 minutes (0.13 hours)" in text
    assert r["sections"] == {"Batch size": 2, "Simple pruning": 2, "BinaryConnect": 0}
    for name in r["figures"]:
        assert (page_file.parent / name).stat().st_size > 1000
    assert r["figures"] == ["deck-01-batch-size.png", "deck-02-simple-pruning.png", "deck-pareto.png"]


def test_a_rebuilt_page_follows_its_runs(page_file, tmp_path):
    build_page(page_file)
    s = json.loads((tmp_path / "runs/bs/b32/summary.json").read_text())
    (tmp_path / "runs/bs/b32/summary.json").write_text(json.dumps({**s, "val_accuracy": 0.8555}))
    build_page(page_file)
    text = (page_file.parent / "deck.md").read_text()
    assert "| b32 | 85.55 |" in text and "81.23" not in text


def test_sections_share_one_study_by_the_config_values_they_ask_for(tmp_path):
    """The seed deck's four training questions share one study: its baseline run is trained once and shown in
    every section; each section keeps the runs with its ``where`` values; the trade-off plot counts it once."""
    for name, lr, bs in (("base", 0.001, 64), ("lr3", 0.003, 64), ("bs32", 0.001, 32)):
        write_run(tmp_path / "seed" / name, 0.8, 0.79, 0.19)
        (tmp_path / "seed" / name / "config.yaml").write_text(f"optim: {{lr: {lr}}}\ndata: {{batch_size: {bs}}}\n")
    page = tmp_path / "p.yaml"
    page.write_text("title: t\nsections:\n"
                    "  - {title: batch size, runs: [seed], where: {optim.lr: 1.0e-3}}\n"
                    "  - {title: learning rate, runs: [seed], where: {data.batch_size: 64}}\n")
    r = build_page(page)
    assert r["sections"] == {"batch size": 2, "learning rate": 2}
    text = (tmp_path / "page.md").read_text()
    first, second = text.split("## 2.")
    assert "| base |" in first and "| bs32 |" in first and "| lr3 |" not in first
    assert "| base |" in second and "| lr3 |" in second and "| bs32 |" not in second


@pytest.mark.parametrize("body, says", [
    ("title: x\nsections: [{title: a, plot: bars}]\n", "sections.0.plot"),
    ("title: x\nsections: []\nout: deck.html\n", "Markdown"),
    ("title: [x\n", "not valid YAML"),
    ("title: x\nsection: []\n", "sections"),
])
def test_a_bad_page_file_is_one_line(tmp_path, body, says):
    page = tmp_path / "p.yaml"
    page.write_text(body)
    with pytest.raises(EdlabError, match=says):
        build_page(page)


def test_the_command_rebuilds_the_page_and_refuses_paths_with_it(page_file, tmp_path):
    def edlab(*args):
        return subprocess.run([sys.executable, "-m", "edlab", "report", *map(str, args)], capture_output=True,
                              text=True, cwd=tmp_path, timeout=120)

    r = edlab("--page", page_file)
    assert r.returncode == 0, r.stderr
    assert "3 sections (1 without runs yet)" in r.stdout and (page_file.parent / "deck.md").is_file()
    r = edlab("--page", page_file, "runs")
    assert r.returncode != 0 and "give no PATHS" in r.stderr and "Traceback" not in r.stderr
    r = edlab("--page", tmp_path / "nope.yaml")
    assert r.returncode != 0 and "page file not found" in r.stderr and "Traceback" not in r.stderr


DECK = Path(__file__).resolve().parents[1] / "docs" / "results" / "deck.yaml"


def test_the_committed_deck_page_is_what_its_committed_run_folders_say(tmp_path):
    """docs/results/deck.md is rebuilt from its committed folders: every table row of a fresh rebuild (into a
    scratch copy of the page file) is on the committed page, and the page has no other row."""
    import yaml

    tree = yaml.safe_load(DECK.read_text())
    for sec in tree["sections"]:
        sec["runs"] = [str(DECK.parent / f) for f in sec.get("runs", [])]
    (tmp_path / "deck.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    build_page(tmp_path / "deck.yaml")

    def rows(path):
        return sorted(line for line in path.read_text().splitlines() if line.startswith("| ") and "---" not in line)

    assert rows(tmp_path / "deck.md") == rows(DECK.parent / "deck.md")


def test_the_deck_pages_shared_model_scores_what_the_page_says():
    """The model file the page names (the shared resnet20) scores, counted from the file, what its row says."""
    from edlab.inspect_file import score_file

    ckpt = DECK.parent / "deck" / "resnet20" / "model.ckpt"
    summary = json.loads((ckpt.parent / "summary.json").read_text())
    p = score_file(str(ckpt))
    assert p.score == pytest.approx(summary["score"], rel=1e-9) and p.params == summary["params"]
    row = next(line for line in (DECK.parent / "deck.md").read_text().splitlines() if line.startswith("| resnet20 |"))
    assert f"| {p.score:.4f} |" in row and f"| {p.params:,} |" in row


@pytest.mark.slow  # tens of seconds: the 10,000 test images through resnet20
@pytest.mark.skipif(cifar_dir() is None, reason="needs CIFAR-10 in $EDLAB_DATA_DIR")
def test_the_deck_pages_shared_model_evaluates_to_what_the_page_says():
    """`edlab eval` on the committed resnet20 (tested under bf16 autocast) gives the test accuracy of its row."""
    from edlab.evaluation import evaluate_checkpoint

    ckpt = DECK.parent / "deck" / "resnet20" / "model.ckpt"
    summary = json.loads((ckpt.parent / "summary.json").read_text())
    r = evaluate_checkpoint(str(ckpt), data_dir=cifar_dir())
    assert r["test_accuracy"] == summary["test_accuracy"], r
    row = next(line for line in (DECK.parent / "deck.md").read_text().splitlines() if line.startswith("| resnet20 |"))
    assert f"| {100 * r['test_accuracy']:.2f} |" in row
