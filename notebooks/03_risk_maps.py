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
# - how a transferability map $T$ (notebook 02, eq. 4) becomes a per-image **hardness** $H \in [0, 1]$ (eq. 5);
# - how exponential scaling with base $b$ makes the **transfer risk map** $R = b^{H} \in [1, b]$ (eq. 6);
# - what the base does to the weights, in pictures and histograms;
# - how to explore maps interactively (slice, source, target, base).
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

from trm_utils import hardness, risk_map, transferability
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

# %%
ctx = setup(dataset, data_dir, output_dir, preset, seeds, device, iterations, show_progress)
families = ctx.families(tissue_sources, tissue_targets, tumour_sources, tumour_targets)
maps = {}  # (family, source, target) -> (train slices, transferability result)
for fam, (name, root, src_tasks, tgt_tasks) in families.items():
    for target in tgt_tasks:
        train = E.load_task(name, root, target, "train", ctx.cfg)
        for s in src_tasks:
            model, info = E.source_model(name, root, s, ctx.cfg, device=ctx.device, show_progress=ctx.show_progress)
            maps[(fam, s, target)] = (train, transferability(model, train, device=ctx.device))
            print(f"{fam}: {s} -> {target}: source {info['status']}, pixel-LEEP {maps[(fam, s, target)][1]['score']:.4f}")

# %% [markdown]
# ## 1. Step by step on one slice
#
# **Hardness (eq. 5).** The raw map $T$ has no fixed scale (it depends on the source, the target and the
# image), so it is min-max normalised *per image* and inverted so that 1 marks the hardest pixel:
# $$H_i(p) = \frac{\max_p T_i - T_i(p)}{\max_p T_i - \min_p T_i}.$$
# **Risk (eq. 6).** Exponential scaling stretches the top of the range: with $b = 10$, a pixel of hardness
# 0.5 weighs $\sqrt{10} \approx 3.2$, the hardest pixel 10, an easy one 1:
# $$R_i(p) = b^{H_i(p)}.$$

# %%
key = next(iter(maps))
train, tr = maps[key]
i = int(torch.argmax(train.labels.flatten(1).sum(1)))
T = tr["tmap"][i:i + 1]
H = hardness(T)
R = risk_map(T, base=10.0)
print(f"{key[1]} -> {key[2]}, slice {i}: T in [{T.min():.2f}, {T.max():.2f}], H in [{H.min():.0f}, {H.max():.0f}], "
      f"R in [{R.min():.1f}, {R.max():.1f}]")
fig = viz.image_row([train.images[i, 0], train.labels[i], T[0], H[0], R[0]],
                    ["image", "target label", "transferability T (eq. 4)", "hardness H (eq. 5)", "risk R = 10^H (eq. 6)"],
                    cmaps=["gray", "viridis", "magma", "inferno", "inferno"])
ctx.save_fig(fig, "steps_one_slice")
plt.show()

# %% [markdown]
# ## 2. The effect of the base
# A larger base concentrates the loss on fewer, harder pixels; $b \to 1$ gives uniform weights (vanilla).
# The histograms are over all pixels of the target training set; the y axis is logarithmic because most
# pixels are easy background.

# %%
H_all = tr["hardness"]
fig, axes = plt.subplots(1, len(bases) + 1, figsize=(3.2 * (len(bases) + 1), 2.8))
axes[0].hist(H_all.flatten().numpy(), bins=50, color="gray")
axes[0].set_title("hardness H")
axes[0].set_yscale("log")
stats = []
for ax, b in zip(axes[1:], bases):
    r = b ** H_all
    ax.hist(r.flatten().numpy(), bins=50)
    ax.set_title(f"risk, base {b:g}")
    ax.set_yscale("log")
    share = float((r * (train.labels != 0)).sum() / r.sum())
    stats.append({"base": b, "mean_weight": float(r.mean()), "max_weight": float(r.max()),
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
fig = viz.image_row([b ** H[0] for b in bases], [f"risk, base {b:g}" for b in bases], cmaps=["inferno"] * len(bases))
ctx.save_fig(fig, "bases_one_slice")
plt.show()

# %% [markdown]
# ## 3. Risk maps across sources and targets
# The same target slice seen through different sources: a risk map describes a *pair*, not an image.

# %%
for fam, (name, root, src_tasks, tgt_tasks) in families.items():
    for target in tgt_tasks:
        train = maps[(fam, src_tasks[0], target)][0]
        i = int(torch.argmax(train.labels.flatten(1).sum(1)))
        panels = [train.images[i, 0], train.labels[i]] + [risk_map(maps[(fam, s, target)][1]["tmap"][i:i + 1])[0] for s in src_tasks]
        fig = viz.image_row(panels, [f"{target}", "label"] + [f"R from {s}" for s in src_tasks],
                            cmaps=["gray", "viridis"] + ["inferno"] * len(src_tasks), vmins=[None, None] + [1] * len(src_tasks),
                            vmaxs=[None, None] + [10] * len(src_tasks))
        ctx.save_fig(fig, f"risk_{fam}_{target}")
        plt.show()

# %% [markdown]
# ## 4. Interactive explorer
# Pick the slice, source, target and base. In a live notebook the sliders redraw the panel; headless
# (papermill, nbmake, GitHub's viewer) the widget is built but only the static figure above shows.

# %%
def draw(pair, index, base):
    train, tr = maps[pair]
    index = min(index, len(train) - 1)
    fig = viz.image_row([train.images[index, 0], train.labels[index], tr["tmap"][index], base ** tr["hardness"][index]],
                        [f"{pair[2]} slice {index}", "label", f"T from {pair[1]}", f"risk, base {base:g}"],
                        cmaps=["gray", "viridis", "magma", "inferno"])
    plt.show()
    return fig


try:
    import ipywidgets as widgets

    explorer = widgets.interactive(
        draw,
        pair=widgets.Dropdown(options=[(f"{f}: {s} -> {t}", (f, s, t)) for f, s, t in maps], description="pair"),
        index=widgets.IntSlider(min=0, max=max(len(v[0]) for v in maps.values()) - 1, value=i, description="slice"),
        base=widgets.FloatLogSlider(value=10, base=10, min=0.1, max=2, step=0.1, description="base"),
    )
    display(explorer)  # noqa: F821 (IPython builtin)
except Exception as exc:  # no front end or no ipywidgets: the static figures above show the same
    print(f"interactive explorer unavailable here ({type(exc).__name__}); see the static figures")

# %% [markdown]
# ## Summary
# - Hardness rescales each image's transferability map to [0, 1], 1 = hardest (eq. 5); a constant map gives 0.
# - The risk map $b^H$ weighs the hardest pixels up to $b$ times more than the easiest (eq. 6); $b = 10$ in the paper.
# - Risk concentrates on boundaries and on structures the source does not know; notebook 04 trains with it.
#
# ## Exercises
# 1. What base makes the mean weight of foreground pixels equal to that of the class-weight baseline?
# 2. Compute hardness over brain pixels only (mask the background before normalising): what changes?
# 3. Compare the risk map of a same-modality source with a cross-modality one on the same slice.
