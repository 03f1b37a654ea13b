# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Risk-map-weighted fine-tuning against its baselines
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/trm-tutorial/transfer-risk-map/blob/main/notebooks/04_weighted_finetuning.ipynb)
#
# **What you will learn**
# - the paper's fine-tuning protocol: source U-Net, **frozen encoder**, decoder and head trained with Adam;
# - four losses as one mechanism (a pixel weight and a normaliser): vanilla, class weight, transferability
#   map (Trs map, as [22]'s code weighs pixels) and the transfer risk map normalised by foreground size (TRM,
#   ours, eq. 7), TRM under both readings of the map (notebook 03);
# - how to run a source × target grid shaped like the paper's Tables I and II over several seeds, and read
#   it honestly: mean ± spread, relative gain over vanilla, cells won, and the paper's own numbers beside ours;
# - why the comparison depends on the training budget (held-out Dice against iterations);
# - which part of TRM does the work (ablations), and how risk maps change after fine-tuning (the paper's Fig. 2).
#
# **Compute budget** (tutorial preset, phantom, 3 seeds): about 12 min on 2 CPU cores.
# **Are the runs long enough?** Every budget here passed (or is labelled as failing) the doubling check,
# decided before any measurement (rule v2): at twice the budget no method of the paper's table is more than
# 0.01 higher in mean Dice; a fall is overfitting and is printed as drift, and each gain's stability at 2T is
# printed beside it (`benchmarks/budget_check.py`, committed in `results/calibration/`, printed in section 2.1
# beside each run's status). The source models are loaded from `results/sources/` (notebook 02). The main job fine-tunes the
# tissue grid; the tumour grid (`tumour_max_sources=None`, about 8 more minutes) is left out of it to keep
# the main job within 20 minutes; section 3.5 shows the committed tumour table instead (the budget check's own
# runs at the tutorial budget) when one is committed, and says so when none is.
# The `paper` preset (classic U-Net, 5k iterations, full 6 × 6 grids) needs a GPU: roughly 1-2 GPU-hours per
# dataset.

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
import copy

import matplotlib.pyplot as plt
import pandas as pd
import torch

from trm_utils import METHODS, finetune, finetune_cell, method_loss, risk_map, stack_data, transferability_maps
from trm_utils import budget as B
from trm_utils import experiments as E
from trm_utils import findings as F
from trm_utils import tables as TB
from trm_utils import presets as P
from trm_utils import report as R
from trm_utils import viz
from trm_utils.notebook import setup

# %% tags=["parameters"]
dataset = "phantom"  # phantom | iseg2019 | fets2021 | msd
data_dir = "data"
output_dir = "runs/notebooks/04_weighted_finetuning"
preset = "tutorial"  # tutorial | paper
seeds = [0, 1, 2]
device = "auto"
iterations = None  # None: the preset's budget per dataset
show_progress = True
tissue_sources = None  # None: the preset's grid
tissue_targets = None
tumour_sources = None
tumour_targets = None
tumour_max_sources = 0  # 0: no tumour fine-tuning (the committed table is shown); 1: one cell; None: the tutorial grid
methods = None  # None: vanilla, class_weight, trs_map, trm and TRM read per image (the budget check's five)
ablations = ["fg_only", "exp_only"]
ablation_seeds = [0, 1, 2]
ablation_families = ["tissue"]
ablation_last_source_only = True  # the main job's budget: the ablation on the grid's last (cross-modality) source
engine = "batched"  # batched: a cell's runs at once (finetune_cell) | per_run: one finetune after another
early_iteration = 150  # the grid is also read at this iteration (section 5): the early picture
retrain_sources = False  # True: train the source models here instead of loading results/sources/

# %%
ctx = setup(dataset, data_dir, output_dir, preset, seeds, device, iterations, show_progress,
            retrain_sources=retrain_sources)
if methods is None:  # the paper's four with TRM in both readings of eq. 4 (written here, not in the
    # parameters cell: papermill cannot list a parameter whose line holds a second "=")
    methods = list(B.FAMILIES["tissue"]["methods"])  # [..., "trm@map=image"]: TRM on per-image maps
families = ctx.families(tissue_sources, tissue_targets, tumour_sources, tumour_targets)
if "tumour" in families and tumour_max_sources is not None:
    n, r, s, t = families["tumour"]
    if int(tumour_max_sources) == 0:
        del families["tumour"]
        print("tumour grid not fine-tuned here (tumour_max_sources=0): section 3.5 shows the committed one")
    else:
        families["tumour"] = (n, r, s[:int(tumour_max_sources)], t)
for fam, (name, root, s, t) in families.items():
    print(f"{fam} grid ({name}): sources {s} x targets {t}; methods {methods}; seeds {ctx.seeds}")

# %% [markdown]
# ## 1. Four losses, one mechanism
#
# Every method computes the per-pixel cross-entropy, multiplies it by a pixel weight $w$ and divides the sum
# by a normaliser. With $T$ the transferability map of notebook 02, $H$ its hardness and $R = 10^H$ the risk
# map (notebook 03):
#
# | method | pixel weight $w$ | normaliser |
# |---|---|---|
# | vanilla | 1 | all pixels (the usual mean) |
# | class weight [29] | inverse class frequency of the target training set | sum of the weights |
# | Trs map [22] | $e^{-T}$ of the dataset-level map (no normalisation), in $[1, C_t]$ | all pixels |
# | **TRM (ours)**, eq. (7) | $10^{H}$, $H$ from the dataset-level map | **foreground pixels** of the batch |
# | `trm@map=image` | $10^{H_i}$, $H_i$ from each image's own map | foreground pixels |
# | ablation `fg_only` | 1 | foreground pixels |
# | ablation `exp_only` | $10^H$ | all pixels |
#
# The Trs-map weight is [22]'s map as its released code makes a weight map (`is_weight_map=True`: $e^{-T}$ of
# each patch's LEEP); [22]'s repository has no loss code, so multiplying the cross-entropy by it and averaging
# over pixels is our reading. Each entry of a dataset-level map is a LEEP, at least minus the entropy of its
# labels, so $e^{-T}$ stays between 1 and the number of classes; on a per-image map it would reach $10^{12}$,
# so Trs map has no per-image variant.
#
# $$\mathcal L_{TRM} = \frac{\sum_i \sum_p R_i(p)\, \mathrm{CE}(f(x_i)_p, y_{i,p})}{\#\{(i,p): y_{i,p} \neq 0\}}$$
#
# Dividing by the foreground size instead of the image size means a batch with a small structure is not
# drowned by its background: the loss per foreground pixel is what counts (a batch with no foreground at
# all falls back to the pixel count). A tiny worked example:

# %%
logits = torch.tensor([[[[2.0, -1.0, 0.5, 0.0]], [[0.0, 1.0, 0.0, 0.0]]]])  # 1 image, 2 classes, 1 x 4 pixels
labels = torch.tensor([[[0, 1, 1, 0]]])
T_toy = torch.tensor([[[0.0, -0.6, -0.3, -0.12]]])  # a transferability map (<= 0) ...
H_toy = (T_toy.max() - T_toy) / (T_toy.max() - T_toy.min())  # ... and its hardness: 0, 1, 0.5, 0.2
pd.DataFrame({m: [round(float(method_loss(m, logits, labels, hardness=H_toy, tmap=T_toy,
                                          class_weight=torch.tensor([1.0, 1.0]))), 4)] for m in METHODS}, index=["loss"])

# %% [markdown]
# ## 2. The transfer grid
#
# For every target task: the training subjects' slices, the held-out test subjects' slices (a split by
# subject, never by slice). For every source: the cached source U-Net (notebook 02), its transferability maps
# on the target training set in both readings (computed once, before fine-tuning, as in the paper), then one
# fine-tuning run per method and seed. Dice is the mean over foreground classes of the per-subject 3D Dice on the test subjects.
# The held-out Dice is also recorded every few iterations, **for analysis only** (section 5): no model is
# ever selected on it.
#
# **One run, then all of a cell's runs at once.** `finetune` is the protocol written out for one run: copy
# the source, freeze its encoder, re-initialise the head if the class count differs, Adam on the decoder with
# the method's loss. A cell's runs (every method x seed) share the source and the slices, and the encoder is
# frozen, so `finetune_cell` computes the encoder's outputs once and trains every run's decoder in one
# backward pass and one Adam step (Adam is elementwise: one Adam over all runs' parameters is independent
# Adams). It is how the grid below runs; here both paths train the same run for a few iterations, to show
# they agree.

# %%
name0, root0, src0, tgt0 = next(iter(families.values()))
demo_train = E.load_task(name0, root0, tgt0[0], "train", ctx.cfg)
demo_src, _ = ctx.source(name0, root0, src0[0])
one = finetune(copy.deepcopy(demo_src), demo_train, "trm", iterations=10, lr=ctx.cfg["lr"],
               batch_size=ctx.cfg["batch_size"], device=ctx.device, seed=ctx.seeds[0], show_progress=False)
many = finetune_cell(demo_src, demo_train, [("trm", ctx.seeds[0]), ("vanilla", ctx.seeds[0])], iterations=10,
                     lr=ctx.cfg["lr"], batch_size=ctx.cfg["batch_size"], device=ctx.device, show_progress=False)
print("trm losses, finetune:      ", [round(v, 5) for v in one["loss"][-3:]])
print("trm losses, finetune_cell: ", [round(v, 5) for v in many[0]["loss"][-3:]])
assert max(abs(a - b) / abs(a) for a, b in zip(one["loss"], many[0]["loss"])) < 1e-3

# %%
grids = {}
fig2_fam = next(iter(families))  # section 7 draws one cross-modality pair before and after fine-tuning:
fig2_pair = (families[fig2_fam][2][-1], families[fig2_fam][3][0])  # its models are kept, not trained again
fig2_models = {(*fig2_pair, m, ctx.seeds[0]): None for m in ("vanilla", "trm")}
for fam, (name, root, src, tgt) in families.items():
    print(f"--- {fam}: {name}")
    grids[fam] = E.run_grid(name, root, src, tgt, methods, ctx.seeds, ctx.cfg, device=ctx.device,
                            out_csv=ctx.out_dir / f"grid_{fam}.csv", show_progress=ctx.show_progress, engine=engine,
                            retrain_sources=ctx.retrain_sources, keep_models=fig2_models if fam == fig2_fam else None)

# %% [markdown]
# ### 2.1 Did every run finish learning?
# A comparison of methods means something only where the runs have finished learning: under a short budget
# the methods differ in how fast they learn, not where they end. Two checks, decided before any measurement:
#
# 1. **The budget check, the gate (rule v2).** The same grid (cells, methods, seeds) was run at the tutorial
#    budget T and at 2T, with the same schedule shape. T is *accepted* when at 2T no method of the paper's
#    table (vanilla, class weight, Trs map, TRM) has a mean Dice more than 0.01 *higher*: none was still
#    learning. A *fall* at 2T is overfitting under the paper's fixed-budget protocol (frozen encoder, no
#    augmentation, a fixed number of iterations): the runs had already finished learning at T, so it is
#    printed as the level's **drift at 2T**, never treated as a failure and never undone by picking a
#    checkpoint. Variants (TRM on per-image maps) get their own verdict and never block the table. Each gain
#    over vanilla is printed at T and 2T: **stable** when the two differ by at most 1 point, otherwise it
#    **depends on the budget** (a finding, shown, not gated). The sources get the same one-sided check on their
#    own task (notebook 02). `benchmarks/budget_check.py tissue` (or `tumour`) runs it and writes
#    `results/calibration/`; its committed verdict is printed below. A table whose budget is not accepted is
#    labelled early-budget. (Rule v1, before, also failed a budget when a method *fell* by more than 0.01 or a
#    gain moved by more than 1 point; it contradicted the run status below, where `overfit` counts as
#    finished, and was met only once the decoder had memorised its slices.)
# 2. **Each run's status, a diagnostic.** Each held-out curve is smoothed by a running mean over 3
#    evaluations (one test subject more or less in a slice's prediction moves the raw Dice by a few
#    hundredths). `rising`: the smoothed end is more than 0.01 above the smoothed value at the start of the
#    last third. `overfit`: the smoothed maximum is more than 0.02 above the smoothed end (the run peaked and
#    fell: it has finished learning, and its drop is reported; a checkpoint is never picked by its held-out
#    Dice). `flat` otherwise. Runs ending below Dice 0.05 are listed by name, never averaged away silently.

# %%
statuses = {}
for fam, df in grids.items():
    print(B.verdict_text(fam, preset=preset))
    st = B.status_table(df)
    statuses[fam] = B.status_counts(st)
    ctx.save_table(st, f"status_{fam}")
    print(f"{fam}: run status, per method: " + B.status_line(statuses[fam]))
    rising = st[st.status == "rising"]
    if len(rising):
        print(f"  still rising ({len(rising)} runs): the table below compares them before they finished")
        display(rising.round(3))  # noqa: F821
    stuck = B.stuck_runs(df)
    print(f"  runs ending below Dice {B.BELOW}: {len(stuck)}" + (f"\n{stuck.to_string(index=False)}" if len(stuck) else ""))
    fig = viz.cell_curves(TB.curves_frame(df), title=f"{fam}: held-out Dice per cell (band: min-max over seeds {ctx.seeds})",
                          mark=early_iteration)
    ctx.save_fig(fig, f"cell_curves_{fam}")
    plt.show()

# %% [markdown]
# ## 3. Results
# ### 3.1 Per cell: mean ± standard deviation over seeds

# %%
def cell_table(df):
    g = df.groupby(["target", "source", "method"]).dice
    t = (g.mean().map("{:.3f}".format) + " ± " + g.std(ddof=1).fillna(0).map("{:.3f}".format)).unstack("method")
    return t[[m for m in methods if m in t.columns]]


for fam, df in grids.items():
    print(f"{fam} ({df.dataset.iloc[0]}), seeds {ctx.seeds}")
    display(cell_table(df))  # noqa: F821

# %% [markdown]
# ### 3.2 Per method: mean Dice over the grid, spread over seeds, relative gain over vanilla
# `dice_mean` averages the grid cells for each seed, then the seeds; `dice_std` is the standard deviation of
# the per-seed grid means; `gain_pct` is the paper's headline statistic; `cells_won` counts the cells where
# the method's seed-mean beats vanilla's.

# %%
summaries = {}
for fam, df in grids.items():
    summaries[fam] = TB.summarize(df)
    ctx.save_table(summaries[fam], f"summary_{fam}", index=True)
    print(f"{fam} ({df.dataset.iloc[0]}):")
    display(summaries[fam].round(4))  # noqa: F821

# %% [markdown]
# ### 3.3 The paper's numbers beside ours
# The paper's Tables I (iSeg-2019) and II (FeTS 2021), copied into `reference/`. Its grids are 6 × 5 cells on
# real data with the classic U-Net and 5k iterations; ours follow the preset above, so compare the *sign and
# size* of the gains, not the Dice values.

# %%
paper_name = {"iseg2019": "iseg2019", "fets2021": "fets2021", "msd": "fets2021"}
# the paper's "ours" is TRM; both our readings of its map stand beside it
method_of_paper = [("vanilla", "vanilla"), ("class weight", "class_weight"), ("Trs map", "trs_map"), ("ours", "trm"),
                   ("ours", P.IMAGE_READING)]
side = []
for fam, df in grids.items():
    p = TB.paper_gains(paper_name[df.dataset.iloc[0]])
    for pm, ours in method_of_paper:
        if ours in summaries[fam].index:
            side.append({"family": fam, "method": ours, "paper_dice": p.loc[pm, "dice_mean"], "paper_gain_pct": p.loc[pm, "gain_pct"],
                         "our_dice": summaries[fam].loc[ours, "dice_mean"], "our_dice_std": summaries[fam].loc[ours, "dice_std"],
                         "our_gain_pct": summaries[fam].loc[ours, "gain_pct"]})
side = pd.DataFrame(side)
ctx.save_table(side, "paper_vs_ours")
side.round(3)

# %% [markdown]
# ### 3.4 Where does TRM help? Gain over vanilla per cell, in both readings

# %%
for fam, df in grids.items():
    m = df.groupby(["source", "target", "method"]).dice.mean().unstack("method")
    for variant in [v for v in ("trm", P.IMAGE_READING) if v in m]:
        gain = (m[variant] - m["vanilla"]).rename("dice").reset_index()
        fig = viz.grid_heatmap(gain, "dice", title=f"{fam}: Dice({variant}) - Dice(vanilla), mean of seeds {ctx.seeds}",
                               cmap="RdBu", center=0.0)
        ctx.save_fig(fig, f"gain_heatmap_{fam}" + ("" if variant == "trm" else "_image_reading"))
        plt.show()

# %% [markdown]
# ### 3.5 The tumour table, when the main job does not fine-tune it
# The tumour grid costs more than the main job affords, so its table is committed: the runs at T of the
# budget check that rule v2 accepts in the tumour grid's doubling series (the lowest accepted budget; while
# none is accepted, the longest budget checked, labelled so), seeds 0, 1, 2, with the carried sources. They are
# read here as they are (`results/calibration/tumour[_T<budget>]_budget_runs.csv`), with each run's status,
# the drift at 2T, the gains' stability and the paper's Table II beside. Set `tumour_max_sources=None` to
# fine-tune the grid here instead, at the preset's budget.

# %%
committed_grids = {}
if "tumour" not in grids and dataset == "phantom" and preset == "tutorial":
    stem = B.series_choice("tumour")  # the lowest budget v2 accepts, else the longest checked
    chk = B.load_check("tumour", stem=stem) if stem else {"runs": None}
    if chk["runs"] is None:
        print("no committed tumour check: run `python benchmarks/budget_check.py tumour`")
    else:
        print(B.verdict_text("tumour", preset=preset, stem=stem))
        committed = chk["runs"][chk["runs"].budget == "T"]
        committed_grids["tumour (committed check)"] = committed
        summaries["tumour (committed check)"] = TB.summarize(committed)
        print(f"tumour grid from the committed check: {sorted(set(committed.source))} -> {sorted(set(committed.target))}, "
              f"{int(committed.iterations.iloc[0])} iterations, seeds {sorted(set(committed.seed))}")
        print("run status, per method: " + B.status_line(B.status_counts(committed)))
        p = TB.paper_gains("fets2021")
        t = summaries["tumour (committed check)"][["dice_mean", "dice_std", "gain_pct", "cells_won"]].copy()
        t["paper_gain_pct"] = [p.loc[pm, "gain_pct"] if pm in p.index else float("nan")
                               for pm in [dict((o, q) for q, o in method_of_paper).get(m, "") for m in t.index]]
        ctx.save_table(summaries["tumour (committed check)"], "summary_tumour-committed-check", index=True)
        ctx.save_table(t, "tumour_committed_vs_paper", index=True)
        display(cell_table(committed))  # noqa: F821
        display(t.round(4))  # noqa: F821

# %% [markdown]
# **The tumour grid by doubling.** Its budget is checked by doubling (400, 800, 1600, ...; each check's 2T
# runs are the next check's T runs) until rule v2 accepts one. Below: each method's drift per doubling (the
# change of its mean Dice from T to 2T: positive while it still learns, negative once it overfits), side by
# side, and TRM's gain over vanilla at every budget checked. A gain whose sign moves with the budget says how
# fast the methods learn or overfit, not which ends better; under the paper's fixed budget a method that
# overfits less gains.

# %%
series = B.doubling_series("tumour") if dataset == "phantom" and preset == "tutorial" else pd.DataFrame()
if series.empty:
    print("no committed tumour checks: run `python benchmarks/budget_check.py tumour`")
else:
    drift = series.assign(doubling=series.iterations_T.astype(str) + " -> " + series.iterations_2T.astype(str))
    drift = drift.pivot_table(index="method", columns="doubling", values="d_dice", sort=False)
    ctx.save_table(drift, "tumour_drift_per_doubling", index=True)
    display(drift.round(4))  # noqa: F821
    for r in series.drop_duplicates("check").itertuples():
        print(f"{r.check}: {int(r.iterations_T)} vs {int(r.iterations_2T)}: "
              + ("ACCEPTED" if r.accepted else "not accepted (a method of the table still learning)"))
    # what the numbers say, per doubling: who falls (overfits) and by how much, TRM beside vanilla
    for d, g in series[series.gated].groupby("iterations_T", sort=True):
        g = g.set_index("method")
        falls = g[g.d_dice < -B.DICE_TOL].d_dice.sort_values()
        print(f"{int(d)} -> {2 * int(d)}: vanilla {g.loc['vanilla', 'd_dice']:+.4f}, TRM {g.loc['trm', 'd_dice']:+.4f}; "
              + (f"overfitting: {', '.join(f'{m} {v:+.4f}' for m, v in falls.items())}" if len(falls) else "no method falls by more than 0.01")
              + f"; TRM's gain {g.loc['trm', 'gain_pct_T']:+.2f} % -> {g.loc['trm', 'gain_pct_2T']:+.2f} %")
    gains = B.gain_by_budget(series)
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot(gains.iterations, gains.gain_pct, "o-", color="C3", label="TRM vs vanilla (dataset-level map)")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xscale("log", base=2)
    ax.set_xticks(gains.iterations, [str(i) for i in gains.iterations])
    ax.set_xlabel("fine-tuning budget (iterations)")
    ax.set_ylabel("gain over vanilla (%)")
    ax.set_title("tumour grid: TRM's gain at every budget checked", fontsize=9)
    ax.legend(fontsize=7)
    ctx.save_fig(fig, "tumour_gain_by_budget")
    plt.show()

# %% [markdown]
# ## 4. Did pixel-LEEP rank the sources the way fine-tuning did?
# For each target: Kendall's tau between the sources' pixel-LEEP and their vanilla fine-tuned Dice (1 = same
# order). A rank correlation over 2 sources can only be +1 or -1, so it is computed only for targets with at
# least 3 sources; with the tutorial grid's 2 sources per target this section says so. The full 6 x 6 grids
# (5 sources per target) are the sweep's: notebook 07 reports tau per target and its mean over targets.

# %%
ranks = []
for fam, df in grids.items():
    r = R.source_ranking(df)  # the sweep report's function: tau is NaN where a target has < 3 sources
    r.insert(0, "family", fam)
    for row in r[r.n_sources < 3].itertuples():
        print(f"{fam} {row.target}: {row.n_sources} sources; a rank correlation needs at least 3, not computed")
    ranks.append(r)
ranks = pd.concat(ranks, ignore_index=True)
ctx.save_table(ranks, "leep_ranking")
ranks

# %% [markdown]
# ## 5. The early picture and the converged one
# The same runs, read at iteration `early_iteration` (the dashed line in the curves above) and at the end.
# Early, the table says which method *learns faster*; at the end, where the methods *arrive*. A method can
# lead early and be caught later (or the reverse), so a gain measured before the curves flatten is a
# statement about speed, not about the final segmentation. The mean curves over the grid (band = spread
# over seeds) follow.

# %%
for fam, df in grids.items():
    t = TB.early_vs_final(df, early_iteration)
    ctx.save_table(t, f"early_vs_final_{fam}", index=True)
    print(f"{fam}:")
    display(t.round(4))  # noqa: F821
    cur = TB.curves_frame(df)
    ctx.save_table(cur, f"curves_{fam}")
    fig = viz.curves(cur, title=f"{fam}: held-out Dice during fine-tuning (mean over the grid)")
    ctx.save_fig(fig, f"curves_{fam}")
    plt.show()

# %% [markdown]
# ## 6. Ablation: which part of TRM does the work?
# TRM changes two things at once: the exponential risk weight and the foreground normaliser. `fg_only` keeps
# only the normaliser, `exp_only` only the weight (neither is in the paper). In the main job the ablation runs
# on the grid's last (cross-modality) source only (`ablation_last_source_only`), with the same 3 seeds.
#
# One thing to expect before reading the numbers: with Adam, dividing a loss by a constant changes nothing
# (Adam normalises each gradient by its running scale), so the foreground normaliser can matter only through
# how much the foreground count varies from batch to batch. `fg_only` therefore tends to track vanilla, and
# `exp_only` to track TRM. The table below says whether they do here.
#
# How much does the foreground count vary? Below, per target, the factor by which eq. (7) scales each
# batch's loss relative to vanilla's mean (pixels / foreground pixels; 1 for a batch with no foreground),
# over the first 1000 batches fine-tuning draws with seed 0 (`findings.normaliser_spread`). Only its spread
# matters under Adam: a batch at `max` weighs `max_over_median` typical batches, and one such batch inflates
# Adam's running scale for the next ~1000 steps, shrinking the steps that follow. On the phantom a tissue
# target stays within a few times its median; a tumour target, where about half the slices hold no tumour
# and the median slice's tumour covers about a thousandth of it, reaches tens of times it. Where the spread is large,
# `fg_only` need not track vanilla, and TRM can lag it for a reason that has nothing to do with the risk map;
# the ablations of `results/phantom-v4` (Table II's tumour cells) test that.

# %%
spread = []
for fam, (name, root, _, tgts) in ctx.families(tissue_sources, tissue_targets, tumour_sources, tumour_targets).items():
    for t in tgts:
        lab = stack_data(E.load_task(name, root, t, "train", ctx.cfg))[1]  # N x H x W labels
        spread.append({"family": fam, "target": t, **F.normaliser_spread(lab, ctx.cfg["batch_size"], seed=0)})
spread = pd.DataFrame(spread)
ctx.save_table(spread, "normaliser_spread")
display(spread.round(4))  # noqa: F821

# %%
abl = []
for fam in ablation_families:
    if fam not in families or not ablations:
        continue
    name, root, src, tgt = families[fam]
    src = src[-1:] if ablation_last_source_only else src
    extra = E.run_grid(name, root, src, tgt, ablations, ablation_seeds, ctx.cfg, device=ctx.device,
                       out_csv=ctx.out_dir / f"ablation_{fam}.csv", show_progress=ctx.show_progress, engine=engine,
                       retrain_sources=ctx.retrain_sources)
    g = grids[fam]
    both = pd.concat([g[g.seed.isin(ablation_seeds) & g.method.isin(["vanilla", "trm"]) & g.source.isin(src)], extra])
    s = TB.summarize(both)
    s.insert(0, "family", fam)
    abl.append(s)
if abl:
    abl = pd.concat(abl)
    ctx.save_table(abl, "ablation_summary", index=True)
    display(abl.round(4))  # noqa: F821

# %% [markdown]
# ## 7. Risk maps before and after fine-tuning (the paper's Fig. 2)
# For one cross-modality pair, in the dataset-level reading: the pair's risk map computed with the source model,
# and the same map computed with the grid's models after vanilla and after TRM fine-tuning (seed 0; each model
# acting as its own "source" for eq. 4, on the same target training slices). The paper reports that its
# fine-tuning "condensed the extensive regions of high transfer risk into well-defined, smaller segments";
# the figure and the table below say what happens here. Risk is relative within each map (min-max, eq. 5), so
# the table also gives each map's raw range of $T$.

# %%
name, root = families[fig2_fam][:2]
pair_source, pair_target = fig2_pair
train = E.load_task(name, root, pair_target, "train", ctx.cfg)
source_model, _ = ctx.source(name, root, pair_source, quiet=True)
patch = ctx.cfg["map_patch"]
before = transferability_maps(source_model, train, ("dataset",), patch, device=ctx.device)
# the grid's own vanilla and TRM runs of this pair (seed ctx.seeds[0]), kept by run_grid in section 2
after = {m: transferability_maps(fig2_models[(*fig2_pair, m, ctx.seeds[0])], train, ("dataset",), patch, device=ctx.device)
         for m in ("vanilla", "trm")}
i = int(torch.argmax(train.labels.flatten(1).sum(1)))
stages = {"source": before, "after vanilla": after["vanilla"], "after TRM": after["trm"]}
fig = viz.image_row([train.images[i, 0], train.labels[i]] + [risk_map(r["dataset"]["tmap"]) for r in stages.values()],
                    [f"{pair_target} (slice {i})", "label"] + [f"risk: {k}" + (f" {pair_source}" if k == "source" else "")
                                                                for k in stages],
                    cmaps=["gray", "viridis", "inferno", "inferno", "inferno"], vmins=[None, None, 1, 1, 1], vmaxs=[None, None, 10, 10, 10])
ctx.save_fig(fig, "fig2_risk_before_after")
plt.show()
fig2 = pd.DataFrame([{"model": k, "pixel_leep": r["score"], "dataset_map_score": r["dataset"]["score"],
                      "T_min": float(r["dataset"]["map"].min()), "T_max": float(r["dataset"]["map"].max()),
                      "share_of_pixels_with_risk_above_5": float((risk_map(r["dataset"]["tmap"]) > 5).float().mean())}
                     for k, r in stages.items()])
ctx.save_table(fig2, "fig2_scores")
fig2

# %% [markdown]
# ## 8. Verdict, from the numbers above

# %%
verdict = {}
for fam, s in summaries.items():
    van = s.loc["vanilla"]
    frame = grids[fam] if fam in grids else committed_grids[fam]
    verdict[fam] = {"dataset": frame.dataset.iloc[0], "seeds": sorted(int(x) for x in set(frame.seed)),
                    "iterations": int(frame.iterations.iloc[0]),
                    "summary": s.round(5).reset_index().to_dict(orient="records")}
    for variant, label in (("trm", "TRM (dataset-level map)"), (P.IMAGE_READING, "TRM (per-image map)")):
        if variant not in s.index:
            continue
        row = s.loc[variant]
        verdict[fam][f"{variant}_gain_pct"] = float(row.gain_pct)
        verdict[fam][f"{variant}_cells_won"] = int(row.cells_won)
        print(f"{fam}: {label} {row.dice_mean:.4f} ± {row.dice_std:.4f} vs vanilla {van.dice_mean:.4f} ± "
              f"{van.dice_std:.4f} ({row.gain_pct:+.2f}%), ahead in {int(row.cells_won)}/{int(row.n_cells)} cells")
    verdict[fam]["n_cells"] = int(van.n_cells)
    print(f"{fam}: best method here: {s.dice_mean.idxmax()}")
ctx.save_json(verdict, "summary")

# %% [markdown]
# Read the verdict as it prints: where TRM does not beat vanilla or a baseline on this setting, that is the
# result. Settings differ from the paper in ways that matter (a procedural phantom, a small U-Net, a short
# budget on a CPU, few seeds); section 5 shows how the ranking moves with the budget.
#
# ## Summary
# - All four methods are one weighted cross-entropy with a different pixel weight and normaliser.
# - TRM's weight comes from the source model alone, before fine-tuning; it costs two passes of the source over
#   the target training set (both readings come from the same two passes).
# - Which reading of eq. (4) TRM uses is a choice the paper's text does not settle; the grid runs both, and the
#   verdict above prints both.
# - Gains are reported as the paper does (relative to vanilla over the grid), with the spread over seeds and
#   the number of cells won, beside the paper's own numbers.
#
# ## Exercises
# 1. Re-run with `iterations=150` and `lr_decay=None` (the kit's earlier budget): which conclusions of section 5
#    survive? Then try the paper's `lr=1e-4`: how many iterations until doubling the budget raises no mean Dice by more than 0.01?
# 2. Recompute the risk maps during training (`finetune(..., refresh_every=25)`): better or worse?
# 3. Set the base to 2 or 100 (`finetune(..., base=...)`) on one cell and compare with notebook 03's histograms.


# %% [markdown]
# ## Checked exercises
# Set each `answer_q…` and run its cell: the check says "correct", or what is wrong (type, shape, which values
# and by how much); `nb04.q1.hint()` and `nb04.q1.solution()` help. Left at `None`, a check says "not
# attempted" and never stops a headless run.

# %%
from trm_utils.exercises import nb04, TOY_CE, TOY_LAB, TOY_R  # noqa: E402,F401 (the exercises' toy data)

print(nb04.q1.prompt)
answer_q1 = None  # your answer: a float
nb04.q1.check(answer_q1)

# %%
print(nb04.q2.prompt)
answer_q2 = None  # your answer: a float
nb04.q2.check(answer_q2)
