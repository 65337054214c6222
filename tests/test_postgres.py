"""edlab sweep on a real PostgreSQL server, as a team runs it: one storage, sweeps on several machines.

The test starts its own server (initdb + pg_ctl in a temporary folder, trust authentication on a loopback
port) and stops it at the end. scripts/test.sh installs PostgreSQL with apt (as it does Chromium) and the
driver (edlab[postgres]); without them the test skips and says which is missing."""

import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("optuna")

TINY = ("model: {name: resnet20, width: 0.25}\ndata: {dataset: synthetic, val_size: 64, train_subset: 128, "
        "batch_size: 64}\nepochs: 1\nprecision: fp32\nthreads: 1\n")
STUDY = "name: pg\nconfig: tiny.yaml\ngrid:\n  optim.lr: [0.05, 0.1]\n  data.augment: [none, crop-flip]\n"


def _pg_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(versions[-1]).parent if versions else None


@pytest.fixture(scope="module")
def postgres_url():
    """A fresh PostgreSQL server on a free loopback port; its URL (database 'edlab')."""
    try:
        import psycopg  # the driver SQLAlchemy (hence Optuna) uses for postgresql:// URLs
    except ImportError:
        pytest.skip("no PostgreSQL driver: pip install 'edlab[postgres]' (psycopg)")
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (scripts/test.sh installs it with apt-get)")
    as_user: list[str] = []
    data = Path(tempfile.mkdtemp(prefix="edlab-pg-"))
    if os.geteuid() == 0:  # postgres refuses to run as root: run it as the postgres user
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(data)
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(data, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = data / "db"

    def pg(*cmd, check=True):
        return subprocess.run([*as_user, *map(str, cmd)], capture_output=True, text=True, check=check, timeout=120)

    try:
        pg(bin_dir / "initdb", "-D", db, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        pg(bin_dir / "pg_ctl", "-D", db, "-w", "-l", data / "log", "-o",
           f"-h 127.0.0.1 -p {port} -k {data} -c fsync=off -c max_connections=50", "start")
    except (subprocess.CalledProcessError, OSError) as e:
        shutil.rmtree(data, ignore_errors=True)
        pytest.skip(f"could not start a PostgreSQL server: {getattr(e, 'stderr', '') or e}".strip()[:300])
    try:
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True) as con:
            con.execute("CREATE DATABASE edlab")
        yield f"postgresql://postgres@127.0.0.1:{port}/edlab"
    finally:
        pg(bin_dir / "pg_ctl", "-D", db, "-m", "immediate", "stop", check=False)
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.slow
def test_two_machines_share_one_postgres_study(tmp_path, postgres_url):
    """Two `edlab sweep` worker processes started together, each with its own out folder (as on two
    machines): every point runs exactly once, and both see the whole study."""
    import psycopg

    (tmp_path / "tiny.yaml").write_text(TINY)
    (tmp_path / "study.yaml").write_text(STUDY)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    machines = [subprocess.Popen([sys.executable, "-m", "edlab", "sweep", "study.yaml", "--storage", postgres_url,
                                  "--out", f"machine-{m}"], cwd=tmp_path, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for m in "ab"]
    t0 = time.time()
    outs = [p.communicate(timeout=600) for p in machines]
    for p, (o, e) in zip(machines, outs):
        assert p.returncode == 0, (o[-2000:], e[-2000:])
    reports = [json.loads((tmp_path / f"machine-{m}" / "study.json").read_text()) for m in "ab"]
    for rep in reports:
        done = sorted(t["slot"] for t in rep["trials"] if t["state"] == "COMPLETE")
        assert done == [0, 1, 2, 3], rep["trials"]
        assert rep["storage"].startswith("postgresql://postgres@127.0.0.1")
    ran_on = {Path(t["run_dir"]).parts[0] for t in reports[0]["trials"] if t["state"] == "COMPLETE"}
    assert ran_on <= {"machine-a", "machine-b"}
    for t in reports[0]["trials"]:  # each trial's run folder is where its machine ran it, and finished
        assert (tmp_path / t["run_dir"] / "summary.json").is_file()
    with psycopg.connect(postgres_url) as con:  # the study lives in the server
        assert con.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0] == 4
    workers = {t["worker"] for t in reports[0]["trials"] if t["state"] == "COMPLETE"}
    assert len(workers) <= 2
    print(f"4 trials by {len(workers)} worker process(es) in {time.time() - t0:.0f} s")
