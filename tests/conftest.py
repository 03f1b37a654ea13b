"""Shared fixtures: a small phantom written once per test session."""
import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

SMALL = {"preset": "smoke"}


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory):
    from trm_utils.data import make_phantom

    root = tmp_path_factory.mktemp("phantom")
    for kind in ("iseg2019", "fets2021", "msd"):
        make_phantom(kind, root, seed=0, **SMALL)
    return root


@pytest.fixture()
def cache_dir(tmp_path):
    return tmp_path / "cache"
