"""The notebooks as users run them: headless through papermill with small injected parameters
(the `smoke` preset), checking what they wrote; their canonical parameters; .py/.ipynb sync."""
import json

import jupytext
import nbformat
import pandas as pd
import papermill as pm
import pytest

from trm_utils.run_all import NOTEBOOKS, summary_text
from trm_utils.utils import REPO_ROOT

NB_DIR = REPO_ROOT / "notebooks"
CANONICAL = {"dataset", "data_dir", "output_dir", "preset", "seeds", "device", "iterations", "show_progress"}
TASK_LISTS = {"tissue_sources", "tissue_targets", "tumour_sources", "tumour_targets"}


@pytest.mark.parametrize("nb", NOTEBOOKS)
def test_canonical_parameters(nb):
    params = pm.inspect_notebook(str(NB_DIR / f"{nb}.ipynb"))
    # papermill lists every parameter (`papermill --help-notebook`): it skips a line holding two "="
    ipynb = nbformat.read(NB_DIR / f"{nb}.ipynb", as_version=4)
    cell = next(c for c in ipynb.cells if "parameters" in c.metadata.get("tags", []))
    import ast
    assigned = {t.id for n in ast.parse(cell.source).body if isinstance(n, ast.Assign) for t in n.targets}
    assert assigned == set(params), f"papermill cannot read {sorted(assigned - set(params))} of {nb}'s parameters"
    if nb == "07_reproduce_paper":  # reads a sweep folder: no data, preset or device of its own
        assert {"sweep_dir", "output_dir", "show_progress"} <= set(params)
        return
    missing = CANONICAL - set(params)
    assert not missing, f"{nb} lacks {missing}"
    if nb in ("02_pixel_leep", "03_risk_maps", "04_weighted_finetuning"):
        assert TASK_LISTS <= set(params)
    assert params["device"]["default"] == '"auto"'
    assert params["dataset"]["default"] == '"phantom"'


@pytest.mark.parametrize("nb", NOTEBOOKS)
def test_ipynb_in_sync_with_py_and_stripped(nb):
    ipynb = nbformat.read(NB_DIR / f"{nb}.ipynb", as_version=4)
    py = jupytext.read(NB_DIR / f"{nb}.py")
    strip = lambda cells: [(c.cell_type, c.source.strip()) for c in cells]
    assert strip(ipynb.cells) == strip(py.cells), f"{nb}.ipynb differs from {nb}.py: run `make sync-notebooks`"
    for c in ipynb.cells:
        if c.cell_type == "code":
            assert not c.outputs and c.execution_count is None, f"{nb}.ipynb carries outputs: strip them"
    tagged = [c for c in ipynb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1


def test_all_notebooks_executed(smoke_run):
    out, timings = smoke_run
    assert list(timings) == NOTEBOOKS
    for nb in NOTEBOOKS:
        executed = nbformat.read(out / f"{nb}.ipynb", as_version=4)
        errors = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors
        # its checked exercises ran, unanswered, without stopping the run
        text = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
        assert text.count("not attempted") >= 2, nb


def test_01_leep_outputs(smoke_run):
    out = smoke_run[0] / "01_leep"
    res = pd.read_csv(out / "leep_vs_accuracy.csv")
    assert len(res) == 6 * 2  # six targets x two seeds
    assert (res.leep <= 0).all() and res.accuracy.between(0, 1).all()
    s = json.loads((out / "summary.json").read_text())
    assert len(s["kendall_tau_per_seed"]) == 2 and all(-1 <= t <= 1 for t in s["kendall_tau_per_seed"])
    assert (out / "leep_vs_accuracy.png").stat().st_size > 1000


def test_02_pixel_leep_outputs(smoke_run):
    out = smoke_run[0] / "02_pixel_leep"
    scores = pd.read_csv(out / "pixel_leep_scores.csv")
    # every grid source against every task of its dataset
    assert len(scores[scores.family == "tissue"]) == 2 * 6 and len(scores[scores.family == "tumour"]) == 2 * 6
    assert (scores.pixel_leep <= 0).all()
    src = pd.read_csv(out / "source_models.csv")
    assert src.own_task_dice.between(0, 1).all() and set(src.status) <= {"flat", "overfit", "rising"}
    # the smoke preset is another model than the carried tutorial sources: trained here, never loaded from results/sources
    assert all(c == "loaded" or c == "trained" or c.startswith("trained in a worker") for c in src.origin)
    assert (out / "tmaps_tissue_GM-T2.png").exists() and (out / "pixel_leep_tissue.png").exists()
    ms = pd.read_csv(out / "map_scores.csv")  # the global score both ways, one row per grid pair
    assert len(ms) == 4 and (ms.pixel_leep_eq3 <= 0).all() and (ms.dataset_map_score <= 1e-6).all()


def test_03_risk_map_outputs(smoke_run):
    out = smoke_run[0] / "03_risk_maps"
    base = pd.read_csv(out / "base_effect.csv")
    assert base.base.tolist() == [2.0, 10.0, 100.0] * 2 and base.reading.tolist() == ["dataset"] * 3 + ["image"] * 3
    assert (base.max_weight <= base.base + 1e-6).all() and (base.mean_weight >= 1).all()
    ve = pd.read_csv(out / "variance_explained.csv")
    cols = ["image_map_by_label_and_prediction", "image_map_by_label_alone", "dataset_map_by_label_and_prediction"]
    assert len(ve) == 4 and ve[cols].apply(lambda c: c.between(0, 1)).all().all()
    assert (ve.image_map_by_label_and_prediction >= ve.image_map_by_label_alone - 1e-9).all()
    assert (out / "steps_one_slice.png").exists() and (out / "histograms.png").exists()


def test_04_grid_outputs(smoke_run):
    out = smoke_run[0] / "04_weighted_finetuning"
    for fam in ("tissue", "tumour"):
        grid = pd.read_csv(out / f"grid_{fam}.csv")
        methods, seeds = ["vanilla", "class_weight", "trs_map", "trm", "trm@map=image"], [0, 1]
        cells = grid[["source", "target"]].drop_duplicates()
        # the tutorial grid: 2 sources (same / cross modality) x 1 target; one tumour cell (tumour_max_sources)
        assert len(cells) == (2 if fam == "tissue" else 1)
        counts = grid.groupby(["source", "target", "method"]).seed.nunique()
        assert len(grid) == len(cells) * len(methods) * len(seeds) and (counts == 2).all()
        assert grid.dice.between(0, 1).all() and grid.dice_before.between(0, 1).all()
        curve = json.loads(grid.curve.iloc[0])
        assert [it for it, _ in curve] == [3, 6]
        s = pd.read_csv(out / f"summary_{fam}.csv").set_index("method")
        assert list(s.index) == methods and s.loc["vanilla", "gain_pct"] == 0
    abl = pd.read_csv(out / "ablation_tissue.csv")
    assert set(abl.method) == {"fg_only", "exp_only"} and abl.dice.between(0, 1).all()
    side = pd.read_csv(out / "paper_vs_ours.csv")
    assert len(side) == 10 and side.paper_dice.between(0, 1).all()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"tissue", "tumour"} and "trm@map=image_gain_pct" in summary["tissue"]
    assert (out / "fig2_risk_before_after.png").exists() and (out / "curves_tissue.png").exists()
    st = pd.read_csv(out / "status_tissue.csv")  # each run's status
    assert len(st) == 2 * 5 * 2 and set(st.status) <= {"flat", "overfit", "rising"}
    assert set(st.columns) >= {"final", "rise", "drop", "below"}
    fig2 = pd.read_csv(out / "fig2_scores.csv")  # Fig. 2 from the grid's own models, dataset reading
    assert fig2.model.tolist() == ["source", "after vanilla", "after TRM"] and (fig2.T_max <= 1e-6).all()
    early = pd.read_csv(out / "early_vs_final_tissue.csv")
    assert len(early) >= 4 and (out / "cell_curves_tumour.png").exists()


def test_05_few_shot_outputs(smoke_run):
    out = smoke_run[0] / "05_few_shot"
    runs = pd.read_csv(out / "fewshot_runs.csv")
    assert sorted(runs.n_slices.unique()) == [6, 12]
    assert len(runs) == 2 * 1 * 2 * 2  # sizes x targets x methods x seeds
    assert (runs.n_train_slices == runs.n_slices).all() and runs.dice.between(0, 1).all()
    assert (runs.subset_seed == runs.seed).all()  # each seed its own labelled subset
    s = pd.read_csv(out / "fewshot_summary.csv")
    assert len(s) == 2 and set(s.columns) >= {"vanilla", "trm", "gain_pct"}


def test_06_transfer_cell_outputs(smoke_run):
    out = smoke_run[0] / "06_transfer_cell"
    runs = pd.read_csv(out / "result.csv")
    assert set(runs.method) == {"vanilla", "trm"} and sorted(runs.seed.unique()) == [0, 1]
    assert set(runs.source) == {"WM-T2"} and set(runs.target) == {"WM-T1"} and set(runs.status) <= {"flat", "overfit", "rising"}
    assert (out / "curves.png").exists()


def test_07_reproduce_paper_demo(smoke_run):
    out = smoke_run[0] / "07_reproduce_paper"
    assert (out / "demo-sweep" / "units").is_dir()
    units = pd.read_csv(out / "report" / "units.csv")
    assert len(units) == 4 and (units.status == "done").all() and sorted(units.factor) == [1, 1, 2, 2]  # + the budget check
    assert "Budget check (2 of 2 sampled cells" in (out / "report" / "report.md").read_text()
    assert (out / "report" / "gain_by_iteration.png").exists()
    grid = pd.read_csv(out / "report" / "table1_iseg2019_grid.csv")
    assert {"trm", "paper_trm", "vanilla_std"} <= set(grid.columns) and (grid.source == "average").sum() == 1
    assert "trm_wins" in (out / "report" / "report.md").read_text()  # wins / ties / losses reported


def test_run_all_summary(smoke_run):
    text = summary_text(smoke_run[0])
    assert "tissue: mean Dice" in text and "trm" in text and "slices: vanilla" in text
    assert "the paper's tables from the sweep" in text and "TRM (dataset-level map)" in text and "EARLY-BUDGET" in text
