"""Packaging: pyproject.toml gives setuptools nothing to warn about; scripts/test.sh checks its input first."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_gives_setuptools_nothing_to_warn_about():
    """The licence as an SPDX string: a TOML table made setup print 15-line deprecation warnings."""
    import warnings

    from setuptools.config import pyprojecttoml
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pyprojecttoml.apply_configuration(Distribution(), str(ROOT / "pyproject.toml"))
    assert [str(w.message).splitlines()[0] for w in caught] == []


def test_the_test_script_refuses_a_bad_worker_count_before_setting_up(tmp_path):
    """scripts/test.sh checks EDLAB_TEST_WORKERS first: a typo costs one line, not a minute of setup. Run from
    a copy holding only the script, so that were the check late, setup would fail differently."""
    import os
    import shutil
    import subprocess

    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "test.sh", tmp_path / "scripts" / "test.sh")
    for bad in ("x", "-1", "2 3"):
        r = subprocess.run(["bash", str(tmp_path / "scripts" / "test.sh")], capture_output=True, text=True,
                           env={**os.environ, "EDLAB_TEST_WORKERS": bad}, timeout=30)
        assert r.returncode == 2 and r.stdout == "", (bad, r.stdout, r.stderr)
        assert r.stderr.strip() == f"test.sh: EDLAB_TEST_WORKERS must be a number of workers or auto, got '{bad}'"
