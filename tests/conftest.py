"""Shared fixtures: a small phantom written once per test session, and every notebook run once
headless at the smoke preset (read by the notebook tests and the book's browser tests)."""
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


#: the smoke run's parameters, injected into every notebook that declares them
SMOKE = {"preset": "smoke", "seeds": [0, 1], "ablation_seeds": [0], "fewshot_slices": [12, 6], "show_progress": False,
         "sweep_dir": "runs/no-such-sweep",  # notebook 07 then runs its two-unit demo sweep
         "tumour_max_sources": 1}  # notebook 04's tumour cell (off in the main job) runs too


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """Every notebook executed headless with the smoke preset: (run folder, seconds per notebook)."""
    from trm_utils.run_all import run_notebooks

    runs = tmp_path_factory.mktemp("runs")
    data = tmp_path_factory.mktemp("data")
    os.environ["TRM_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    backend = os.environ.get("MPLBACKEND")
    # the kernels draw as `make run`'s do (inline: figures embedded in the executed notebooks), not with the
    # tests' own Agg backend, so the book built from this run has its figures
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    try:
        timings = run_notebooks("smoke", {**SMOKE, "data_dir": str(data)}, runs_dir=runs, log=lambda *a: None)
    finally:
        os.environ.pop("TRM_CACHE_DIR", None)
        if backend is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = backend
    return runs / "smoke", timings
