# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Pixel-level LEEP and transferability maps
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/trm-tutorial/transfer-risk-map/blob/main/notebooks/02_pixel_leep.ipynb)
#
# **What you will learn**
# - what the data are: with the default `dataset="phantom"`, **real anatomy** (the MNI152 2009 template, an
#   average of 152 adult brains) with **synthetic** subjects' variation, contrasts, infant contrast and tumours
#   (the section after the setup shows them and says exactly which is which);
# - how LEEP (notebook 01) becomes a segmentation score when *every pixel* is an instance (eq. 3);
# - how to stream it over batches in two passes, with memory that does not grow with the data;
# - how to pre-train source U-Nets and score every source for every target (a transferability matrix);
# - the **transferability map** (eq. 4): for each source-target pair, where in the anatomy a source is
#   expected to transfer well and where it is not, one map over the whole target set as the authors' code
#   computes it, beside the per-image variant. Notebook 03 turns it into a transfer risk map.
#
# **Compute budget** (tutorial preset, phantom): about a minute on 2 CPU cores (the phantom is written the first
# time; the 4 source U-Nets are loaded from `results/sources/`). With `retrain_sources=True` they are trained
# here, two at a time: the tissue ones in about a minute, the tumour ones (12000 iterations) in about 16 minutes.

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
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from trm_utils import PixelLEEP, evaluate, leep, pixel_leep, transferability_maps
from trm_utils import budget as B
from trm_utils import experiments as E
from trm_utils import presets as P
from trm_utils import viz
from trm_utils.notebook import setup

# %% tags=["parameters"]
dataset = "phantom"  # phantom | iseg2019 | fets2021 | msd
data_dir = "data"
output_dir = "runs/notebooks/02_pixel_leep"
preset = "tutorial"  # tutorial | paper
seeds = [0]
device = "auto"
iterations = None  # None: the preset's value (not used for training here)
show_progress = True
tissue_sources = None  # None: the preset's grid
tissue_targets = None  # None: every tissue task
tumour_sources = None
tumour_targets = None
retrain_sources = False  # True: train the source models here instead of loading results/sources/

# %%
ctx = setup(dataset, data_dir, output_dir, preset, seeds, device, iterations, show_progress,
            retrain_sources=retrain_sources)
families = ctx.families(tissue_sources, tissue_targets, tumour_sources, tumour_targets, all_targets=True)
for fam, (name, root, src, tgt) in families.items():
    print(f"{fam}: sources {src}; targets {tgt}")

# %% [markdown]
# ## The data: real anatomy, synthetic everything else
#
# With `dataset="phantom"` (the default) the notebooks run on the embedded phantom, written to disk in the
# real datasets' layouts and read back by the same loaders as the real data. **What is real** in it: the
# anatomy, the ICBM152 2009 template that nilearn ships (an average of 152 adult brains: its cortical
# folding, ventricles and deep grey nuclei). **What is synthetic**: every subject's variation (a random
# elastic deformation, a small rotation and scaling, a left-right flip, bigger or smaller ventricles), the
# modality contrasts (painted from the template's fuzzy tissue maps, partial volume kept), the infant-like
# contrast of the iSeg-like set (an adult brain with low grey/white contrast, T1/T2 inverted, and a
# myelination pattern), the acquisition differences between centres, and the tumours of the FeTS-like set.
# The tumour contrasts follow real scans: T2 shows the oedema and the tumour core bright (CSF brightest),
# FLAIR the oedema bright and CSF dark, T1 the core dark, T1ce the enhancing rim bright. The FeTS-like
# partitions 13 / 14 / 17 / 18 hold 32 / 32 / 9 / 9 subjects, about half the real 64 / 65 / 17 / 17.
# Numbers measured on it say how the method behaves on this phantom, not on real patients.
#
# Below: three subjects of each set, every modality and the label, at the slice with the most label.

# %%
for fam, (name, root, _, _) in families.items():
    fig = viz.data_overview(name, root, n_subjects=3)
    fig.suptitle(f"{fam}: {name} under {root}", y=1.02, fontsize=10)
    ctx.save_fig(fig, f"data_{fam}")
    plt.show()

# %% [markdown]
# ## 1. From LEEP to pixel-LEEP
#
# A segmentation source model outputs, at every pixel $p$ of image $x_i$, a probability vector
# $\theta(x_i)_{p}$ over its $C_s$ source labels $z$ (for a binary tissue source: background / tissue).
# Treat each of the $n \cdot H \cdot W$ pixels of the target training set as one LEEP instance (eq. 3):
#
# $$\hat P(y, z) = \frac{1}{nHW} \sum_i \sum_p \theta(x_i)_{p,z}\,[y_{i,p} = y], \qquad
#   \mathrm{LEEP}_{pix} = \frac{1}{nHW} \sum_i \sum_p \log \sum_z \hat P(y_{i,p} \mid z)\, \theta(x_i)_{p,z}.$$
#
# A target image set has millions of pixels, so the estimator streams: **pass 1** accumulates the joint
# (a $C_t \times C_s$ matrix) batch by batch; **pass 2** scores every pixel with the conditional from the
# whole set. Nothing else is kept. On flattened pixels it is exactly the LEEP of notebook 01:

# %%
rng = np.random.default_rng(0)
logits = torch.tensor(rng.normal(size=(6, 2, 16, 16)))
probs, labels = torch.softmax(logits, 1), torch.tensor(rng.integers(0, 3, (6, 16, 16)))
est = PixelLEEP(num_source_classes=2, num_target_classes=3)
for b in (slice(0, 2), slice(2, 3), slice(3, 6)):  # pass 1, uneven batches
    est.update(probs[b], labels[b])
for b in (slice(0, 2), slice(2, 3), slice(3, 6)):  # pass 2
    est.score_update(probs[b], labels[b])
flat = leep(probs.permute(0, 2, 3, 1).reshape(-1, 2), labels.reshape(-1))
print(f"streamed: {est.score():.6f}  one call: {pixel_leep(probs, labels):.6f}  LEEP on pixels: {flat:.6f}")

# %% [markdown]
# ## 2. Source U-Nets
#
# One 2D U-Net per source task, trained on the source's training subjects (all layers, Adam; the paper
# states neither its source loss nor its learning rate). The tissue sources learn with cross-entropy; the
# tumour sources with cross-entropy + soft Dice, because with cross-entropy alone this small U-Net learns
# only the oedema of the four tumour classes (a T2 source reached mean Dice 0.17 after 1500 iterations,
# NCR and ET at 0). Fine-tuning (notebook 04) uses the paper's losses, never the Dice term.
#
# **The sources are carried with the repository** (`results/sources/`), not retrained in every checkout. A
# source retrained on another CPU is another model: its sums round differently and the difference grows
# over thousands of iterations (one tumour source reached held-out Dice 0.7793 on one CPU and 0.7392 on
# another), and every transfer from it moves with it, by more than the seeds do. So each source was trained
# once, at a budget its own doubling check accepts (notebook 04, "Are the runs long enough?"), and committed
# with its **identity** (everything that decides its weights: data by content, task, architecture, budget,
# learning rate, loss, augmentation, seed), its **provenance** (the commit and CPU that trained it), its
# held-out curve and its Dice on its own task. A notebook loads the carried model only when its identity is
# exactly what the notebook would train; otherwise it trains one (and says why, in one line: what differs).
# `retrain_sources=True` trains them here instead (their times are in the table below: the tumour sources
# take the longest). On a CPU the sources to train are trained side by side, one process per core
# (`E.prepare_sources`). The last columns give each source's Dice on its *own* task's held-out subjects.

# %%
# carried where the identity matches; the others trained first, side by side on a CPU, then all loaded
jobs = [(name, root, task) for name, root, src_tasks, _ in families.values() for task in src_tasks]
trained = E.prepare_sources(jobs, ctx.cfg, device=ctx.device, retrain=ctx.retrain_sources)
sources = {}
rows = []
for fam, (name, root, src_tasks, _) in families.items():
    for task in src_tasks:
        model, info = trained[(name, task)]
        sources[(fam, task)] = model
        own = evaluate(model, E.load_task(name, root, task, "test", ctx.cfg), device=ctx.device)["dice"]
        st = info["run_status"] or {}
        prov = info.get("provenance") or {}
        rows.append({"family": fam, "source": task, "origin": info["status"],
                     "iterations": P.source_iterations(ctx.cfg, name), "train_seconds": info["seconds"],
                     "trained_on": prov.get("cpu"), "commit": prov.get("commit"), "own_task_dice": own,
                     "status": st.get("status"), "curve": info["curve"]})
source_table = pd.DataFrame(rows)
print(source_table.drop(columns="curve").round(4).to_string(index=False))
ctx.save_table(source_table, "source_models")

# %% [markdown]
# A source that has not finished learning would make every transfer from it look worse than it is. Each
# source's held-out Dice during pre-training (its own task's test subjects, for analysis only; one panel per
# family, as their budgets differ), and the verdict of each family's source check: a budget T_s is accepted
# when the same source trained for 2T_s is not more than 0.01 higher on its own task (rule v2; a tumour source
# must also reach 0.35). The check's numbers are the committed ones, made with these carried models at T_s.

# %%
fams = list(dict.fromkeys(source_table.family))
fig, axes = plt.subplots(1, len(fams), figsize=(5.2 * len(fams), 3.4), squeeze=False)
for ax, fam in zip(axes[0], fams):
    for r in source_table[source_table.family == fam].itertuples():
        if r.curve:
            it, d = zip(*r.curve)
            ax.plot(it, d, label=f"{r.source} ({r.origin})")
    ax.set_title(f"{fam} sources", fontsize=9)
    ax.set_xlabel("pre-training iteration")
    ax.set_ylabel("held-out Dice (own task)")
    ax.legend(fontsize=7)
ctx.save_fig(fig, "source_curves")
plt.show()
if ctx.preset == "tutorial" and dataset == "phantom":
    for fam in ("tissue", "tumour", "fewshot"):
        chk = B.load_check(fam)["sources"]
        print(B.source_verdict_line(fam, chk) if chk is not None else f"{fam}: no source check committed")

# %% [markdown]
# ## 3. Pixel-LEEP for every source → target pair
#
# Each source is scored on each target's **training** set (no fine-tuning, no test data). Higher is better.

# %%
score_rows = []
for fam, (name, root, src_tasks, tgt_tasks) in families.items():
    for target in tgt_tasks:
        train = E.load_task(name, root, target, "train", ctx.cfg)
        for task in src_tasks:
            tr = transferability_maps(sources[(fam, task)], train, readings=("image",), device=ctx.device)
            score_rows.append({"family": fam, "dataset": name, "source": task, "target": target, "pixel_leep": tr["score"]})
scores = pd.DataFrame(score_rows)
ctx.save_table(scores, "pixel_leep_scores")
for fam, g in scores.groupby("family"):
    fig = viz.grid_heatmap(g, "pixel_leep", title=f"pixel-LEEP, {fam} ({g.dataset.iloc[0]})", cmap="mako")
    ctx.save_fig(fig, f"pixel_leep_{fam}")
    plt.show()

# %% [markdown]
# Read the matrix row by row: a source scores highest on its own task (the diagonal, where present) and on
# tasks that share its modality or its structure. Whether this *global* score ranks sources the way
# fine-tuning does is checked in notebook 04, where the grid's Dice sits beside each pair's pixel-LEEP.
#
# ## 4. Transferability maps (eq. 4): one map per source-target pair
#
# Eq. (4) defines "$T(h, w)$, the transferability score at a pixel coordinate $(h, w)$", with no image index.
# The kit reads it as the paper's authors compute maps in the code they released for their earlier paper [22]
# (`tanyang1231/SegmentationTransferability`, `compute_transferability_map/pixelwise_transferability.py`):
# **one map per (source, target) pair over the whole target training set**. For every pixel coordinate (or
# patch of $k \times k$ coordinates; $k = 1$ here at 64 px, $k = 4$ in the paper preset as in [22]'s code),
# take that coordinate's pixels in *all* $N$ target images and compute their LEEP (eq. 2), with $P(y \mid z)$
# estimated from those pixels alone:
#
# $$T(h, w) = \frac{1}{N} \sum_{i=1}^{N} \log \sum_z \hat P_{hw}(y_{i,hw} \mid z)\, \theta(x_i)_{hw,z} \;\le 0 .$$
#
# Near 0: at this coordinate the source's outputs predict the target's labels well (or the coordinate always
# carries one label, like the background outside every brain, where $T = 0$ exactly). Very negative: the
# source's classes say little about what the target's label is *here*. The other reading, a map per image
# $T_i(p) = \log \sum_z \hat P(y_{i,p} \mid z)\, \theta(x_i)_{p,z}$ with one $P(y \mid z)$ for the whole set
# (the per-pixel terms of eq. 3), is kept as the variant `map=image`; notebook 03 sets the evidence for each
# side by side. Both come from the same two streamed passes (`transferability_maps`).
#
# Below, for every (source, target) pair of the preset's grid: one target slice, its label, the per-image map
# of that slice, and the pair's dataset-level map (the same for every slice of the target).

# %%
pair_maps, map_scores = {}, []
for fam, (name, root, src_tasks, _) in families.items():
    _, grid_targets = P.grid_tasks(name, preset)
    for target in grid_targets:
        train = E.load_task(name, root, target, "train", ctx.cfg)
        i = int(torch.argmax(train.labels.flatten(1).sum(1)))  # the slice with the most label
        panels, titles = [], []
        for task in src_tasks:
            if task == target:
                continue
            r = transferability_maps(sources[(fam, task)], train, patch=ctx.cfg["map_patch"], device=ctx.device)
            pair_maps[(fam, task, target)] = r
            map_scores.append({"family": fam, "source": task, "target": target,
                               "pixel_leep_eq3": r["score"], "dataset_map_score": r["dataset"]["score"]})
            panels += [train.images[i, 0], train.labels[i], r["image"]["tmap"][i], r["dataset"]["tmap"]]
            titles += [f"{target} slice {i}", "target label", f"per-image T_i from {task}",
                       f"dataset-level T, {task} -> {target}"]
        fig = viz.image_grid(panels, titles, ncols=4, cmaps=["gray", "viridis", "magma", "magma"])
        ctx.save_fig(fig, f"tmaps_{fam}_{target}")
        plt.show()
map_scores = pd.DataFrame(map_scores)
ctx.save_table(map_scores, "map_scores")
higher = int((map_scores.dataset_map_score > map_scores.pixel_leep_eq3).sum())
print(f"the dataset-level map's score is above eq. (3)'s in {higher} of {len(map_scores)} pairs")
map_scores.round(4)

# %% [markdown]
# The table gives the global score both ways: `pixel_leep_eq3` is eq. (3), every pixel scored with one
# $P(y \mid z)$ for the whole set (the mean of the per-image maps); `dataset_map_score` is the mean of the
# dataset-level map, every pixel scored with its own coordinate's $P(y \mid z)$. A conditional estimated at
# each coordinate usually describes that coordinate's labels better than one for the whole image, which the
# line above the table checks. Notebook 04 ranks sources by the first, as the paper does.
#
# Look at the dataset-level maps: their values vary from coordinate to coordinate, and where they are low
# says *where in the anatomy* the source's knowledge fails to carry over to this target, for every image at
# once. The per-image map of one slice mostly repeats its label's outline, sharpened where the source's
# prediction disagrees with it; notebook 03 measures how much of each map the pair (target label, source
# prediction) explains.
#
# ## Summary
# - Pixel-LEEP is LEEP with pixels as instances; `PixelLEEP` streams it in two passes with constant memory.
# - The score ranks sources for a target without fine-tuning.
# - The transferability map (eq. 4) is, by default, one map per source-target pair: each coordinate's LEEP
#   over the whole target set ([22]'s code); a map per image is the variant `map=image`.
#
# ## Exercises
# 1. Score a source on its own task's test split: how close to 0 does pixel-LEEP get?
# 2. Pass a brain mask (`mask=train.images[:, 0] != 0`) to `transferability_maps`: how does the score change
#    when the easy background pixels are left out?
# 3. Compute the dataset-level map with `patch=4` (as [22]'s code does on 512 x 1024 images): what is lost at
#    64 px?


# %% [markdown]
# ## Checked exercises
# Set each `answer_q…` and run its cell: the check says "correct", or what is wrong (type, shape, which values
# and by how much); `nb02.q1.hint()` and `nb02.q1.solution()` help. Left at `None`, a check says "not
# attempted" and never stops a headless run.

# %%
from trm_utils.exercises import nb02, TOY_PROBS, TOY_LABELS  # noqa: E402,F401 (the exercises' toy data)

print(nb02.q1.prompt)
answer_q1 = None  # your answer: a float
nb02.q1.check(answer_q1)

# %%
print(nb02.q2.prompt)
answer_q2 = None  # your answer: a 1 x 2 array
nb02.q2.check(answer_q2)
