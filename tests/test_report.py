"""edlab report: discovery, the Pareto front, the best-model rule, the files, and the page in a real browser.

The browser check drives headless Chromium over the DevTools protocol through ``--remote-debugging-pipe``:
Chromium reads NUL-terminated JSON commands from its fd 3 and writes replies and events to its fd 4, so no
port, no websocket library and no polling of files is needed. The page is loaded in a fresh tab and we
collect every error the DevTools domains report while it loads: uncaught exceptions
(Runtime.exceptionThrown), console.error/assert calls (Runtime.consoleAPICalled) and browser log errors
such as a missing image (Log.entryAdded, level error). After the load event, Runtime.evaluate reads each
<img>'s ``complete`` and ``naturalWidth`` (0 when the file is missing or is not a decodable image). A
second test feeds it a page with a broken image and a console.error to show the check can fail.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import invoke

from edlab.cli import cli
from edlab.errors import EdlabError
from edlab.report import build_report, choose_best, discover, pareto_front

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    env = os.environ.get("EDLAB_CHROMIUM")
    if env and Path(env).is_file():
        return env
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def browser_check(chromium: str, page: Path, profile_dir: Path, timeout: float = 90) -> dict:
    """Load ``page`` in headless Chromium; return {"images": [{src, complete, w}], "errors": [str]}."""
    cmd_r, cmd_w = os.pipe()  # we write commands -> chromium reads fd 3
    ev_r, ev_w = os.pipe()  # chromium writes fd 4 -> we read replies and events

    def child_fds() -> None:  # in the child: put the pipe ends at fds 3 and 4 (dup first: no clobbering)
        a, b = os.dup(cmd_r), os.dup(ev_w)
        os.dup2(a, 3)
        os.dup2(b, 4)

    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--no-default-browser-check", "--disable-extensions", "--remote-debugging-pipe",
            f"--user-data-dir={profile_dir}", "about:blank"]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            pass_fds=(3, 4), preexec_fn=child_fds)
    os.close(cmd_r)
    os.close(ev_w)
    buf = b""
    errors: list[str] = []
    events: list[dict] = []
    next_id = 0
    deadline = time.monotonic() + timeout

    def read_message() -> dict:
        nonlocal buf
        while b"\0" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([ev_r], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(ev_r, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            buf += chunk
        raw, buf = buf.split(b"\0", 1)
        return json.loads(raw)

    def note(msg: dict) -> None:  # keep what the page reports as an error
        method, p = msg.get("method"), msg.get("params", {})
        if method == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            errors.append("exception: " + d.get("exception", {}).get("description", d.get("text", "")))
        elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
        elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
            errors.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}".strip())
        events.append(msg)

    def send(method: str, params: dict | None = None, session: str | None = None) -> dict:
        nonlocal next_id
        next_id += 1
        msg = {"id": next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(cmd_w, json.dumps(msg).encode() + b"\0")
        while True:
            reply = read_message()
            if reply.get("id") == next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            note(reply)

    try:
        target = send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            send(f"{domain}.enable", session=session)
        send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        while not any(e.get("method") == "Page.loadEventFired" for e in events):
            note(read_message())
        js = ("JSON.stringify(Array.from(document.images, i => ({src: i.getAttribute('src'), "
              "complete: i.complete, w: i.naturalWidth})))")
        images = json.loads(send("Runtime.evaluate", {"expression": js, "returnByValue": True},
                                 session=session)["result"]["value"])
        send("Browser.close")
    finally:
        os.close(cmd_w)
        os.close(ev_r)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {"images": images, "errors": errors}


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, one_thread):
    """Two tiny trained runs (one inside a fake study), plus a run without checkpoint or metrics, a broken
    summary.json and a score stage's result.json: all the shapes discovery must cope with."""
    from edlab.config import load_train_config
    from edlab.train import train

    root = tmp_path_factory.mktemp("runs")
    base = ["model.name=resnet20", "model.width=0.25", "data.dataset=synthetic", "data.val_size=128",
            "data.train_subset=256", "data.batch_size=64", "epochs=2", "precision=fp32", "threads=1"]
    train(load_train_config(None, None, base + ["optim.lr=0.05", f"out={root / 'a'}"]))
    study = root / "study1"
    (study / "trials" / "0000").mkdir(parents=True)
    (study / "study.json").write_text(json.dumps({"name": "lr-search"}))
    train(load_train_config(None, None, base + ["optim.lr=0.2", "model.width=0.5",
                                                f"out={study / 'trials' / '0000' / 'run'}"]))
    bare = root / "bare"  # summary and config only: no curve, no checkpoint
    bare.mkdir()
    shutil.copy(root / "a" / "config.yaml", bare / "config.yaml")
    summary = json.loads((root / "a" / "summary.json").read_text())
    (bare / "summary.json").write_text(json.dumps({**summary, "val_accuracy": 0.95, "score": 0.5}))
    (root / "broken").mkdir()
    (root / "broken" / "summary.json").write_text("{not json")
    (root / "score-stage").mkdir()
    (root / "score-stage" / "result.json").write_text(json.dumps({"score": 0.01, "params": 10}))
    (root / "a" / "tb").mkdir(exist_ok=True)  # never searched
    return root


def test_pareto_front():
    pts = [(1.0, 0.5), (2.0, 0.7), (1.5, 0.4), (3.0, 0.7), (0.5, 0.3), (None, 0.9), (2.5, 0.8), (0.5, 0.3)]
    assert pareto_front(pts) == [4, 0, 1, 6]  # sorted by score; dominated, missing and duplicate points out
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 0.5), (1.0, 0.6)]) == [1]  # same score: the more accurate one


def _run(name: str, val: float | None, score: float | None):
    from edlab.report import RunInfo

    return RunInfo(path=Path(name), name=name, group="", kind="train", config={},
                   summary={"val_accuracy": val, "score": score})


def test_choose_best_floor_then_fallback():
    runs = [_run("a", 0.95, 0.5), _run("b", 0.91, 0.2), _run("c", 0.85, 0.01), _run("d", None, 0.001)]
    best, rule = choose_best(runs, 0.9)
    assert best.name == "b" and "lowest score" in rule
    best, rule = choose_best(runs, 0.99)
    assert best.name == "a" and "highest validation accuracy" in rule


def test_discover(runs_root):
    runs, results, skipped = discover([runs_root])
    by_name = {r.name: r for r in runs}
    assert set(by_name) == {"a", "bare", "study1/trials/0000/run"}
    assert by_name["study1/trials/0000/run"].group == "study lr-search"
    assert by_name["a"].group == "" and len(by_name["a"].curves) == 2
    assert by_name["bare"].curves == [] and by_name["bare"].checkpoint is None
    assert skipped == ["broken (summary.json unreadable)"]
    assert [r["name"] for r in results] == ["score-stage"]
    with pytest.raises(EdlabError, match="not found"):
        discover([runs_root / "nope"])


def test_an_unfinished_run_named_on_the_command_line_is_compared_but_never_chosen(runs_root, tmp_path):
    """A long run still training (metrics and config, no summary.json): named on the command line it is a row
    of kind unfinished with its curves, its best val so far and its epochs done, and is not the best model even
    with the highest val; inside a searched folder (a study's trial stopped by its pruner) it is no row."""
    long = tmp_path / "long"
    long.mkdir()
    shutil.copy(runs_root / "a" / "config.yaml", long / "config.yaml")
    rows = [json.loads(x) for x in (runs_root / "a" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows[0]["val_accuracy"] = 0.999  # the best so far: higher than any finished run's
    (long / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:1]))
    rep = build_report([runs_root / "a", long], tmp_path / "rep", floor=0.0)
    by_name = {r.name: r for r in rep["runs"]}
    assert by_name["long"].kind == "unfinished" and by_name["long"].val == 0.999 and len(by_name["long"].curves) == 1
    assert by_name["long"].summary["epochs"] == "1 of 2" and by_name["long"].score is None
    assert rep["best"].name == "a"
    assert "unfinished: a run still training" in (tmp_path / "rep" / "report.md").read_text()
    runs, _, _ = discover([tmp_path])  # searched, not named: not a run
    assert "long" not in {r.name for r in runs}


def test_report_files_and_refusals(runs_root, tmp_path):
    out = tmp_path / "rep"
    r = CliRunner().invoke(cli, ["report", str(runs_root), "--out", str(out), "--floor", "0"])
    assert r.exit_code == 0, r.output
    assert "best: a (lowest score" in r.output  # floor 0: every run qualifies, a is the narrowest
    for name in ("curves.png", "pareto.png", "layers.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "index.html").read_text()
    assert "<link" not in page and "<script" not in page and "http" not in page  # nothing fetched
    md = (out / "report.md").read_text()
    assert "| run | group |" in md and "study lr-search" in md
    # bare has the best val (0.95 >= floor) but no checkpoint: picked by the rule, breakdown skipped
    res = build_report([runs_root], out, floor=0.9)
    assert res["best"].name == "bare" and "lowest score" in res["rule"]
    assert "layers" not in res["figures"] and not (out / "layers.png").exists()
    assert "bare has no model file" in (out / "index.html").read_text()
    res = build_report([runs_root], out, floor=0.99)  # nobody reaches it: highest val, which is bare again
    assert "highest validation accuracy" in res["rule"]
    not_report = tmp_path / "notes"
    not_report.mkdir()
    (not_report / "keep.txt").write_text("mine")
    for args in (["report", str(runs_root), "--out", str(not_report)], ["report", str(tmp_path / "missing")]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 2 and r.output.count("\n") == 1 and r.output.startswith("edlab: error:"), r.output
    assert (not_report / "keep.txt").read_text() == "mine" and len(list(not_report.iterdir())) == 1


@pytest.mark.skipif(find_chromium() is None, reason="chromium not found (apt-get install chromium, or set "
                                                     "EDLAB_CHROMIUM): the page cannot be checked in a browser")
def test_report_in_headless_chromium(runs_root, tmp_path):
    out = tmp_path / "rep"
    build_report([runs_root / "a", runs_root / "study1", runs_root / "bare"], out, floor=0.0)
    seen = browser_check(find_chromium(), out / "index.html", tmp_path / "profile")
    assert seen["errors"] == []
    assert sorted(i["src"] for i in seen["images"]) == ["curves.png", "layers.png", "pareto.png"]
    assert all(i["complete"] and i["w"] > 0 for i in seen["images"]), seen["images"]


@pytest.mark.skipif(find_chromium() is None, reason="chromium not found: the browser check cannot run")
def test_browser_check_sees_broken_pages(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text("<!doctype html><html><body><img src='missing.png'>"
                    "<script>console.error('boom')</script></body></html>")
    seen = browser_check(find_chromium(), page, tmp_path / "profile")
    assert seen["images"] == [{"src": "missing.png", "complete": True, "w": 0}]
    assert any("boom" in e for e in seen["errors"]), seen["errors"]
    assert any("missing.png" in e or "ERR_FILE_NOT_FOUND" in e for e in seen["errors"]), seen["errors"]


def test_a_run_without_validation_split_has_no_val(tmp_path):
    """Runs made before the no-validation fix stored best_val_accuracy -1: the report shows no val (not -100 %)
    and keeps it off the Pareto plot, rather than drawing a point at accuracy -1."""
    run = tmp_path / "old" / "ab94"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"val_accuracy": None, "best_val_accuracy": -1.0,
                                                 "test_accuracy": 0.9, "score": 2.9}))
    runs, _, _ = discover([tmp_path])
    assert [(r.val, r.test) for r in runs] == [(None, 0.9)]


def test_a_run_whose_teacher_saw_its_validation_images_is_marked(tmp_path):
    """A summary with teacher_val_leak > 0 (its own teacher) or val_leak > 0 (a teacher of an earlier stage)
    gets its val marked and the note under the table; a clean one not."""
    for name, leak in (("leaky", {"teacher_val_leak": 5000}), ("clean", {"teacher_val_leak": 0, "val_leak": 0}),
                       ("inherited", {"val_leak": 5000})):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({"best_val_accuracy": 0.87, "test_accuracy": 0.85,
                                                     "score": 0.03, **leak}))
    build_report([tmp_path / "runs"], tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "87.00 ‡" in rows["leaky"] and "87.00 ‡" in rows["inherited"] and "‡" not in rows["clean"]
    assert "teacher that trained on images of this run's validation split" in md
    assert "teacher that trained" in (tmp_path / "out" / "index.html").read_text()


def test_the_augment_column_says_when_crop_flip_crops_nothing_and_what_mixes_the_batches(tmp_path):
    """crop_pad 0 turns crop-flip into mirrors only: the table says so instead of the policy's name; mixup,
    CutMix and a teacher's crop pool are named beside it."""
    pool = {"teacher": "t.ckpt", "crop_pool": 8}
    for name, data, distill in (("mirrors", {"augment": "crop-flip", "crop_pad": 0}, {}),
                                ("crops", {"augment": "crop-flip", "crop_pad": 4}, {}),
                                ("plain", {"augment": "none"}, {}),
                                ("mixed", {"augment": "crop-flip", "mixup": 0.2, "cutmix": 1.0}, {}),
                                ("pooled", {"augment": "crop-flip"}, pool),
                                ("no-teacher", {"augment": "crop-flip"}, {"crop_pool": 8})):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(json.dumps({"data": data, "distill": distill}))  # JSON is YAML
        (run / "summary.json").write_text(json.dumps({"best_val_accuracy": 0.8, "test_accuracy": 0.8,
                                                     "score": 0.03}))
    build_report([tmp_path / "runs"], tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "| flip only (crop_pad 0) |" in rows["mirrors"]
    assert "| crop-flip |" in rows["crops"] and "| none |" in rows["plain"]
    assert "| crop-flip + mixup 0.2 + cutmix 1 |" in rows["mixed"]
    assert "| crop-flip + teacher crop pool 8 |" in rows["pooled"] and "| crop-flip |" in rows["no-teacher"]


def test_a_result_whose_name_is_a_number_is_listed_under_its_folder(tmp_path):
    """A result.json with "name": 5 replaced the row's name and the page failed with AttributeError."""
    stage = tmp_path / "p" / "01-score"
    stage.mkdir(parents=True)
    (stage / "result.json").write_text(json.dumps({"name": 5, "score": 0.25}))
    (tmp_path / "p" / "00-train").mkdir()
    (tmp_path / "p" / "00-train" / "summary.json").write_text(json.dumps({"test_accuracy": 0.9, "score": 2.9}))
    r = build_report([tmp_path / "p"], tmp_path / "report")
    assert [(x["name"], x["score"]) for x in r["results"]] == [("01-score", 0.25)]
    assert ">01-score</td>" in (tmp_path / "report" / "index.html").read_text()


def test_an_int8_best_model_gets_its_per_layer_breakdown(int8_stage, tmp_path):
    """The demo's best model is the int8 stage's .onnx file (no model.ckpt): the report said "no per-layer
    breakdown" while `edlab score` profiles ONNX files. It now draws the file's rows, counted as score does."""
    pytest.importorskip("onnxruntime")
    from edlab.inspect_file import score_file

    int8 = int8_stage[0]  # an int8 stage's run folder (conftest)
    res = build_report([int8], tmp_path / "rep", floor=0)
    assert res["best"].name == "int8" and "layers" in res["figures"]
    assert (tmp_path / "rep" / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    p = score_file(str(int8 / "model.int8.onnx"))
    page = (tmp_path / "rep" / "index.html").read_text()
    assert f"score {p.score:.4g}" in page and "counted from model.int8.onnx" in page
    assert "QLinearConv" in page and page.count("QLinearConv") >= len([r for r in p.rows if r.type == "QLinearConv"])


def test_one_bad_run_folder_does_not_abort_the_report(tmp_path):
    runs = tmp_path / "runs"
    for name, text in {"good": '{"test_accuracy": 0.5, "val_accuracy": 0.4, "score": 0.1}',
                       "deep": "[" * 5000 + "]" * 5000, "odd": '{"test_accuracy": "x", "score": [1], "params": "a"}'
                       }.items():
        (runs / name).mkdir(parents=True)
        (runs / name / "summary.json").write_text(text)
    (runs / "binary").mkdir()
    (runs / "binary" / "summary.json").write_bytes(b"\xff\xfe{")
    (runs / "odd" / "metrics.jsonl").write_text('{"epoch": "a", "train_loss": [1]}\n' + "[" * 5000 + "\n")
    (runs / "odd" / "config.yaml").write_text("optim: 5\ndata: [1]\n")
    r = invoke("report", runs, "--out", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    assert "left out deep" in r.stderr and "left out binary" in r.stderr
    assert (tmp_path / "rep" / "index.html").is_file()


def test_report_stays_readable_with_many_runs_and_datasets(tmp_path, monkeypatch):
    """15 runs, one with a diverged loss, two datasets, a pruned run with steps and odd bits."""
    from matplotlib.colors import to_rgba

    from edlab import report

    runs = tmp_path / "runs"
    for i in range(15):
        d = runs / f"r{i:02d}"
        d.mkdir(parents=True)
        ds = "synthetic" if i < 5 else "cifar10"
        (d / "config.yaml").write_text(f"data: {{dataset: {ds}}}\n")
        (d / "summary.json").write_text(json.dumps({"val_accuracy": 0.5 + i / 100, "test_accuracy": 0.5,
                                                    "score": 1.0 / (i + 1), "bits_w": 7.9999999, "bits_a": 4.03125}))
        loss = 1e4 if i == 3 else 1.0
        (d / "metrics.jsonl").write_text("".join(json.dumps(
            {"epoch": e, "train_loss": loss / e, "val_loss": loss / e, "train_accuracy": 0.5, "val_accuracy": 0.5,
             **({"step": 1 + e // 3} if i == 7 else {})}) + "\n" for e in range(1, 6)))
    figs = []
    real = report._figure
    monkeypatch.setattr(report, "_figure", lambda *a: figs.append(real(*a)) or figs[-1])
    r = report.build_report([runs], tmp_path / "rep")
    curves, pareto = figs[0], figs[1]
    acc, loss, _ = curves.axes[:3]
    legend = curves.legends[0] if curves.legends else acc.get_legend()
    assert legend is not None and len(legend.get_texts()) == 15
    colors = {to_rgba(line.get_color()) for line in acc.get_lines() if line.get_label() and
              not line.get_label().startswith("_")}
    assert len(colors) == 15
    assert loss.get_yscale() == "log"
    assert all(float(t).is_integer() for t in acc.get_xticks())
    assert any(line.get_linestyle() == ":" for line in acc.get_lines())  # r07's pruning steps
    assert len(pareto.axes[0].texts) >= 1  # front points are named
    assert r["best_per_dataset"] == {"cifar10": "r14", "synthetic": "r04"}
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Best on synthetic: **r04**" in md and "| dataset |" in md.replace("|dataset|", "| dataset |")
    assert "8/4.03" in md and "7.9999" not in md
