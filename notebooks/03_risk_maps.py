# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · From transferability map to transfer risk map
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/trm-tutorial/transfer-risk-map/blob/main/notebooks/03_risk_maps.ipynb)
#
# **What you will learn**
# - the two readings of eq. (4), a map per source-target pair or a map per image, and the evidence for each;
# - how a transferability map $T$ (notebook 02) becomes a **hardness** $H \in [0, 1]$ (eq. 5);
# - how exponential scaling with base $b$ makes the **transfer risk map** $R = b^{H} \in [1, b]$ (eq. 6);
# - how much of each map is just "which label, which source prediction", and how much is *where*;
# - what the base does to the weights, in pictures and histograms;
# - how to explore maps interactively (pair, reading, slice, base).
#
# **Compute budget**: about 20 s on 2 CPU cores once notebook 02 has cached the source models
# (about 1 min if they must be trained); seconds on a GPU.

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
import pandas as pd
import torch

from trm_utils import hardness, risk_map, transferability_maps, variance_explained
from trm_utils.predict import predict_probs
from trm_utils import experiments as E
from trm_utils import viz
from trm_utils.notebook import setup

# %% tags=["parameters"]
dataset = "phantom"  # phantom | iseg2019 | fets2021 | msd
data_dir = "data"
output_dir = "runs/notebooks/03_risk_maps"
preset = "tutorial"  # tutorial | paper
seeds = [0]
device = "auto"
iterations = None
show_progress = True
tissue_sources = None  # None: the preset's grid
tissue_targets = None
tumour_sources = None
tumour_targets = None
bases = [2.0, 10.0, 100.0]  # exponential-scaling bases to compare; the paper uses 10
retrain_sources = False  # True: train the source models here instead of loading results/sources/

# %%
ctx = setup(dataset, data_dir, output_dir, preset, seeds, device, iterations, show_progress,
            retrain_sources=retrain_sources)
families = ctx.families(tissue_sources, tissue_targets, tumour_sources, tumour_targets)
maps = {}  # (family, source, target) -> (train slices, both readings' maps, the source's argmax prediction)
for fam, (name, root, src_tasks, tgt_tasks) in families.items():
    for target in tgt_tasks:
        train = E.load_task(name, root, target, "train", ctx.cfg)
        for s in src_tasks:
            model, info = ctx.source(name, root, s)
            r = transferability_maps(model, train, patch=ctx.cfg["map_patch"], device=ctx.device)
            pred = torch.cat([p.argmax(1).cpu() for _, p in predict_probs(model, train.images, 32, ctx.device)])
            maps[(fam, s, target)] = (train, r, pred)
            print(f"{fam}: {s} -> {target}: source {info['status']}, pixel-LEEP {r['score']:.4f}, "
                  f"dataset-level map score {r['dataset']['score']:.4f}")

# %% [markdown]
# ## 1. Two readings of eq. (4), and the evidence for each
#
# The paper's equations are lost in the text we work from, so the map must be read from what is left:
#
# | | **dataset-level map** (the default, `trm`) | **per-image map** (the variant `trm@map=image`) |
# |---|---|---|
# | what it is | one map per (source, target) pair: at each coordinate (or $k \times k$ patch), the LEEP of that coordinate's pixels over all $N$ target images, with a $P(y \mid z)$ of its own | one map per image: $T_i(p) = \log \sum_z \hat P(y_{i,p} \mid z)\,\theta(x_i)_{p,z}$, one $P(y \mid z)$ for the whole set |
# | the paper's notation | eq. 4: "$T(h, w)$, the transferability score at a pixel coordinate $(h, w)$", no image index; eq. 3 "where $h \in H, w \in W$" | needs an image index the paper does not write |
# | the authors' code | their earlier paper [22], which TRM builds on and compares with as "Trs map", released `compute_transferability_map/pixelwise_transferability.py` (`tanyang1231/SegmentationTransferability`): a map per pair, 4 x 4 patches over all target images, a local $P(y \mid z)$ per patch | none: no official TRM code exists |
# | other code | | one unofficial 3D re-implementation reads the map per sample (its other choices, no frozen encoder and a Dice loss added, are not the paper's) |
# | the paper's motivation | white and grey matter shared across domains, cortical folds specific to each brain: *where* transfer is risky | |
#
# So the kit follows the notation and the authors' code, and keeps the other reading as a named variant, to
# measure both (notebook 04). Hardness and risk are the same two steps in both readings; only *what* is
# normalised differs (one map over its entries, or each image over its pixels).
#
# ## 2. Step by step on one slice
#
# **Hardness (eq. 5).** The raw map $T$ has no fixed scale (it depends on the source and the target), so it is
# min-max normalised and inverted so that 1 marks the hardest entry:
# $$H(p) = \frac{\max T - T(p)}{\max T - \min T}.$$
# **Risk (eq. 6).** Exponential scaling stretches the top of the range: with $b = 10$, a pixel of hardness
# 0.5 weighs $\sqrt{10} \approx 3.2$, the hardest pixel 10, an easy one 1:
# $$R(p) = b^{H(p)}.$$
# Top row: the dataset-level reading (the pair's one map, the same for every slice); bottom row: the
# per-image reading of the same slice.

# %%
key = next(iter(maps))
train, tr, pred = maps[key]
i = int(torch.argmax(train.labels.flatten(1).sum(1)))
rows = {"dataset": tr["dataset"]["tmap"], "image": tr["image"]["tmap"][i]}
panels, titles = [], []
for reading, T in rows.items():
    H, R = hardness(T), risk_map(T, base=10.0)
    print(f"{reading:>7} reading, {key[1]} -> {key[2]}, slice {i}: T in [{T.min():.3f}, {T.max():.3f}], "
          f"H in [{H.min():.0f}, {H.max():.0f}], R in [{R.min():.1f}, {R.max():.1f}]")
    panels += [train.images[i, 0], train.labels[i], T, H, R]
    titles += ["image", "target label", f"T ({reading}, eq. 4)", "hardness H (eq. 5)", "risk R = 10^H (eq. 6)"]
fig = viz.image_grid(panels, titles, ncols=5, cmaps=["gray", "viridis", "magma", "inferno", "inferno"])
ctx.save_fig(fig, "steps_one_slice")
plt.show()

# %% [markdown]
# ## 3. Is the map about *where*, or only about *which label*?
#
# A per-pixel weight that depends only on the pixel's target label and on what the source predicts there is a
# weight per confusion cell (e.g. "every grey-matter pixel the source calls background"): close to a class
# weight, whatever the anatomy. The share of a map's variance over the brain's pixels (of every training slice)
# that the pair (target label, source prediction) explains tells which kind of map it is: near 1, the map is a
# function of that pair; near 0, its structure is spatial. The dataset-level map is read at every slice's
# pixels (the same value at a coordinate in every slice).

# %%
ve = []
for (fam, s, target), (slices, r, prediction) in maps.items():
    brain = slices.images[:, 0] != 0
    lab = slices.labels
    dmap = r["dataset"]["tmap"].expand_as(lab)
    ve.append({"family": fam, "source": s, "target": target,
               "image_map_by_label_and_prediction": variance_explained(r["image"]["tmap"], lab, prediction, mask=brain),
               "image_map_by_label_alone": variance_explained(r["image"]["tmap"], lab, mask=brain),
               "dataset_map_by_label_and_prediction": variance_explained(dmap, lab, prediction, mask=brain)})
ve = pd.DataFrame(ve)
ctx.save_table(ve, "variance_explained")
for row in ve.itertuples():
    print(f"{row.source} -> {row.target}: (label, source prediction) explains {100 * row.image_map_by_label_and_prediction:.1f}% "
          f"of the per-image map's in-brain variance ({100 * row.image_map_by_label_alone:.1f}% by the label alone) and "
          f"{100 * row.dataset_map_by_label_and_prediction:.1f}% of the dataset-level map's")
ve.round(3)

# %% [markdown]
# ## 4. The effect of the base
# A larger base concentrates the loss on fewer, harder pixels; $b \to 1$ gives uniform weights (vanilla).
# The histograms are over every pixel of the target training set (the weight each pixel gets in each reading);
# the y axis is logarithmic because most pixels are easy background.

# %%
H_read = {"dataset": tr["dataset"]["hardness"].expand_as(train.labels), "image": tr["image"]["hardness"]}
fig, axes = plt.subplots(2, len(bases) + 1, figsize=(3.2 * (len(bases) + 1), 5.4))
stats = []
for row, (reading, H_all) in zip(axes, H_read.items()):
    row[0].hist(H_all.flatten().numpy(), bins=50, color="gray")
    row[0].set_title(f"hardness H ({reading})")
    row[0].set_yscale("log")
    for ax, b in zip(row[1:], bases):
        r = b ** H_all
        ax.hist(r.flatten().numpy(), bins=50)
        ax.set_title(f"risk, base {b:g} ({reading})")
        ax.set_yscale("log")
        share = float((r * (train.labels != 0)).sum() / r.sum())
        stats.append({"reading": reading, "base": b, "mean_weight": float(r.mean()), "max_weight": float(r.max()),
                      "share_of_weight_on_foreground": share})
fig.tight_layout()
ctx.save_fig(fig, "histograms")
plt.show()
fg_share = float((train.labels != 0).float().mean())
stats = pd.DataFrame(stats)
ctx.save_table(stats, "base_effect")
print(f"foreground is {100 * fg_share:.1f}% of the pixels")
stats

# %%
fig = viz.image_row([b ** tr["dataset"]["hardness"] for b in bases], [f"dataset-level risk, base {b:g}" for b in bases],
                    cmaps=["inferno"] * len(bases))
ctx.save_fig(fig, "bases_dataset_map")
plt.show()

# %% [markdown]
# ## 5. Risk maps across sources and targets
# The same target seen through different sources: a risk map describes a *pair*, not an image. Per target:
# one slice, its label, then for each source the pair's dataset-level risk map and the per-image risk map of
# that slice.

# %%
for fam, (name, root, src_tasks, tgt_tasks) in families.items():
    for target in tgt_tasks:
        train = maps[(fam, src_tasks[0], target)][0]
        i = int(torch.argmax(train.labels.flatten(1).sum(1)))
        panels = [train.images[i, 0], train.labels[i]]
        titles = [f"{target}", "label"]
        for s in src_tasks:
            r = maps[(fam, s, target)][1]
            panels += [risk_map(r["dataset"]["tmap"]), risk_map(r["image"]["tmap"][i:i + 1])[0]]
            titles += [f"R from {s} (dataset)", f"R from {s} (this image)"]
        k = len(panels) - 2
        fig = viz.image_row(panels, titles, cmaps=["gray", "viridis"] + ["inferno"] * k,
                            vmins=[None, None] + [1] * k, vmaxs=[None, None] + [10] * k)
        ctx.save_fig(fig, f"risk_{fam}_{target}")
        plt.show()

# %% [markdown]
# ## 6. Interactive explorer
# Pick the pair, the reading, the slice and the base. In a live notebook the controls redraw the panel;
# headless (papermill, nbmake, GitHub's viewer) the widget is built but only the static figures above show.

# %%
def draw(pair, reading, index, base):
    train, r, _ = maps[pair]
    index = min(index, len(train) - 1)
    T = r["dataset"]["tmap"] if reading == "dataset" else r["image"]["tmap"][index]
    H = r["dataset"]["hardness"] if reading == "dataset" else r["image"]["hardness"][index]
    fig = viz.image_row([train.images[index, 0], train.labels[index], T, base ** H],
                        [f"{pair[2]} slice {index}", "label", f"T from {pair[1]} ({reading})", f"risk, base {base:g}"],
                        cmaps=["gray", "viridis", "magma", "inferno"])
    plt.show()
    return fig


try:
    import ipywidgets as widgets

    explorer = widgets.interactive(
        draw,
        pair=widgets.Dropdown(options=[(f"{f}: {s} -> {t}", (f, s, t)) for f, s, t in maps], description="pair"),
        reading=widgets.ToggleButtons(options=[("dataset-level map", "dataset"), ("per-image map", "image")],
                                      description="reading"),
        index=widgets.IntSlider(min=0, max=max(len(v[0]) for v in maps.values()) - 1, value=i, description="slice"),
        base=widgets.FloatLogSlider(value=10, base=10, min=0.1, max=2, step=0.1, description="base"),
    )
    display(explorer)  # noqa: F821 (IPython builtin)
except Exception as exc:  # no front end or no ipywidgets: the static figures above show the same
    print(f"interactive explorer unavailable here ({type(exc).__name__}); see the static figures")

# %% [markdown]
# ## Summary
# - Eq. (4) is read, by default, as one map per source-target pair (each coordinate's LEEP over the whole
#   target set), as in the authors' released code for [22]; the per-image map is the variant `map=image`.
# - Hardness rescales a map to [0, 1], 1 = hardest (eq. 5); a constant map gives 0.
# - The risk map $b^H$ weighs the hardest pixels up to $b$ times more than the easiest (eq. 6); $b = 10$ in the paper.
# - Section 3 printed how much of each map the pair (target label, source prediction) explains: the per-image
#   map weighs confusion cells, the dataset-level map weighs places in the anatomy. Notebook 04 trains with both.
#
# ## Exercises
# 1. What base makes the mean weight of foreground pixels equal to that of the class-weight baseline?
# 2. Compute the dataset-level map over brain pixels only (`transferability_maps(..., mask=train.images[:, 0] != 0)`):
#    what happens at coordinates that are inside the brain in some slices and outside in others?
# 3. Compare the dataset-level risk map of a same-modality source with a cross-modality one: where does each put
#    its highest risk?


# %% [markdown]
# ## Checked exercises
# Set each `answer_q…` and run its cell: the check says "correct", or what is wrong (type, shape, which values
# and by how much); `nb03.q1.hint()` and `nb03.q1.solution()` help. Left at `None`, a check says "not
# attempted" and never stops a headless run.

# %%
from trm_utils.exercises import nb03, TOY_T  # noqa: E402,F401 (the exercises' toy data)

print(nb03.q1.prompt)
answer_q1 = None  # your answer: a 2 x 2 array
nb03.q1.check(answer_q1)

# %%
print(nb03.q2.prompt)
answer_q2 = None  # your answer: a float
nb03.q2.check(answer_q2)
