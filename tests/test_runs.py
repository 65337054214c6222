"""Run folders: runs/latest points at the newest run, replaced atomically (no temp link left behind)."""


def test_runs_latest_points_at_the_newest_run(tmp_path):
    from edlab.runs import Run

    a = Run.create("m", root=str(tmp_path))
    b = Run.create("m", root=str(tmp_path))
    assert (tmp_path / "latest").resolve() == b.path.resolve() != a.path.resolve()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".latest")]
