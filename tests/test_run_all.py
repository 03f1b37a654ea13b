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
