# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 · Reproducing the paper's Tables I, II and III from a sweep
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/trm-tutorial/transfer-risk-map/blob/main/notebooks/07_reproduce_paper.ipynb)
#
# **What you will learn**
# - how a sweep turns the paper's tables into units (one transfer cell each, notebook 06), and how to run,
#   resume and report one on this machine, a workstation or a SLURM cluster;
# - how to read the regenerated tables beside the paper's: mean ± std over seeds per cell, the relative gain
#   over vanilla with a bootstrap interval, wins / ties / losses and a paired Wilcoxon test over cells, for
#   both readings of the map (eq. 4: `trm`, the dataset-level map as the authors' code reads it;
#   `trm@map=image`, a map per image);
# - whether a table's budget was long enough (its budget check: a fixed sample of its cells run again at twice
#   the budget) and whether a gain is one of learning speed or of where the runs end (the gain read at every
#   evaluation);
# - whether pixel-LEEP ranks the sources (Kendall's tau per target, over 5 sources).
#
# **Compute budget.** This notebook only reads a sweep's result files (seconds). The sweep itself:
#
# ```bash
# python -m trm_utils.sweep run --study table1,table3,table2,ablations --dataset phantom --seeds 3 \
#     --out runs/sweep/phantom-v3 --dry-run                                  # the units and their cost
# python -m trm_utils.sweep run --study table1,table3,table2,ablations --dataset phantom --seeds 3 \
#     --out runs/sweep/phantom-v3 --workers 2 --threads 1                    # about 4-5 h on 2 CPU cores
# python -m trm_utils.sweep report runs/sweep/phantom-v3
# # real data, the paper's protocol, on a cluster (one SLURM job per unit, requeued on time-out):
# python -m trm_utils.sweep run --study table2 --dataset fets2021 --data-dir /data --preset paper \
#     --executor slurm --partition gpu --gpus-per-job 1 --time-min 240
# ```
#
# Killing a sweep loses only the units in flight: run the same command again and it picks up where it
# stopped (finished units are recognised by a hash of everything that determines them).
#
# **What it reads by default.** `results/phantom-v3/`, committed with the kit (result files only): Tables I, II
# and III and the ablations on the phantom at the tutorial preset, seeds 0, 1, 2, with `vanilla`, `class_weight`,
# [22]'s `trs_map` ($e^{-T}$ of the dataset-level map) and TRM in both readings (Table III: vanilla and both
# readings). Section 1 prints how many of its planned units are done: a sweep is committed as its units land,
# and a table with units missing is printed as what it is, a part of the grid.
#
# **Early-budget tables.** Every table carries the verdict of its budget check in its headline and section:
# `budget checked` when, on its sample of cells at twice the budget, no method of the paper's table was more
# than 0.01 higher in mean Dice (rule v2; a fall is overfitting, printed as drift), `EARLY-BUDGET` otherwise,
# with the figures. Read an early-budget table as a comparison at that budget, not as where the methods end. `results/README.md` gives
# the figures and what is behind them; the older sweeps (`phantom-tutorial`, `phantom-tutorial-v2`, per-image
# maps and the previous tumour phantom) are in the repository's history only.

# %% [markdown]
# ## 0. Setup

# %%
import os
import subprocess
import sys
from pathlib import Path

REPO_URL = "https://github.com/trm-tutorial/transfer-risk-map"  # from pyproject.toml: `make colab-links REPO=owner/name`
_in_repo = any((p / "trm_utils").is_dir() for p in [Path.cwd(), *Path.cwd().parents])
if "google.colab" in sys.modules and not _in_repo:
    if not Path("transfer-risk-map").exists():
        subprocess.run(["git", "clone", "--depth", "1", os.environ.get("TRM_REPO_URL", REPO_URL), "transfer-risk-map"],
                       check=True)
        # torch is a range in pyproject.toml: Colab's own torch is kept, never re-installed
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "transfer-risk-map"], check=True)
    os.chdir("transfer-risk-map/notebooks")
_root = next((p for p in [Path.cwd(), *Path.cwd().parents] if (p / "trm_utils").is_dir()), None)
if _root is not None and str(_root) not in sys.path:
    sys.path.insert(0, str(_root))

# %%
import json
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from trm_utils import findings as F
from trm_utils import report as R
from trm_utils import sweep as S
from trm_utils.utils import resolve_path

# %% tags=["parameters"]
sweep_dir = "results/phantom-v3"  # a sweep folder (python -m trm_utils.sweep run ... --out DIR)
output_dir = "runs/notebooks/07_reproduce_paper"
demo_if_missing = True  # no sweep there: run a two-unit smoke sweep (a code-path demo, not results)
n_boot = 2000  # bootstrap resamples for the gains' intervals
show_progress = True

# %% [markdown]
# ## 1. The sweep: its settings and units
# A sweep folder holds `sweep.json` (the settings every unit shares: dataset, preset, seeds) and one folder per
# unit with its `unit.json` (status, time, the parameters it ran with), `result.csv` (one row per run) and the
# executed notebook 06 that produced it (kept locally; the committed phantom sweep under `results/` carries the
# result files only, to keep the repository small).

# %%
out = resolve_path(output_dir)
out.mkdir(parents=True, exist_ok=True)
src = resolve_path(sweep_dir)
demo = False
if not (src / "sweep.json").exists():
    if not demo_if_missing:
        raise FileNotFoundError(f"{src} is not a sweep folder; run python -m trm_utils.sweep run ... --out {sweep_dir}")
    demo = True
    src = out / "demo-sweep"
    print(f"no sweep at {sweep_dir}: running a two-unit smoke sweep into {src} (numbers from the smoke preset are a "
          "code-path check, not results)")
    rc = S.main(["run", "--study", "table1", "--dataset", "phantom", "--data-dir", str(out / "demo-data"), "--preset",
                 "smoke", "--seeds", "3", "--targets", "GM-T1", "--sources", "WM-T1,GM-T2", "--out", str(src),
                 "--no-progress"])
    assert rc == 0, "the demo sweep failed: see the messages above"
rep = R.build_report(src, n_boot=n_boot)
st = rep["settings"]["settings"]
print(f"sweep {src}: dataset {st['dataset']}, preset {st['preset']}, seeds {st['seeds']}, studies {rep['settings']['studies']}")
units = rep["units"]
print(units.assign(kind=R.unit_kinds(rep["settings"], units))
      .groupby(["study", "kind", "status"]).size().rename("units").to_string())
print(f"unit time: {units.seconds.fillna(0).sum() / 3600:.2f} h in all")
# what the sweep planned and what is still missing (a sweep is committed as its units land)
progress = rep["progress"]
for r in progress.itertuples():
    print(f"{r.study} {r.kind}: {r.done} of {r.planned} units done")
n_missing = int((progress.planned - progress.done).sum())
if (units.status == "failed").any():
    display(units[units.status == "failed"][["uid", "error"]])  # noqa: F821
# where the units ran, and any source that is not one model throughout (retrained between units, e.g. a
# sweep resumed on another machine without its source cache: its cells compare unlike with unlike)
prov = rep["provenance"]
print(f"machines (CPU: units): {R.machines_line(prov)}")
if len(prov["sources"]):
    print("sources retrained between units (told apart by their held-out Dice on their own task):")
    display(prov["sources"])  # noqa: F821
# a sweep that carries its own source models (OUT/sources): each one's own-task Dice, budget, rule-1 verdict,
# and whether every run of it names this file (one model throughout)
if len(prov.get("carried", [])):
    car = prov["carried"]
    print(f"the sweep's source models: {len(car)}; every source one model throughout: {bool(car.one_model.all())}")
    display(car)  # noqa: F821

# %% [markdown]
# ## 2. Did the runs finish learning?
# Each run's status (notebook 04 states the rule): `flat` or `overfit` runs have finished learning, `rising`
# ones have not; a table of numbers from rising runs compares how fast the methods learn, not where they end.
# Runs ending below Dice 0.05 are counted per method. Read the gains below in the light of these counts.

# %%
if "status" in rep:
    display(rep["status"])  # noqa: F821

# %% [markdown]
# ### The budget check, table by table
# Before a sweep runs, a sample of each table's cells is fixed by a rule that never looks at results (every cell
# of the table's first target; Table III: of its first two, every size) and run again at twice the budget, the
# schedule's shape kept (`sweep.check_sample`, `presets.scale_budget`). The rule (v2, notebook 04): the table's
# budget is accepted when no method of the paper's table is more than 0.01 higher in mean Dice on those cells at
# twice the budget; a fall is overfitting (drift), a gain that moves more than 1 point "depends on the budget"
# (reported, not gated). A table that fails, or whose check is incomplete, is **early-budget** wherever it is
# printed.

# %%
for key, s in rep["studies"].items():
    if "label" not in s:
        continue
    print(f"{key}: {s['label']}")
    chk = s["budget_check"]
    if chk is not None and chk["table"] is not None:
        display(R.check_view(chk).round(4))  # noqa: F821
if "check_status" in rep:
    print("status of the budget checks' runs at 2T:")
    display(rep["check_status"])  # noqa: F821

# %% [markdown]
# ### The budget search, and how the gains depend on the budget
# A sweep run with `--max-factor 8` finds each table's budget before running the table: the check sample at 1x and
# 2x the preset's budget, then 2x against 4x, and so on, until rule v2 accepts one (or 8x against 16x has been
# tried). Every budget it ran is a reading of the same cells: below, each method's gain over vanilla on the sample
# at every budget. A gain that changes sign from one budget to the next is a finding about the protocol (a fixed
# budget), not about the method.

# %%
for key, s in rep["studies"].items():
    if s.get("search"):
        print(f"{key}: table at {s['table_factor']}x the preset's budget "
              + ("(accepted)" if s["search"]["accepted"] else f"(no budget up to {s['search']['max_factor']}x accepted)"))
        display(pd.DataFrame(s["search"]["checks"]).round(4))  # noqa: F821
ladders = {k: s["ladder"] for k, s in rep["studies"].items() if len(s.get("ladder", []))}
if any(lad.factor.nunique() > 1 for lad in ladders.values()):
    fig = F.ladder_figure(ladders, {k: R.paper_trm_gain(rep["studies"][k]) for k in ladders})
    plt.show()

# %% [markdown]
# ### A gain of learning speed, or of where the runs end?
# Each run's held-out Dice was recorded every few iterations; reading every run at the same earlier iteration
# gives the table as it stood then. Below, each method's gain over vanilla (mean over cells and seeds) from a
# quarter of the budget to its end (the last point is the table's number). A gain that shrinks towards the end
# comes from learning faster; one that holds, from where the runs end. The dashed line is the paper's TRM gain.

# %%
if any("gain_by_iteration" in s for s in rep["studies"].values()):
    fig = R.gain_by_iteration_figure(rep["studies"])
    plt.show()

# %% [markdown]
# ## 3. The tables, study by study
# For each study: the gains (the paper's headline: relative gain of the mean Dice over all cells), with a 95 %
# bootstrap interval (cells and seeds resampled), each method's wins / ties / losses and Wilcoxon p against
# vanilla (`vs_vanilla_*`) and TRM's against each method (`trm_*`) over cells; then the grid itself with the paper's Dice beside ours (`paper_*` columns), and its
# figure (a grid's heatmaps, Table III's Dice against slices, the ablations' gains). The phantom's images are
# synthetic: compare the *pattern* (which method wins, where, by how much), not the absolute Dice, with the paper's.

# %%
for key, s in rep["studies"].items():
    print(f"=== {R.TITLES.get(s['study'], s['study'])}: {s['dataset']} ===" + (f"\n{s['label']}" if "label" in s else ""))
    display(s["gains"].round(4))  # noqa: F821
    fig = R.study_figure(s)  # Table III: Dice against slices; ablations: gains; a grid: heatmaps
    plt.show()
    display(s["grid"].round(4))  # noqa: F821

# %% [markdown]
# ## 4. Does pixel-LEEP rank the sources?
# Per target, Kendall's tau between the sources' pixel-LEEP (a forward pass of each source model on the target
# training set) and the Dice vanilla fine-tuning from that source reached. +1: pixel-LEEP orders the sources
# exactly as fine-tuning does; 0: no relation. With 5 sources per target a single tau is coarse (it takes
# values in steps of 0.2), so the mean over targets is the number to read.

# %%
for key, s in rep["studies"].items():
    if "ranking" in s:
        rk = s["ranking"]
        print(f"{key}: mean tau over {int(rk.kendall_tau.notna().sum())} targets = {rk.kendall_tau.mean():.3f}")
        display(rk.round(3))  # noqa: F821

# %% [markdown]
# ## 5. Where does TRM help?
# Nothing in the paper says in which cells TRM should help. Three things are known about a cell before any
# fine-tuning: how transferable the source is globally (pixel-LEEP, eq. 3), the mean of the dataset-level map
# (eq. 4), and how concentrated the risk is (the share of pixel positions whose risk, eq. 6, exceeds 5). Below,
# TRM's gain over vanilla per cell against each, with Spearman's rho and a bootstrap 95 % interval over cells,
# per table and over all cells. A predictor whose interval holds 0 predicts nothing; the line under the table says
# which, if any, do. (A sweep from before `risk_share_5` was recorded has only the first two.)
#
# The five cells of one target share that target's images, so the predictors and the gain can both differ by
# target, and a rho across cells can then be nothing more than "some targets gain more". The `within_*` columns
# ask the narrower question a user choosing a source has: *for a given target*, does the predictor order the
# sources by TRM's gain? (Ranks taken within each target and pooled; the interval resamples cells within targets.)
# In the figure each table has its own row and scales, one colour per target, and a thin line joins one target's
# cells. `all` pools only the tables whose budget is accepted: an early-budget table's gains say how fast the methods
# learn, so it is answered on its own, marked EARLY-BUDGET (hollow points), and kept out of `all`.

# %%
helps = rep.get("helps")
if helps is not None and len(helps):
    for k in helps.table.unique():
        print(F.helps_line(helps, k))
    display(helps.drop(columns=["label"]).round(3))  # noqa: F821
    fig = F.helps_figure(rep["helps_cells"])
    plt.show()

# %% [markdown]
# ## 6. The headline, printed from the numbers

# %%
lines = R.headline(rep)
print("\n".join(lines) if lines else "no study with both vanilla and TRM in this sweep")
if demo:
    print("(smoke-preset demo: these numbers check the code path; they are not results)")
# a sweep with planned units still missing is a part of its tables: say so beside the headline
if n_missing:
    caveat = (f"this sweep is incomplete: {n_missing} planned units are not done ("
              + ", ".join(f"{r.study}{'' if r.kind == 'table' else ' budget check'}: {r.planned - r.done}"
                          for r in progress.itertuples() if r.done < r.planned) + "); its tables cover the cells done so far")
    print(caveat)
    (out / "caveat.txt").write_text(caveat + "\n")
else:
    (out / "caveat.txt").unlink(missing_ok=True)
files = R.write_report(src, n_boot=n_boot, dest=out / "report")  # the sweep folder itself is left as it is
print(f"report written to {out / 'report'} ({len(files)} files)")

# %% [markdown]
# ## Summary
# - A sweep is a set of units, one transfer cell each, every unit a papermill run of notebook 06 whose executed
#   copy sits beside its result; `python -m trm_utils.sweep report` turns the result files into these tables.
# - Every gain comes with its interval and every comparison with its count of cells won, tied and lost: the
#   paper's tables give single numbers, one seed each.
#
# ## Exercises
# 1. The default sweep holds the ablations (section 3): which part of TRM (foreground normalisation, exponential
#    weighting) carries its effect on the tissue cells, and does the base matter? Run a base between 2 and 10 into
#    a folder of your own (`python -m trm_utils.sweep run --study ablations --dataset phantom --seeds 3 --methods
#    vanilla,trm@base=5 --out runs/sweep/my-ablations`) and see where it falls. Why would choosing the base from
#    these numbers, then quoting its gain on the same test subjects, overstate it?
# 2. Kill a sweep with Ctrl-C half-way, run the same command again and check in `unit.json` that the finished
#    units were not re-run.


# %% [markdown]
# ## Checked exercises
# Set each `answer_q…` and run its cell: the check says "correct", or what is wrong (type, shape, which values
# and by how much); `nb07.q1.hint()` and `nb07.q1.solution()` help. Left at `None`, a check says "not
# attempted" and never stops a headless run.

# %%
from trm_utils.exercises import nb07, TOY_DIFFS  # noqa: E402,F401 (the exercises' toy data)

print(nb07.q1.prompt)
answer_q1 = None  # your answer: a tuple (wins, ties, losses)
nb07.q1.check(answer_q1)

# %%
print(nb07.q2.prompt)
answer_q2 = None  # your answer: a float (percent)
nb07.q2.check(answer_q2)
