"""A sweep's report: the paper's Tables I, II and III regenerated, the paper's numbers beside
ours, and the statistics the paper does not give.

    python -m trm_utils.sweep report OUT      (or notebook 07_reproduce_paper)

Everything is computed from the finished units' ``result.csv`` files (one row per run). What is
reported, per study:

- the grid shaped like the paper's table: Dice per cell as mean ± std over seeds, per-target
  averages, the paper's Dice for the same cell beside (``paper_*`` columns);
- per method: the mean Dice over all cells and its **relative gain over vanilla computed as the
  paper does** (100 x (mean - vanilla mean) / vanilla mean over all table cells), with a
  bootstrap 95 % interval (cells resampled, and seeds within each cell, paired across methods),
  the paper's gain beside;
- TRM against each baseline over cells: win / tie / loss counts (a tie is |difference| <=
  ``TIE`` Dice) and the paired Wilcoxon signed-rank test of the cell means;
- each run's status (``budget.run_status``: flat / overfit / rising on the held-out curve
  smoothed over 3 evaluations) and the runs ending below Dice 0.05, counted per method: a number
  from runs still rising says how fast a method learns, not where it ends;
- the budget check (``budget.compare``, the finished-learning rule v2): on each table's sample of
  cells (``sweep.check_sample``, fixed before any result) each method's mean Dice and gain over
  vanilla at the budget T and at 2T, the drift at 2T and each gain's stability; a table whose check
  fails (a method of the paper's table more than 0.01 higher at 2T) or has none is labelled
  **early-budget** wherever its numbers are printed;
- each method's gain over vanilla read at every evaluation from a quarter of the budget to the end
  (``gain_by_iteration``): whether a gain is one of learning speed or of where the runs end;
- source ranking (Tables I, II): per target, Kendall's tau between each source's pixel-LEEP and
  the Dice fine-tuning from it reached, averaged over targets (only with >= 3 sources);
- seaborn heatmaps of the grids and of the gains.
"""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Optional

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from scipy.stats import kendalltau, wilcoxon

from . import budget as B
from . import findings as F
from . import presets as P
from . import sources as SRC
from . import tables as TB
from .utils import atomic_write_bytes, atomic_write_text, resolve_path

#: The paper's method names (reference/*.csv) -> ours.
PAPER_METHODS = {"vanilla": "vanilla", "class weight": "class_weight", "Trs map": "trs_map", "ours": "trm"}
PAPER_FILE = {("table1", "iseg2019"): "iseg2019", ("table2", "fets2021"): "fets2021", ("table3", "iseg2019"): "fewshot"}
TIE = 0.001
TITLES = {"table1": "Table I (tissue: cross-modality / cross-task)", "table2": "Table II (tumour: cross-centre / cross-modality)",
          "table3": "Table III (few-shot)", "ablations": "Ablations"}


# ----------------------------------------------------------------------------- collecting

def load_sweep(out) -> tuple:
    """(runs, units): every run of the finished units (columns of ``run_grid`` plus ``study``,
    ``uid``, ``hash``), and one row per unit with its status, seconds and error.

    Where a unit was run under several hashes (the code or data changed between runs), the
    latest finished one is used."""
    out = resolve_path(out)
    if not (out / "sweep.json").exists():
        raise FileNotFoundError(f"{out} is not a sweep folder (no sweep.json); run python -m trm_utils.sweep run ... first")
    units, frames = [], []
    for f in sorted((out / "units").glob("*/unit.json")):
        u = json.loads(f.read_text())
        units.append({"uid": u["uid"], "hash": u["hash"], "study": u["unit"]["study"],
                      "factor": int(u["unit"].get("factor", 1)), "status": u["status"],
                      "seconds": u.get("seconds"), "finished": u.get("finished"), "error": u.get("error"), "dir": str(f.parent),
                      "cpu": (u.get("machine") or {}).get("cpu")})
    units = pd.DataFrame(units, columns=["uid", "hash", "study", "factor", "status", "seconds", "finished", "error", "dir",
                                         "cpu"])
    done = units[units.status == "done"].sort_values("finished").drop_duplicates("uid", keep="last")
    for u in done.itertuples():
        r = pd.read_csv(Path(u.dir) / "result.csv")
        r.insert(0, "study", u.study)
        r.insert(1, "uid", u.uid)
        r["hash"] = u.hash
        r["factor"] = u.factor  # 1: the table's runs; > 1: its budget check
        frames.append(r)
    runs = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return runs, units


def provenance(runs: pd.DataFrame, units: pd.DataFrame) -> dict:
    """Where the finished units ran, and whether each source model is one model throughout.

    ``machines``: CPU model -> units (``unknown`` for units whose ``unit.json`` predates the record).
    ``sources``: one row per (dataset, source) whose units saw more than one source model, told
    apart by the source's held-out Dice on its own task (``source_dice``, written by notebook 06):
    a sweep resumed where the source cache was not carried along retrains its sources, and on
    another CPU the retrained model differs in its last bits. A budget check or a grid that mixes
    two models of one source compares unlike with unlike in those cells; the rows name them."""
    done = units[units.status == "done"].drop_duplicates("uid", keep="last")
    machines = done.cpu.fillna("unknown").value_counts().to_dict() if len(done) else {}
    rows = []
    if len(runs) and "source_dice" in runs:
        per_unit = runs.groupby(["dataset", "source", "uid"], sort=False).source_dice.first().reset_index()
        for (name, src), g in per_unit.groupby(["dataset", "source"], sort=False):
            versions = g.groupby(g.source_dice.round(12), sort=False).uid.apply(list)
            if len(versions) > 1:
                rows.append({"dataset": name, "source": src, "models": len(versions),
                             "source_dice": ", ".join(f"{d:.4f}" for d in versions.index),
                             "units": " | ".join(", ".join(sorted(u)) for u in versions.values)})
    return {"machines": machines, "sources": pd.DataFrame(rows, columns=["dataset", "source", "models", "source_dice", "units"])}


def machines_line(prov: dict) -> str:
    """``provenance``'s machines in one line: ``CPU: units; ...``."""
    return "; ".join(f"{k}: {v}" for k, v in prov["machines"].items())


def settings_of(out) -> dict:
    return json.loads((resolve_path(out) / "sweep.json").read_text())


# ----------------------------------------------------------------------------- tables

def _cell_keys(study: str) -> list:
    return ["n_slices", "target", "source"] if study == "table3" else ["target", "source"]


def paper_grid(study: str, name: str) -> pd.DataFrame:
    """The paper's Dice for ``study`` in our method names (empty where the paper has none)."""
    which = PAPER_FILE.get((study, name))
    if which is None:
        return pd.DataFrame(columns=["target", "source", "method", "dice"])
    t = TB.paper_table(which).copy()
    t["method"] = t.method.map(PAPER_METHODS)
    if study == "table3":
        t["source"] = "CSF-T1"
    return t


def grid_table(runs: pd.DataFrame, study: str, sizes_map: dict | None = None) -> pd.DataFrame:
    """The study's grid shaped like the paper's table: one row per cell (and one ``average`` row
    per target, or per size for Table III), ``<method>`` = mean Dice over seeds, ``<method>_std``,
    and ``paper_<method>`` where the paper has that cell."""
    keys = _cell_keys(study)
    r = runs.copy()
    methods = list(dict.fromkeys(r.method))
    g = r.groupby(keys + ["method"]).dice
    mean, std = g.mean().unstack("method")[methods], g.std(ddof=1).unstack("method")[methods]
    table = mean.join(std.add_suffix("_std")).reset_index()
    avg_key = "n_slices" if study == "table3" else "target"
    # per-target (per-size) averages: mean over cells of each seed's mean, then over seeds
    per_seed = r.groupby([avg_key, "method", "seed"]).dice.mean()
    am = per_seed.groupby([avg_key, "method"]).mean().unstack("method")[methods]
    asd = per_seed.groupby([avg_key, "method"]).std(ddof=1).unstack("method")[methods].add_suffix("_std")
    avg = am.join(asd).reset_index()
    for k in keys:
        if k != avg_key:
            avg[k] = "average"
    table = pd.concat([table, avg[table.columns]], ignore_index=True)
    name = r.dataset.iloc[0]
    paper = paper_grid(study, name)
    if len(paper):
        p = paper.copy()
        if study == "table3":
            p = p.rename(columns={"n_slices": "paper_n_slices"})
            p["paper_n_slices"] = p.paper_n_slices.astype(int)
            table["paper_n_slices"] = table.n_slices.map(sizes_map or {}).astype("Int64")
            pk = ["paper_n_slices", "target"]
            p.loc[p.target == "average", "source"] = "average"
        else:
            pk = ["target", "source"]
        pw = p.pivot_table(index=pk, columns="method", values="dice").add_prefix("paper_").reset_index()
        table = table.merge(pw, on=pk, how="left")
        # an average row's paper numbers: the paper's mean over the same cells as ours (a partial
        # grid is compared with the same part of the paper's)
        pcols = [c for c in table.columns if c.startswith("paper_") and c != "paper_n_slices"]
        cells = table[table.source != "average"] if study != "table3" else table[table.target != "average"]
        for i, row in table.iterrows():
            if study != "table3" and row.source == "average":
                table.loc[i, pcols] = cells[cells.target == row.target][pcols].mean().values
            elif study == "table3" and row.target == "average":
                table.loc[i, pcols] = cells[cells.n_slices == row.n_slices][pcols].mean().values
    # each method's Dice, its spread and the paper's Dice for the cell side by side
    cols = [c for c in keys if c in table] + (["paper_n_slices"] if "paper_n_slices" in table else [])
    for m in methods:
        cols += [c for c in (m, f"{m}_std", f"paper_{m}") if c in table]
    table = table[cols + [c for c in table.columns if c not in cols]]
    order = {t: i for i, t in enumerate(P.PAPER_TASKS.get(name, []))}
    table["_t"] = table.target.map(lambda t: order.get(t, 99))
    table["_s"] = table.source.map(lambda s: 100 if s == "average" else order.get(s, 99))
    if study == "table3":
        table = table.sort_values(["n_slices", "_t"], ascending=[False, True])
    else:
        table = table.sort_values(["_t", "_s"])
    return table.drop(columns=["_t", "_s"]).reset_index(drop=True)


def cell_matrix(runs: pd.DataFrame, study: str, method: str) -> np.ndarray:
    """Dice of ``method`` as cells x seeds (cells in a fixed order shared by every method)."""
    keys = _cell_keys(study)
    m = runs[runs.method == method].pivot_table(index=keys, columns="seed", values="dice")
    return m.sort_index()


def bootstrap_gain(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple:
    """95 % interval of 100 x (mean(a) - mean(b)) / mean(b), cells x seeds arrays paired by
    position: resample cells with replacement, then seeds within each resampled cell (the same
    seeds for both methods, as the runs of one seed share their subset and initialisation)."""
    rng = np.random.default_rng(seed)
    c, s = a.shape
    ic = rng.integers(0, c, (n_boot, c))
    iseed = rng.integers(0, s, (n_boot, c, s))
    ra, rb = a[ic[..., None], iseed].mean(axis=(1, 2)), b[ic[..., None], iseed].mean(axis=(1, 2))
    g = 100 * (ra - rb) / rb
    return float(np.nanpercentile(g, 2.5)), float(np.nanpercentile(g, 97.5))


def wilcoxon_p(x: np.ndarray, y: np.ndarray) -> float:
    """Two-sided paired Wilcoxon signed-rank p over cells; NaN with fewer than 3 cells or no difference."""
    d = np.asarray(x) - np.asarray(y)
    if len(d) < 3 or np.allclose(d, 0):
        return float("nan")
    return float(wilcoxon(x, y).pvalue)


def gains_table(runs: pd.DataFrame, study: str, reference: str = "trm", n_boot: int = 2000) -> pd.DataFrame:
    """Per method: mean Dice over cells, spread over seeds, relative gain over vanilla (the paper's
    headline) with its bootstrap 95 % interval, and ``reference`` (TRM) against this method:
    wins / ties / losses over cells and the Wilcoxon p."""
    methods = list(dict.fromkeys(runs.method))
    mats = {m: cell_matrix(runs, study, m) for m in methods}
    base = mats.get("vanilla")
    rows = []
    for m in methods:
        a = mats[m]
        per_seed = a.mean(axis=0)
        row = {"method": m, "n_cells": a.shape[0], "n_seeds": a.shape[1], "dice_mean": float(a.values.mean()),
               "dice_std_over_seeds": float(per_seed.std(ddof=1)) if a.shape[1] > 1 else float("nan")}
        if base is not None and base.index.equals(a.index):
            v = base.values
            row["gain_pct"] = 100 * (a.values.mean() - v.mean()) / v.mean()
            # no interval over fewer than 3 cells (resampling 2 cells gives an interval of nothing)
            row["gain_ci_low"], row["gain_ci_high"] = ((0.0, 0.0) if m == "vanilla" else bootstrap_gain(a.values, v, n_boot)
                                                       if a.shape[0] >= 3 else (float("nan"), float("nan")))
            if m != "vanilla":  # this method against vanilla over cells (both readings of TRM get theirs)
                d = a.values.mean(axis=1) - v.mean(axis=1)
                row["vs_vanilla_wins"] = int((d > TIE).sum())
                row["vs_vanilla_ties"] = int((np.abs(d) <= TIE).sum())
                row["vs_vanilla_losses"] = int((d < -TIE).sum())
                row["vs_vanilla_wilcoxon_p"] = wilcoxon_p(a.values.mean(axis=1), v.mean(axis=1))
        if reference in mats and m != reference and mats[reference].index.equals(a.index):
            d = mats[reference].values.mean(axis=1) - a.values.mean(axis=1)
            row[f"{reference}_wins"] = int((d > TIE).sum())
            row[f"{reference}_ties"] = int((np.abs(d) <= TIE).sum())
            row[f"{reference}_losses"] = int((d < -TIE).sum())
            row[f"{reference}_wilcoxon_p"] = wilcoxon_p(mats[reference].values.mean(axis=1), a.values.mean(axis=1))
        rows.append(row)
    out = pd.DataFrame(rows).set_index("method")
    name = runs.dataset.iloc[0]
    paper = paper_grid(study, name)
    if len(paper) and study != "table3":
        # the paper's mean over the same cells as ours (all of them for a full grid)
        ours = runs[["target", "source"]].drop_duplicates()
        p = paper[paper.source != "average"].merge(ours, on=["target", "source"]).groupby("method").dice.mean()
        out["paper_dice_mean"] = p.reindex(out.index)
        if "vanilla" in p:
            out["paper_gain_pct"] = 100 * (out.paper_dice_mean - p["vanilla"]) / p["vanilla"]
    return out


def fewshot_gains(runs: pd.DataFrame, sizes_map: dict, n_boot: int = 2000) -> pd.DataFrame:
    """Table III's gains per size (and the paper's at the matching size)."""
    frames = {}
    for n, g in runs.groupby("n_slices"):
        frames[int(n)] = gains_table(g, "table3", n_boot=n_boot)
    out = pd.concat(frames, names=["n_slices"])
    paper = paper_grid("table3", "iseg2019")
    if len(paper):
        p = paper[paper.target == "average"].pivot_table(index="n_slices", columns="method", values="dice")
        pg = 100 * (p["trm"] - p["vanilla"]) / p["vanilla"]
        idx = out.index.get_level_values(0).map(lambda n: sizes_map.get(n))
        out["paper_n_slices"] = idx
        out["paper_gain_pct"] = [pg.get(k, np.nan) if m == "trm" else (0.0 if m == "vanilla" else np.nan)
                                 for k, m in zip(idx, out.index.get_level_values(1))]
    return out


def status_counts(runs: pd.DataFrame) -> pd.DataFrame:
    """Per study, dataset and method: runs, how many are flat / overfit / rising (``budget.run_status``),
    how many ended below Dice 0.05, and the largest overfitting drop (per dataset because a study such
    as the ablations spans the tissue and the tumour families)."""
    return B.status_counts(runs, by=("study", "dataset", "method"))


def source_ranking(runs: pd.DataFrame, method: str = "vanilla") -> pd.DataFrame:
    """Per target: Kendall's tau between the sources' pixel-LEEP and the Dice fine-tuning from
    them reached with ``method`` (mean over seeds). NaN where a target has fewer than 3 sources."""
    rows = []
    r = runs[runs.method == method]
    for t, g in r.groupby("target", sort=False):
        cell = g.groupby("source").agg(pixel_leep=("pixel_leep", "first"), dice=("dice", "mean"))
        tau, p = (kendalltau(cell.pixel_leep, cell.dice) if len(cell) >= 3 else (np.nan, np.nan))
        rows.append({"target": t, "n_sources": len(cell), "kendall_tau": float(tau), "p": float(p),
                     "best_by_leep": cell.pixel_leep.idxmax(), "best_by_dice": cell.dice.idxmax()})
    return pd.DataFrame(rows)


def budget_check(runs: pd.DataFrame, checks: pd.DataFrame, planned: Optional[list] = None) -> Optional[dict]:
    """The finished-learning rule on a table's sample: ``checks`` (the sample's runs at 2T, one
    study) against ``runs``' runs of the same cells at T. Returns ``{"table": budget.compare's
    table, "cells": n, "planned": n planned, "complete": bool, "accepted": bool}`` (None with no
    check run). Only cells finished at both budgets with the same source model (the same
    ``source_dice``, where recorded) are compared: a cell whose 2T unit ran with a retrained source
    (``provenance``) compares unlike with unlike and is left out, named in ``unlike``. ``accepted``
    needs every planned cell (an incomplete check accepts nothing)."""
    none_run = checks is None or checks.empty
    if none_run and not planned:
        return None
    keys = ["source", "target", "n_slices"]
    cells = None if none_run else checks[keys].drop_duplicates().merge(runs[keys].drop_duplicates(), on=keys)
    unlike = []
    if cells is not None and not cells.empty and "source_dice" in runs and "source_dice" in checks:
        src = lambda df: df.groupby(keys, dropna=False).source_dice.first().round(12).rename("sd").reset_index()
        m = src(runs.merge(cells, on=keys)).merge(src(checks.merge(cells, on=keys)), on=keys, suffixes=("_T", "_2T"))
        bad = m[(m.sd_T != m.sd_2T) & m.sd_T.notna() & m.sd_2T.notna()]
        unlike = [f"{r.source} -> {r.target}" + (f" ({int(r.n_slices)} slices)" if pd.notna(r.n_slices) else "")
                  for r in bad.itertuples()]
        cells = cells.merge(bad[keys], on=keys, how="left", indicator=True)
        cells = cells[cells._merge == "left_only"].drop(columns="_merge")
    if cells is None or cells.empty:
        return {"table": None, "cells": 0, "planned": len(planned or []), "complete": False, "accepted": False,
                "unlike": unlike}
    t = runs.merge(cells, on=keys).assign(budget="T")
    c = checks.merge(cells, on=keys).assign(budget="2T")
    both = pd.concat([t, c], ignore_index=True)
    both["family"] = both.dataset
    if both.n_slices.isna().all():
        both = both.drop(columns="n_slices")
    table = B.compare(both)
    n_planned = len(planned) if planned else len(cells)
    complete = len(cells) >= n_planned
    return {"table": table, "cells": len(cells), "planned": n_planned, "complete": complete,
            "accepted": bool(complete and table.accepted.iloc[0]), "unlike": unlike}


def check_label(chk: Optional[dict]) -> str:
    """The label a table's numbers carry: ``budget checked`` or ``EARLY-BUDGET (...)`` with the figures."""
    if chk is None:
        return "EARLY-BUDGET (unchecked: no budget-check units in this sweep)"
    if chk["table"] is None:
        return f"EARLY-BUDGET (budget check not run yet: 0 of {chk['planned']} sampled cells done at both budgets)"
    t = chk["table"]
    its = f"{int(t.iterations_T.iloc[0])} vs {int(t.iterations_2T.iloc[0])} iterations"
    g = t[t.gated] if "gated" in t and t.gated.any() else t
    gain = t.d_gain.abs().max()
    fall = g.d_dice.min()
    size = (f"largest change of a table method's mean Dice {g.d_dice.max():+.4f} (rule v2: at most +{B.DICE_TOL})"
            + (f", largest fall {fall:+.4f} (overfitting: drift, not a failure)" if fall < -B.DICE_TOL else "")
            + f"; gains move at most {gain:.2f} points ({'stable' if gain <= B.GAIN_TOL else 'some depend on the budget'})")
    if not chk["complete"]:
        why = (f"; {len(chk['unlike'])} left out, their 2T run had another model of its source: {', '.join(chk['unlike'])}"
               if chk.get("unlike") else "")
        return (f"EARLY-BUDGET (budget check incomplete: {chk['cells']} of {chk['planned']} cells at {its}{why}; "
                f"so far {size})")
    if chk["accepted"]:
        return f"budget checked ({chk['cells']} cells, {its}: {size})"
    return f"EARLY-BUDGET (budget check NOT passed on {chk['cells']} cells, {its}: {size})"


def search_so_far(settings: dict, every: pd.DataFrame, study: str, dataset: str) -> str:
    """For a table whose budget search has not ended (``sweep.json`` records a search's steps under
    ``budgets`` only when it ends): its latest finished step, judged by rule v2 (``budget.compare``)
    on the sample's runs at k and 2k x the preset's budget, as a clause for the table's label. '' when
    the search has ended, the sweep ran without one, or no step has both budgets complete."""
    if study in (settings.get("budgets") or {}) or not len(every) or "factor" not in every:
        return ""
    uids = set((settings.get("budget_check") or {}).get(study) or [])
    e = every[(every.study == study) & (every.dataset == dataset) & every.uid.isin(uids)]
    if e.empty:
        return ""
    listed = pd.Series([_uid_factor(u) for u in uids]).value_counts()  # the sample's units per factor
    done = e.groupby("factor").uid.nunique()
    complete = {k for k, n in done.items() if n == listed.get(k, -1)}
    steps = [k for k in sorted(complete) if 2 * k in complete]
    if not steps:
        return ""
    k = steps[-1]
    both = pd.concat([e[e.factor == k].assign(budget="T"), e[e.factor == 2 * k].assign(budget="2T")],
                     ignore_index=True).assign(family=dataset)
    if "n_slices" in both and both.n_slices.isna().all():
        both = both.drop(columns="n_slices")
    t = B.compare(both)
    g = t[t.gated] if t.gated.any() else t
    return (f"; budget search in progress: {len(steps)} step{'s' if len(steps) > 1 else ''} checked, the last "
            f"{int(t.iterations_T.iloc[0])} vs {int(t.iterations_2T.iloc[0])} iterations "
            f"{'accepted' if bool(t.accepted.iloc[0]) else 'not accepted'} (largest rise {g.d_dice.max():+.4f})")


def check_view(chk: dict) -> pd.DataFrame:
    """A budget check's table as the report and notebook 07 show it: per (size,) method, both
    budgets' mean Dice and gain, the changes and the verdict (``n_slices`` only for Table III)."""
    cols = ["n_slices", "method", "iterations_T", "iterations_2T", "dice_mean_T", "dice_mean_2T", "d_dice", "drift",
            "gain_pct_T", "gain_pct_2T", "d_gain", "gain_stable", "gated", "ok"]
    tb = chk["table"][[c for c in cols if c in chk["table"]]]
    return tb.drop(columns="n_slices") if "n_slices" in tb and tb.n_slices.isna().all() else tb


def progress(settings: dict, units: pd.DataFrame) -> pd.DataFrame:
    """Per study, of the units ``sweep.json`` planned (``planned``: the table's; ``budget_check``:
    its check's): how many are done and the uids still missing. Empty for a sweep that recorded no plan."""
    done = set(units[units.status == "done"].uid)
    rows = [{"kind": "table" if kind == "planned" else "budget check", "study": st, "planned": len(us),
             "done": sum(u in done for u in us), "missing": [u for u in us if u not in done]}
            for kind in ("planned", "budget_check") for st, us in (settings.get(kind) or {}).items()]
    return pd.DataFrame(rows, columns=["kind", "study", "planned", "done", "missing"])


def unit_kinds(settings: dict, units: pd.DataFrame) -> pd.Series:
    """Each unit's part of the sweep, for counting: ``table (xK)`` where ``sweep.json`` plans it for
    its study's table, else ``budget check (xK)`` (a budget search's sample or a table's 2T check);
    K is the multiple of the preset's budget it ran at. A table found at 4x is ``table (x4)``, and its
    sample's 1x units are checks."""
    planned = {u for us in (settings.get("planned") or {}).values() for u in us}
    return pd.Series([f"{'table' if u in planned else 'budget check'} (x{int(f)})"
                      for u, f in zip(units.uid, units.factor)], index=units.index, name="kind")


def paper_trm_gain(s: dict) -> float:
    """The paper's TRM gain over vanilla for a study of ``build_report`` (NaN where it has none)."""
    g = s.get("gains_all", s["gains"])
    return g.loc["trm", "paper_gain_pct"] if "paper_gain_pct" in g and "trm" in g.index else np.nan


def gain_by_iteration(runs: pd.DataFrame, start_fraction: float = 0.25) -> pd.DataFrame:
    """Each method's mean held-out Dice and relative gain over vanilla read at every evaluation
    from ``start_fraction`` of the budget to its end (``tables.dice_at`` on the stored curves:
    the same runs, read early). One row per (method, iteration); the last is the table's number."""
    last = int(runs.iterations.max())
    its = sorted({int(i) for c in runs.curve for i, _ in json.loads(c) if int(i) >= start_fraction * last})
    rows = []
    for it in its:
        g = TB.dice_at(runs, it).groupby("method", sort=False).dice.mean()
        for m, d in g.items():
            rows.append({"method": m, "iteration": it, "dice_mean": float(d),
                         "gain_pct": 100 * (d - g["vanilla"]) / g["vanilla"] if "vanilla" in g else np.nan})
    return pd.DataFrame(rows, columns=["method", "iteration", "dice_mean", "gain_pct"])


# ----------------------------------------------------------------------------- figures

def gain_by_iteration_figure(studies: dict):
    """One panel per table (``studies``: ``build_report``'s, those with a ``gain_by_iteration``
    frame): each method's gain over vanilla (%) against the iteration at which the runs are read;
    the paper's TRM gain dashed. A gain that shrinks towards the end is one of learning speed; a
    stable one, of where runs end."""
    curves = {k: s["gain_by_iteration"] for k, s in studies.items() if len(s.get("gain_by_iteration", []))}
    fig, axes = F.gain_panels(curves, "iteration", {k: paper_trm_gain(studies[k]) for k in curves}, marker=".",
                              trm_lw=2.2)
    for key, ax in axes.items():
        ax.set_xlabel("iteration the runs are read at")
        ax.set_ylabel("gain over vanilla (%)")
        ax.set_title(key, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle("Gain over vanilla against the iteration it is read at (mean over cells and seeds)", fontsize=10)
    fig.tight_layout()
    return fig


def grid_heatmaps(runs: pd.DataFrame, study: str, title: str = ""):
    """One panel per method of the grid's Dice (target rows, source columns), and one of TRM's
    relative gain over vanilla per cell (the paper's gain beside, where it has the grid)."""
    warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)  # the empty diagonal
    methods = list(dict.fromkeys(runs.method))
    name = runs.dataset.iloc[0]
    order = [t for t in P.PAPER_TASKS.get(name, []) if t in set(runs.target) | set(runs.source)]
    mats = {m: runs[runs.method == m].pivot_table(index="target", columns="source", values="dice")
            .reindex(index=[t for t in order if t in set(runs.target)], columns=[s for s in order if s in set(runs.source)])
            for m in methods}
    extra = [m for m in ("trm",) if m in mats and "vanilla" in mats]
    paper = paper_grid(study, name)
    has_paper = len(paper) and extra
    n = len(methods) + len(extra) + (1 if has_paper else 0)
    ncol = min(n, 3)
    nrow = -(-n // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.6 * nrow), squeeze=False)
    axes = axes.ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    axes = axes[:n]
    vmin = min(np.nanmin(m.values) for m in mats.values())
    vmax = max(np.nanmax(m.values) for m in mats.values())
    for ax, m in zip(axes, methods):
        sns.heatmap(mats[m], annot=True, fmt=".2f", vmin=vmin, vmax=vmax, cmap="viridis", cbar=False, ax=ax,
                    annot_kws={"size": 7})
        ax.set_title(m)
    if extra:
        gain = 100 * (mats["trm"] - mats["vanilla"]) / mats["vanilla"]
        # the colour scale from the finite gains, at most +-50 %: a cell where vanilla ended near 0 gives
        # a gain of thousands of % (or inf), which would wash every other cell (and the paper's) out
        finite = np.abs(gain.values[np.isfinite(gain.values)])
        lim = float(min(finite.max(), 50.0)) if finite.size and finite.max() > 0 else 1.0
        sns.heatmap(gain, annot=True, fmt="+.1f", center=0, vmin=-lim, vmax=lim, cmap="RdBu", cbar=False,
                    ax=axes[len(methods)], annot_kws={"size": 7})
        for i, j in zip(*np.where(np.isinf(gain.values))):  # seaborn leaves non-finite cells blank
            axes[len(methods)].text(j + 0.5, i + 0.5, "inf", ha="center", va="center", fontsize=7)
        axes[len(methods)].set_title("ours: TRM vs vanilla (%)")
        if has_paper:
            p = paper[paper.source != "average"].pivot_table(index=["target", "source"], columns="method", values="dice")
            pg = (100 * (p["trm"] - p["vanilla"]) / p["vanilla"]).unstack("source").reindex_like(gain)
            sns.heatmap(pg, annot=True, fmt="+.1f", center=0, vmin=-lim, vmax=lim, cmap="RdBu", cbar=False,
                        ax=axes[-1], annot_kws={"size": 7})
            axes[-1].set_title("paper: TRM vs vanilla (%)")
    fig.suptitle(title or TITLES.get(study, study))
    fig.tight_layout()
    return fig


def fewshot_figure(runs: pd.DataFrame):
    per_seed = runs.groupby(["n_slices", "method", "seed"]).dice.mean().reset_index()
    per_seed["n_slices"] = per_seed.n_slices.astype(int)  # a float column where other studies left NaN
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    sns.pointplot(per_seed, x="n_slices", y="dice", hue="method", hue_order=list(dict.fromkeys(runs.method)),
                  errorbar="sd", dodge=0.25, ax=ax)
    ax.set_xlabel("target training slices")
    ax.set_ylabel("held-out Dice (mean over targets)")
    ax.set_title(f"Table III: bars = std over seeds {sorted(runs.seed.unique().tolist())}")
    fig.tight_layout()
    return fig


def ablation_figure(gains: pd.DataFrame, title: str = "Ablations"):
    """Each variant's relative gain over vanilla (%) with its bootstrap 95 % interval, one bar per
    variant (``gains`` as ``gains_table`` gives it): which part of TRM carries its effect, and
    whether the base matters. A grid of 2 cells says little as a heatmap."""
    g = gains.reset_index()
    g = g[g.method != "vanilla"].iloc[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(g) + 1.2))
    colors = ["tab:red" if m == "trm" else "tab:gray" for m in g.method]
    err = np.nan_to_num(np.vstack([g.gain_pct - g.gain_ci_low, g.gain_ci_high - g.gain_pct]).clip(min=0))
    ax.barh(g.method, g.gain_pct, xerr=err if g.gain_ci_low.notna().any() else None, color=colors, capsize=3)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("gain over vanilla (%), bars: 95 % bootstrap interval" if g.gain_ci_low.notna().any()
                  else "gain over vanilla (%); no interval over fewer than 3 cells")
    ax.set_title(f"{title} ({int(g.n_cells.max())} cells x {int(g.n_seeds.max())} seeds)")
    fig.tight_layout()
    return fig


def study_figure(s: dict):
    """The figure of one study of ``build_report`` (``s`` = ``rep["studies"][key]``): Table III's
    Dice against the number of slices, the ablations' gains, a grid's heatmaps otherwise."""
    if s["study"] == "table3":
        return fewshot_figure(s["runs"])
    title = f"{TITLES.get(s['study'], s['study'])}: {s['dataset']}"
    if s["study"] == "ablations":
        return ablation_figure(s["gains"], title)
    return grid_heatmaps(s["runs"], s["study"], title)


# ----------------------------------------------------------------------------- the report

def markdown(df: pd.DataFrame, digits: int = 4, index: bool = False) -> str:
    """A pipe table (no extra dependency)."""
    d = df.reset_index() if index else df
    counts = ("wins", "ties", "losses", "n_", "runs", "flat", "overfit", "rising", "below", "seeds")

    def fmt(v, col):
        if v is None or v is pd.NA:
            return ""
        if isinstance(v, (float, np.floating)):
            if np.isnan(v):
                return ""
            if float(v).is_integer() and any(k in col for k in counts):
                return str(int(v))
            if col == "p" or col.endswith("_p"):
                return f"{v:.2g}"
            return f"{v:.{digits}f}"
        return str(v)
    cols = [str(c) for c in d.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(v, c) for v, c in zip(row, cols)) + " |" for row in d.itertuples(index=False)]
    return "\n".join(lines)


def fewshot_sizes_map(settings: dict, runs: pd.DataFrame) -> dict:
    """Our few-shot sizes -> the paper's (400 / 100 / 50), largest to largest."""
    ours = sorted({int(n) for n in runs.n_slices.dropna()}, reverse=True)
    return {n: p for n, p in zip(ours, [400, 100, 50])}


def build_report(out, n_boot: int = 2000) -> dict:
    """Every table of the report as DataFrames (and the units' status): what notebook 07 shows."""
    runs, units = load_sweep(out)
    settings = settings_of(out)
    prov = provenance(runs, units)  # over every unit, the budget checks' included
    prov["carried"] = carried_sources(out, runs)
    every = runs
    if len(runs):
        tf = np.array([table_factor(settings, st, name) for st, name in zip(runs.study, runs.dataset)])
        checks = runs[(runs.factor.values == 2 * tf) & (runs.study != "ablations").values]
        runs = runs[runs.factor.values == tf]
    else:
        checks = runs
    rep = {"settings": settings, "units": units, "runs": runs, "check_runs": checks, "studies": {},
           "progress": progress(settings, units), "provenance": prov}
    if runs.empty:
        return rep
    rep["status"] = status_counts(runs)
    if len(checks):
        rep["check_status"] = status_counts(checks)
    planned = settings.get("budget_check") or {}
    for study, r in runs.groupby("study", sort=False):
        for name, rr in r.groupby("dataset", sort=False):
            key = f"{study}_{name}"
            s = {"study": study, "dataset": name, "runs": rr}
            if study != "ablations":
                tf = table_factor(settings, study, name)
                cc = checks[(checks.study == study) & (checks.dataset == name)] if len(checks) else None
                mine = [u for u in planned.get(study, []) if _uid_factor(u) == 2 * tf] if planned.get(study) else None
                s["budget_check"] = budget_check(rr, cc, mine)
                s["label"] = (check_label(s["budget_check"]) + search_so_far(settings, every, study, name)
                              + sources_note(prov["carried"], rr))
                s["table_factor"] = tf
                s["search"] = (settings.get("budgets") or {}).get(study)
                s["ladder"] = F.budget_ladder(every[(every.study == study) & (every.dataset == name)])
                s["gain_by_iteration"] = gain_by_iteration(rr)
            if study == "table3":
                smap = fewshot_sizes_map(settings, rr)
                s["grid"] = grid_table(rr, study, smap)
                s["gains"] = fewshot_gains(rr, smap, n_boot)
                s["gains_all"] = gains_table(rr, study, n_boot=n_boot)
            else:
                s["grid"] = grid_table(rr, study)
                s["gains"] = gains_table(rr, study, n_boot=n_boot)
                if study != "ablations":
                    s["ranking"] = source_ranking(rr)
            rep["studies"][key] = s
    tables = {k: s["runs"] for k, s in rep["studies"].items() if s["study"] != "ablations"}
    early = [k for k, st in rep["studies"].items()
             if st["study"] != "ablations" and not (st.get("budget_check") or {}).get("accepted")]
    rep["helps_cells"], rep["helps"] = F.where_trm_helps(tables, n_boot=n_boot, early=early)
    return rep


def table_factor(settings: dict, study: str, dataset: str) -> int:
    """The multiple of the preset's budget a study's table ran at (``sweep.find_budget``, recorded in
    ``sweep.json``; 1 for a sweep from before the search). The ablations take their family's table's:
    Table I's for the tissue data, Table II's for the tumour data."""
    budgets = settings.get("budgets") or {}
    if study == "ablations":
        study = "table1" if dataset == "iseg2019" else "table2"
    return int((budgets.get(study) or {}).get("table_factor") or 1)


def _uid_factor(uid: str) -> int:
    """The budget multiple a unit's name carries (``-x4``), 1 without one."""
    tail = uid.rsplit("-", 1)[-1]
    return int(tail[1:]) if tail.startswith("x") and tail[1:].isdigit() else 1


def carried_sources(out, runs: pd.DataFrame) -> pd.DataFrame:
    """The sweep's own source models (``OUT/sources/``, ``sweep.prepare_sources``): per source its
    own-task Dice, budget, rule-1 verdict and SHA-256, the units that used it, and whether it is one
    model throughout (every run of the source names this file's SHA-256). Empty for a sweep
    without them."""
    folder = resolve_path(out) / "sources"
    if not folder.exists():
        return pd.DataFrame()
    rows = []
    for rec in SRC.carried_records(folder):
        row = SRC.record_summary(rec)
        mine = runs[(runs.dataset == row["dataset"]) & (runs.source == row["source"])] if len(runs) else runs
        shas = set(mine.source_sha256.dropna()) if "source_sha256" in mine else set()
        trained_on = row.pop("trained_on")
        rows.append({**row, "units": int(mine.uid.nunique()) if len(mine) else 0, "one_model": shas <= {rec["sha256"]},
                     "trained_on": trained_on})
    return pd.DataFrame(rows)


def sources_note(carried: pd.DataFrame, runs: pd.DataFrame) -> str:
    """``"; sources not accepted by rule 1: ..."`` for a table that fine-tunes from such a source, else ""."""
    if carried is None or carried.empty or "accepted" not in carried:
        return ""
    bad = carried[~carried.accepted.astype(bool)]
    used = set(zip(runs.dataset, runs.source))
    names = [f"{r.source} (Dice {r.own_task_dice:.3f} at {int(r.iterations)}, {r.dice_2T:.3f} at 2x)"
             for r in bad.itertuples() if (r.dataset, r.source) in used]
    return f"; sources NOT accepted by rule 1: {', '.join(names)}" if names else ""


def headline(rep: dict) -> list:
    """One line per study, printed from the numbers: TRM's gain over vanilla with its interval
    and the paper's, then TRM against each other method over cells (wins / ties / losses, p)."""
    lines = []
    for key, s in rep["studies"].items():
        g = s.get("gains_all", s["gains"])
        if "trm" not in g.index or "vanilla" not in g.index or "gain_pct" not in g:
            continue
        t = g.loc["trm"]
        line = f"{key}" + (f" [{s['label']}]" if "label" in s else "") + ":"
        for m, what in (("trm", "TRM (dataset-level map)"), (P.IMAGE_READING, f"TRM on per-image maps ({P.IMAGE_READING})")):
            if m not in g.index:  # both readings of eq. 4, side by side
                continue
            v = g.loc[m]
            ci = ("no CI (< 3 cells)" if pd.isna(v.gain_ci_low) else f"95% CI {v.gain_ci_low:+.2f} to {v.gain_ci_high:+.2f}")
            line += (f"\n    {what} {v.dice_mean:.4f} vs vanilla {g.loc['vanilla', 'dice_mean']:.4f}: {v.gain_pct:+.2f}% "
                     f"({ci}) over {int(v.n_cells)} cells x {int(v.n_seeds)} seeds")
            if "vs_vanilla_wins" in g and pd.notna(v.get("vs_vanilla_wins")):
                p = v.vs_vanilla_wilcoxon_p
                line += (f"; better in {int(v.vs_vanilla_wins)}, tied in {int(v.vs_vanilla_ties)}, worse in "
                         f"{int(v.vs_vanilla_losses)} cells, Wilcoxon p = " + ("n/a" if pd.isna(p) else f"{p:.2g}"))
            if m == "trm" and "paper_gain_pct" in g and pd.notna(t.get("paper_gain_pct")):
                line += f"; paper {t.paper_gain_pct:+.2f}%"
            if "gains_all" in s and "gain_pct" in s["gains"]:  # Table III: per size, the paper's at the matching size
                per = s["gains"].xs(m, level=-1)
                line += "\n      per size: " + ", ".join(
                    f"{int(n)} slices {r.gain_pct:+.2f}%" + (f" (paper, {int(r.paper_n_slices)}: {r.paper_gain_pct:+.2f}%)"
                                                            if m == "trm" and pd.notna(r.get("paper_gain_pct")) else "")
                    for n, r in per.iterrows())
        for b in g.index:
            if b not in ("trm", "vanilla") and "trm_wins" in g and pd.notna(g.loc[b, "trm_wins"]):
                p = g.loc[b, "trm_wilcoxon_p"]
                line += (f"\n    TRM vs {b}: better in {int(g.loc[b, 'trm_wins'])}, tied in {int(g.loc[b, 'trm_ties'])}, "
                         f"worse in {int(g.loc[b, 'trm_losses'])} cells; Wilcoxon p = "
                         + ("n/a (< 3 cells or no difference)" if pd.isna(p) else f"{p:.2g}"))
        lines.append(line)
    return lines


def report_text(rep: dict) -> str:
    st = rep["settings"]["settings"]
    units = rep["units"]
    lines = [f"# Sweep report: {st['dataset']} data, preset {st['preset']}, seeds {st['seeds']}", "",
             f"Units: {int((units.status == 'done').sum())} done, {int((units.status == 'failed').sum())} failed "
             f"(unit time {units.seconds.fillna(0).sum() / 3600:.2f} h). Dice: mean foreground Dice on the target's "
             "held-out test subjects at the end of the run; ± std over seeds. Gains: 100 x (mean - vanilla) / vanilla over "
             f"all cells, 95 % bootstrap interval (cells and seeds resampled); TRM wins / ties / losses over cells "
             f"(tie: |Δ| <= {TIE}); p: paired Wilcoxon signed-rank over cells.", ""]
    pr = rep["progress"]
    if len(pr):
        def done_of(kind):
            return "; ".join(f"{r.study} {r.done} of {r.planned}" for r in pr[pr.kind == kind].itertuples()) or "none"
        lines += [f"Planned units done, per study: {done_of('table')}; budget check: {done_of('budget check')}", ""]
    prov = rep.get("provenance")
    if prov and prov["machines"]:
        lines += [f"Machines (CPU: units): {machines_line(prov)}.", ""]
    car = prov.get("carried") if prov else None
    if car is not None and len(car):
        one = bool(car.one_model.all())
        lines += ["## Source models", "",
                  f"The sweep's own source models (`sources/`: each trained once, or copied from the repository's "
                  f"`results/sources/` when identical; every unit loads them and none trains one). Every source is one "
                  f"model throughout: **{'yes' if one else 'NO'}** (each run records its source file's SHA-256). Rule 1: "
                  f"a source's held-out Dice on its own task not more than {B.SOURCE_DICE_TOL} higher at 2x its "
                  f"budget, every tumour source at least {B.SOURCE_FLOOR}.", "", markdown(car, 4), ""]
    if prov is not None and len(prov["sources"]):
        lines += ["**Sources that are not one model throughout** (retrained between units, told apart by their held-out "
                  "Dice on their own task; cells run with different models of a source compare unlike with unlike):", "",
                  markdown(prov["sources"]), ""]
    failed = units[units.status == "failed"]
    if len(failed):
        lines += ["## Failed units", ""] + [f"- {u.uid}: {u.error}" for u in failed.itertuples()] + [""]
    if rep["studies"]:
        lines += ["## Headline", "", "```", *headline(rep), "```", ""]
    if "status" in rep:
        lines += ["## Did the runs finish learning? (each run's status)", "",
                  "Each held-out curve is smoothed by a running mean over 3 evaluations: `rising` when the smoothed "
                  f"end is more than {B.RISING_TOL} above the smoothed start of the last third, `overfit` when the smoothed "
                  f"maximum is more than {B.OVERFIT_TOL} above the smoothed end (finished learning; `max_drop` is the "
                  "largest such drop), `flat` otherwise. A gain from rising runs is a statement about how fast the "
                  "methods learn, not where they end.", "", markdown(rep["status"]), ""]
    if "check_status" in rep:
        lines += ["Status of the budget checks' runs (at 2T):", "", markdown(rep["check_status"]), ""]
    for key, s in rep["studies"].items():
        lines += [f"## {TITLES.get(s['study'], s['study'])}: {s['dataset']}", ""]
        if "label" in s:
            lines += [f"**{s['label']}**", ""]
        search = s.get("search")
        if search and search.get("checks"):
            last = search["checks"][-1]
            verdict = (f"accepted {s['table_factor']}x the preset's budget" if search.get("accepted") else
                       f"no budget up to {search['max_factor']}x the preset's accepted; the table ran at "
                       f"{s['table_factor']}x, labelled so")
            lines += [f"### The budget search ({verdict}; the check's last step {last['iterations_T']} vs "
                      f"{last['iterations_2T']} iterations)", "", markdown(pd.DataFrame(search["checks"]), 4), ""]
        if len(s.get("ladder", [])):
            lines += ["Each method's gain over vanilla (%) on the check sample at every budget it ran (the budget "
                      "dependence of the gains; `cells`: how many of the sample's cells the budget holds):", "",
                      markdown(F.ladder_view(s["ladder"]), 2), ""]
        chk = s.get("budget_check")
        if chk is not None and chk["table"] is not None:
            lines += [f"### Budget check ({chk['cells']} of {chk['planned']} sampled cells, T vs 2T)", "",
                      markdown(check_view(chk), 4), ""]
        lines += ["### Gains", "", markdown(s["gains"].reset_index(), 4), ""]
        if "gains_all" in s:
            lines += ["All sizes together:", "", markdown(s["gains_all"].reset_index(), 4), ""]
        if "ranking" in s:
            rk = s["ranking"]
            mean_tau = rk.kendall_tau.mean()
            lines += ["### Does pixel-LEEP rank the sources? (Kendall's tau, vanilla Dice)", "", markdown(rk, 3), "",
                      f"Mean tau over targets: {mean_tau:.3f}" if rk.kendall_tau.notna().any()
                      else "Fewer than 3 sources per target: no tau.", ""]
        lines += ["### The grid", "", markdown(s["grid"], 4), ""]
    helps = rep.get("helps")
    if helps is not None and len(helps):
        lines += ["## Where does TRM help?", "",
                  "Per cell, TRM's gain over vanilla (mean over seeds) against what is known before fine-tuning: "
                  "pixel-LEEP (eq. 3), the dataset-level map's mean (eq. 4) and the share of pixel positions whose risk "
                  "(eq. 6) exceeds 5. Spearman's rho with a bootstrap 95 % interval over cells; a predictor predicts "
                  "the gain only where its interval excludes 0. Cells of one target share its images, so a rho across "
                  "cells can be a difference between targets: `within_*` is the same question within targets (ranks "
                  "taken per target and pooled; interval from cells resampled within targets; p from shuffles within "
                  "targets), i.e. whether the predictor orders the sources for a given target. `all` pools the tables "
                  "whose budget is accepted; an early-budget table is answered alone and marked so (`early_budget`).", "",
                  *[f"- {F.helps_line(helps, k)}" for k in helps.table.unique()], "",
                  markdown(helps.drop(columns=["label"]), 3), ""]
    return "\n".join(lines)


def _save_fig(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def write_report(out, n_boot: int = 2000, dest=None) -> list:
    """Write ``dest`` (default ``OUT/report/``): report.md, one CSV per table, heatmaps. Returns the files."""
    matplotlib.use("Agg", force=False)
    out = resolve_path(out)
    rep = build_report(out, n_boot)
    d = resolve_path(dest) if dest is not None else out / "report"
    files = [atomic_write_text(d / "report.md", report_text(rep))]
    files.append(TB.write_csv(rep["units"].drop(columns=["dir"]), d / "units.csv"))
    if "status" in rep:
        files.append(TB.write_csv(rep["status"], d / "status.csv"))
    for key, s in rep["studies"].items():
        files.append(TB.write_csv(s["grid"], d / f"{key}_grid.csv"))
        files.append(TB.write_csv(s["gains"].reset_index(), d / f"{key}_gains.csv"))
        if s.get("budget_check") is not None and s["budget_check"]["table"] is not None:
            files.append(TB.write_csv(s["budget_check"]["table"], d / f"{key}_budget_check.csv"))
        if "gain_by_iteration" in s:
            files.append(TB.write_csv(s["gain_by_iteration"], d / f"{key}_gain_by_iteration.csv"))
        if "ranking" in s:
            files.append(TB.write_csv(s["ranking"], d / f"{key}_ranking.csv"))
        fig = study_figure(s)
        files.append(_save_fig(fig, d / f"{key}_heatmap.png"))
        plt.close(fig)
    ladders = {k: s["ladder"] for k, s in rep["studies"].items() if len(s.get("ladder", []))}
    for k, lad in ladders.items():
        files.append(TB.write_csv(lad, d / f"{k}_budget_ladder.csv"))
    if any(lad.factor.nunique() > 1 for lad in ladders.values()):
        fig = F.ladder_figure(ladders, {k: paper_trm_gain(s) for k, s in rep["studies"].items() if k in ladders})
        files.append(_save_fig(fig, d / "budget_ladder.png"))
        plt.close(fig)
    if rep.get("helps") is not None and len(rep["helps"]):
        files.append(TB.write_csv(rep["helps"], d / "where_trm_helps.csv"))
        files.append(TB.write_csv(rep["helps_cells"], d / "where_trm_helps_cells.csv"))
        fig = F.helps_figure(rep["helps_cells"])
        files.append(_save_fig(fig, d / "where_trm_helps.png"))
        plt.close(fig)
    car = rep["provenance"].get("carried")
    if car is not None and len(car):
        files.append(TB.write_csv(car, d / "sources.csv"))
    if any("gain_by_iteration" in s for s in rep["studies"].values()):
        fig = gain_by_iteration_figure(rep["studies"])
        files.append(_save_fig(fig, d / "gain_by_iteration.png"))
        plt.close(fig)
    return files
