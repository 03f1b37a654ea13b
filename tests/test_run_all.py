"""The main job's incremental execution: a notebook re-runs only when its content stamp changes."""
import json

import nbformat

from trm_utils.run_all import module_closure, notebook_stamp, run_notebooks


def _notebook(path, body: str):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("output_dir = 'x'\nvalue = 1")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_only_the_changed_notebook_reruns(tmp_path):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _notebook(nbs / "a.ipynb", "print('a', value)")
    _notebook(nbs / "b.ipynb", "from trm_utils import metrics\nprint('b', value)")
    kw = dict(runs_dir=tmp_path / "runs", log=lambda *a: None, nb_dir=nbs, force=False)
    skipped = []
    run_notebooks("t", {"value": 2}, ["a", "b"], skipped=skipped, **kw)
    assert skipped == []
    stamps = json.loads((tmp_path / "runs" / "t" / "stamps.json").read_text())
    assert set(stamps) == {"a", "b"}

    run_notebooks("t", {"value": 2}, ["a", "b"], skipped=skipped, **kw)
    assert skipped == ["a", "b"]  # nothing changed

    _notebook(nbs / "b.ipynb", "from trm_utils import metrics\nprint('b changed', value)")
    skipped = []
    run_notebooks("t", {"value": 2}, ["a", "b"], skipped=skipped, **kw)
    assert skipped == ["a"]  # only b re-executed
    out = nbformat.read(tmp_path / "runs" / "t" / "b.ipynb", as_version=4)
    assert "b changed 2" in out.cells[-1].outputs[0]["text"]

    skipped = []
    run_notebooks("t", {"value": 3}, ["a", "b"], skipped=skipped, **kw)  # a new parameter: both
    assert skipped == []
    run_notebooks("t", {"value": 3}, ["a", "b"], skipped=skipped, runs_dir=tmp_path / "runs", log=lambda *a: None,
                  nb_dir=nbs, force=True)
    assert skipped == []  # force re-executes everything


def test_stamp_follows_the_imported_modules(tmp_path):
    src = "from trm_utils import metrics\nfrom trm_utils.maps import hardness\n"
    mods = module_closure(src)
    assert {"maps", "metrics", "leep", "__init__"} <= set(mods)  # maps imports leep; the package's __init__
    assert "sweep" not in module_closure("from trm_utils.metrics import dice_per_class\n")
    (tmp_path / "n.py").write_text(src)
    a = notebook_stamp("n", {"seed": 0}, tmp_path)
    assert a == notebook_stamp("n", {"seed": 0}, tmp_path) != notebook_stamp("n", {"seed": 1}, tmp_path)
    (tmp_path / "n.py").write_text(src + "# one line more\n")
    assert notebook_stamp("n", {"seed": 0}, tmp_path) != a


def test_an_edited_py_is_what_runs(tmp_path):
    import jupytext

    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _notebook(nbs / "c.ipynb", "print('old', value)")
    jupytext.write(jupytext.read(nbs / "c.ipynb"), nbs / "c.py", fmt="py:percent")
    kw = dict(runs_dir=tmp_path / "runs", log=lambda *a: None, nb_dir=nbs, force=False)
    run_notebooks("t", {}, ["c"], **kw)
    (nbs / "c.py").write_text((nbs / "c.py").read_text().replace("'old'", "'new'"))  # edited, not synced
    skipped = []
    run_notebooks("t", {}, ["c"], skipped=skipped, **kw)
    assert skipped == []
    out = nbformat.read(tmp_path / "runs" / "t" / "c.ipynb", as_version=4)
    assert "new 1" in out.cells[-1].outputs[0]["text"]
    assert "'new'" in nbformat.read(nbs / "c.ipynb", as_version=4).cells[-1].source  # regenerated from the .py


def test_workers_run_the_independent_notebooks_side_by_side(tmp_path):
    import os

    nbs = tmp_path / "nbs"
    nbs.mkdir()
    for n in ("02_pixel_leep", "x", "y"):
        _notebook(nbs / f"{n}.ipynb", "import os, time\nt0 = time.time()\ntime.sleep(2)\n"
                                      "print(os.environ.get('OMP_NUM_THREADS'), round(t0, 2), round(time.time(), 2))")
    before = os.environ.get("OMP_NUM_THREADS")
    run_notebooks("w", {}, ["02_pixel_leep", "x", "y"], runs_dir=tmp_path / "runs", log=lambda *a: None, nb_dir=nbs,
                  workers=2)
    assert os.environ.get("OMP_NUM_THREADS") == before  # restored
    spans = {}
    for n in ("02_pixel_leep", "x", "y"):
        cell = nbformat.read(tmp_path / "runs" / "w" / f"{n}.ipynb", as_version=4).cells[-1]
        threads, start, end = cell.outputs[0]["text"].split()
        spans[n] = (float(start), float(end))
        expected = before if n == "02_pixel_leep" else str(max(1, (os.cpu_count() or 1) // 2))
        assert threads == str(expected), n  # 02 runs first with every core; the rest with their share
    assert spans["02_pixel_leep"][1] <= min(spans["x"][0], spans["y"][0])  # 02 (FIRST) ends before the others start
    assert spans["x"][0] < spans["y"][1] and spans["y"][0] < spans["x"][1]  # x and y overlap in time


def test_stamp_follows_the_committed_checks_a_notebook_reads(tmp_path, monkeypatch):
    """Notebook 04 prints the committed budget checks: a changed check file re-runs it, not notebook 03."""
    from trm_utils import run_all as RA

    cal = tmp_path / "results" / "calibration"
    cal.mkdir(parents=True)
    (cal / "tissue_budget_check.csv").write_text("a\n1\n")
    monkeypatch.setattr(RA, "REPO_ROOT", tmp_path)
    nbs = RA.REPO_ROOT.parent / "nbs"
    nbs.mkdir()
    for nb in ("04_weighted_finetuning", "03_risk_maps"):
        (nbs / f"{nb}.py").write_text("# %%\nx = 1\n")
    before = {nb: RA.notebook_stamp(nb, {}, nbs) for nb in ("04_weighted_finetuning", "03_risk_maps")}
    (cal / "tissue_budget_check.csv").write_text("a\n2\n")
    after = {nb: RA.notebook_stamp(nb, {}, nbs) for nb in ("04_weighted_finetuning", "03_risk_maps")}
    assert after["04_weighted_finetuning"] != before["04_weighted_finetuning"]
    assert after["03_risk_maps"] == before["03_risk_maps"]


def _guard_ast_in_workers(monkeypatch):
    """Make ``ast.parse`` raise outside the main thread (CPython 3.11's AST constructor is not
    thread-safe: python/cpython#106905); returns the list of threads that tried."""
    import ast
    import threading

    real, offenders = ast.parse, []

    def parse(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            offenders.append(threading.current_thread().name)
            raise AssertionError("ast.parse called in a worker thread")
        return real(*args, **kwargs)

    monkeypatch.setattr(ast, "parse", parse)
    return offenders


def _py_notebook(path, body: str):
    """A jupytext .py notebook (so that the runner regenerates its .ipynb: jupytext parses with ast)."""
    path.write_text("# ---\n# jupyter:\n#   kernelspec:\n#     display_name: Python 3\n#     language: python\n"
                    "#     name: python3\n# ---\n\n# %% tags=[\"parameters\"]\noutput_dir = 'x'\nvalue = 1\n\n# %%\n"
                    "from trm_utils import metrics\n" + body + "\n")


def test_workers_never_parse_python(tmp_path, monkeypatch):
    """Syncing, reading parameters and stamping (all of which parse source) happen in the main thread;
    the worker threads only execute. Fresh .py notebooks force every parsing step."""
    offenders = _guard_ast_in_workers(monkeypatch)
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    for n in ("02_pixel_leep", "x", "y", "z"):
        _py_notebook(nbs / f"{n}.py", f"print('{n}', value)")
    timings = run_notebooks("w", {"value": 5}, ["02_pixel_leep", "x", "y", "z"], runs_dir=tmp_path / "runs",
                            log=lambda *a: None, nb_dir=nbs, workers=2)
    assert offenders == []
    assert set(timings) == {"02_pixel_leep", "x", "y", "z"}
    for n in ("x", "y", "z"):
        assert f"{n} 5" in nbformat.read(tmp_path / "runs" / "w" / f"{n}.ipynb", as_version=4).cells[-1].outputs[0]["text"]


def test_a_failing_notebook_is_named_fails_the_run_and_alone_reruns(tmp_path, monkeypatch):
    """A notebook raising in a worker: logged by name as it fails, the one in flight finishes, none
    starts after it, the run fails listing it; the next incremental run re-executes only it and the
    notebook never started."""
    import pytest

    from trm_utils import run_all as RA

    _guard_ast_in_workers(monkeypatch)
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _notebook(nbs / "02_pixel_leep.ipynb", "print('first')")
    _notebook(nbs / "bad.ipynb", "raise ValueError('the phantom folder is empty')")
    _notebook(nbs / "slow.ipynb", "import time\ntime.sleep(4)\nprint('slow done')")
    _notebook(nbs / "later.ipynb", "print('later')")
    names = ["02_pixel_leep", "bad", "slow", "later"]
    logged = []
    kw = dict(runs_dir=tmp_path / "runs", nb_dir=nbs, workers=2, force=False)
    with pytest.raises(RA.NotebookFailures) as info:
        run_notebooks("f", {}, names, log=logged.append, **kw)
    fail = info.value
    assert list(fail.failures) == ["bad"]
    assert fail.failures["bad"]["reason"].startswith("ValueError: the phantom folder is empty")
    assert "the phantom folder is empty" in (tmp_path / "runs" / "f" / "bad.error.txt").read_text()
    assert fail.not_started == ["later"]  # handed out after the failure: never begun
    assert set(fail.timings) == {"02_pixel_leep", "slow"}  # the other lane finished what was in flight
    failed_line = next(i for i, ln in enumerate(logged) if "bad FAILED" in ln)
    assert "bad.error.txt" in logged[failed_line]
    assert failed_line < next(i for i, ln in enumerate(logged) if "slow done" in ln or "slow done in" in ln)
    stamps = json.loads((tmp_path / "runs" / "f" / "stamps.json").read_text())
    assert set(stamps) == {"02_pixel_leep", "slow"}  # a failed notebook leaves no stamp

    _notebook(nbs / "bad.ipynb", "print('fixed')")
    skipped = []
    run_notebooks("f", {}, names, log=lambda *a: None, skipped=skipped, **kw)
    assert sorted(skipped) == ["02_pixel_leep", "slow"]  # only the failed and the never-started re-executed
    assert not (tmp_path / "runs" / "f" / "bad.error.txt").exists()


def test_keep_going_starts_the_rest(tmp_path):
    import pytest

    from trm_utils import run_all as RA

    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _notebook(nbs / "bad.ipynb", "raise RuntimeError('boom')")
    _notebook(nbs / "ok.ipynb", "print('ok')")
    with pytest.raises(RA.NotebookFailures) as info:
        run_notebooks("k", {}, ["bad", "ok"], runs_dir=tmp_path / "runs", nb_dir=nbs, log=lambda *a: None,
                      keep_going=True)
    assert list(info.value.failures) == ["bad"] and info.value.not_started == [] and "ok" in info.value.timings


def test_main_exits_nonzero_and_lists_every_failure(tmp_path, capsys):
    from trm_utils import run_all as RA

    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _notebook(nbs / "x.ipynb", "raise KeyError('seed')")
    _notebook(nbs / "y.ipynb", "raise ZeroDivisionError('no slices')")
    rc = RA.main(["--name", "m", "--runs-dir", str(tmp_path / "runs"), "--notebook-dir", str(nbs),
                  "--notebooks", "x,y", "--workers", "1", "--keep-going"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "2 notebooks failed" in err and "x: FAILED" in err and "y: FAILED" in err and "ZeroDivisionError" in err
    summary = (tmp_path / "runs" / "m" / "summary.txt").read_text()
    assert "FAILED" in summary and "x.error.txt" in summary


def test_a_cell_past_the_timeout_fails_its_notebook(tmp_path):
    """A cell that never ends (here a sleep; in the wild a kernel whose reply was lost) fails its notebook
    after ``cell_timeout`` seconds, named, instead of holding the run for ever."""
    import pytest

    from trm_utils import run_all as RA

    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _notebook(nbs / "slow.ipynb", "import time\ntime.sleep(60)")
    with pytest.raises(RA.NotebookFailures) as info:
        run_notebooks("t", {}, ["slow"], runs_dir=tmp_path / "runs", nb_dir=nbs, log=lambda *a: None, cell_timeout=3)
    assert "slow" in info.value.failures and "Timeout" in info.value.failures["slow"]["reason"]


def test_widget_outputs_stay_in_the_cell_headless(tmp_path):
    """The runner's client does not mirror Output widgets back to the kernel over the shell socket
    (the send that hung notebook 03's explorer cell, jupyter/nbclient#312): what an ``interactive``
    draws is kept as the cell's own output, and the notebook completes."""
    from trm_utils import run_all as RA

    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _notebook(nbs / "w.ipynb", "import ipywidgets as widgets\n"
                               "def f(x):\n    print('drawn', x)\n"
                               "w = widgets.interactive(f, x=widgets.IntSlider(value=3, min=0, max=5))\n"
                               "display(w)")
    run_notebooks("h", {}, ["w"], runs_dir=tmp_path / "runs", nb_dir=nbs, log=lambda *a: None)
    outs = nbformat.read(tmp_path / "runs" / "h" / "w.ipynb", as_version=4).cells[-1].outputs
    assert any("drawn 3" in o.get("text", "") for o in outs), outs
    from types import SimpleNamespace

    client = RA.HeadlessClient(SimpleNamespace(nb=nbformat.v4.new_notebook()))
    assert client.widget_registry == {}
