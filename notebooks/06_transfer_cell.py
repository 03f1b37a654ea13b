# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · One transfer cell: the unit of a sweep
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/trm-tutorial/transfer-risk-map/blob/main/notebooks/06_transfer_cell.ipynb)
#
# **What this notebook is.** The paper's tables are grids of transfer cells: one source task fine-tuned on
# one target task, with every method and seed. This notebook runs **one cell** and writes its result file.
# `python -m trm_utils.sweep run ...` executes it once per cell with papermill (parameters injected below),
# keeps the executed copy beside the result, and notebook 07 assembles the tables from those files. Run by
# hand, it is a self-contained look at a single cell: its held-out curves, each run's status and its table.
#
# **What you will learn**
# - how a sweep unit is defined (dataset, source, target, few-shot size; all methods x seeds at once);
# - how to read one cell before it is averaged into a table: the curves, which runs finished learning, the spread.
#
# **Compute budget** (defaults: tutorial preset, phantom, one tissue cell, vanilla and TRM x 3 seeds): about
# 1 min on 2 CPU cores, 2 min with all four methods (plus source pre-training, 20-60 s, when the source model
# is not cached yet).

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

import matplotlib.pyplot as plt
import torch

from trm_utils import experiments as E
from trm_utils import budget as B
from trm_utils import tables as TB
from trm_utils import presets as P
from trm_utils import viz
from trm_utils.notebook import setup

# %% tags=["parameters"]
dataset = "phantom"  # phantom | iseg2019 | fets2021 | msd
data_dir = "data"
output_dir = "runs/notebooks/06_transfer_cell"  # the unit's folder in a sweep
preset = "tutorial"  # tutorial | paper | smoke
family = "tissue"  # tissue | tumour: which of the dataset's task sets
source = "WM-T2"
target = "WM-T1"  # a cross-modality cell: the T2 white-matter source on the T1 white-matter task
n_slices = None  # few-shot: target training slices (each seed draws its own subset); None: all
methods = ["vanilla", "trm"]  # a sweep passes all four; also ablation variants such as trm at base 2
seeds = [0, 1, 2]
iterations = None  # None: the preset's value
overrides = {}  # other preset keys to override, e.g. {"lr": 1e-4}
device = "auto"
num_threads = 0  # torch CPU threads (0: torch's default); a sweep's local pool gives each unit its share
cache_dir = None  # source-model cache (None: $TRM_CACHE_DIR or <repo>/cache)
show_progress = True
retrain_sources = False  # True: train the source models here instead of loading results/sources/
sources_dir = None  # a sweep's own carried sources (OUT/sources): the unit uses those and never trains one

# %%
if num_threads:
    torch.set_num_threads(int(num_threads))
ctx = setup(dataset, data_dir, output_dir, preset, seeds, device, iterations, show_progress,
            retrain_sources=retrain_sources, **overrides)
if family not in ctx.data:
    raise ValueError(f"dataset {dataset!r} has no {family} tasks (it has {list(ctx.data)}); set family to one of those")
name, root = ctx.data[family]
budget = P.for_dataset(ctx.cfg, name)  # the preset's budget for this dataset
print(f"cell: {name} {source} -> {target}" + (f", {n_slices} target slices" if n_slices else "")
      + f"; methods {methods}; seeds {ctx.seeds}; {budget['iterations']} iterations at lr {budget['lr']}")

# %% [markdown]
# ## 1. Fine-tune every method and seed of the cell
# `run_grid` on a one-cell grid: the source model (cached, or pre-trained here), its pixel-LEEP on the target
# training set, then all runs of the cell together (`finetune_cell`). Each row is one run; `curve` holds its
# held-out Dice every `eval_every` iterations (recorded for analysis, never used to pick a model).

# %%
runs = E.run_grid(name, root, [source], [target], methods, ctx.seeds, ctx.cfg, device=ctx.device,
                  max_slices=n_slices, show_progress=ctx.show_progress, cache_dir=cache_dir,
                  retrain_sources=ctx.retrain_sources, sources_dir=sources_dir, sources_only=sources_dir is not None)
runs.insert(0, "n_slices", n_slices)
src_model, src_info = ctx.source(name, root, source, cache_dir=cache_dir, quiet=True, sources_dir=sources_dir)
src_status = src_info["run_status"] or {}
runs["source_status"] = src_status.get("status")
runs["source_dice"] = src_info["curve"][-1][1] if src_info["curve"] else float("nan")

# %% [markdown]
# ## 2. The curves and each run's status
# A number enters a table only beside its run's status (`B.run_status`; notebook 04 explains the rule): each
# held-out curve is smoothed over 3 evaluations, then `rising` when the smoothed end is more than 0.01 above
# the smoothed start of the last third, `overfit` when the smoothed maximum is more than 0.02 above the
# smoothed end, `flat` otherwise. Flat and overfit runs have finished learning; a rising one has not. Runs
# ending below Dice 0.05 are listed.

# %%
st = B.status_table(runs)
runs["status"] = st.status.values
print("run status, per method: " + B.status_line(B.status_counts(st)))
fig = viz.cell_curves(TB.curves_frame(runs), title=f"{source} -> {target}: held-out Dice, seeds {ctx.seeds}")
ctx.save_fig(fig, "curves")
plt.show()

# %% [markdown]
# ## 3. The cell's table: mean ± std over seeds, gain over vanilla

# %%
cell = runs.groupby("method", sort=False).dice.agg(["mean", "std", "count"])
if "vanilla" in cell.index:
    cell["gain_pct"] = 100 * (cell["mean"] - cell.loc["vanilla", "mean"]) / cell.loc["vanilla", "mean"]
cell.round(4)

# %%
# The result file the sweep collects (written atomically: a killed run leaves none).
TB.write_csv(runs, ctx.out_dir / "result.csv")
ctx.save_json({"source": source, "target": target, "n_slices": n_slices, "seeds": ctx.seeds,
               "source_cache": src_info["status"], "source_status": src_status.get("status"), "mean_dice": cell["mean"].round(4).to_dict()}, "cell")
print(f"wrote {ctx.out_dir / 'result.csv'} ({len(runs)} runs)")


# %% [markdown]
# ## Checked exercises
# Set each `answer_q…` and run its cell: the check says "correct", or what is wrong (type, shape, which values
# and by how much); `nb06.q1.hint()` and `nb06.q1.solution()` help. Left at `None`, a check says "not
# attempted" and never stops a headless run.

# %%
from trm_utils.exercises import nb06, TOY_CURVE  # noqa: E402,F401 (the exercises' toy data)

print(nb06.q1.prompt)
answer_q1 = None  # your answer: a whole number
nb06.q1.check(answer_q1)

# %%
print(nb06.q2.prompt)
answer_q2 = None  # your answer: "flat", "overfit" or "rising"
nb06.q2.check(answer_q2)
