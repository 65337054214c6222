"""Packaging: pyproject.toml gives setuptools nothing to warn about."""

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
