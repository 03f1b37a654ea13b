"""Figures shared by the notebooks (matplotlib / seaborn)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

METHOD_ORDER = ["vanilla", "class_weight", "trs_map", "trm", "fg_only", "exp_only"]
METHOD_LABEL = {"vanilla": "vanilla", "class_weight": "class weight", "trs_map": "Trs map", "trm": "TRM (ours)",
                "fg_only": "fg-norm only", "exp_only": "exp-weight only"}


def image_row(panels, titles, cmaps=None, vmins=None, vmaxs=None, size=2.6, colorbar=True):
    """One row of image panels (2D arrays) with titles and optional colour bars."""
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(size * n, size + 0.3))
    axes = np.atleast_1d(axes)
    for i, (ax, img) in enumerate(zip(axes, panels)):
        cmap = (cmaps or ["gray"] * n)[i]
        im = ax.imshow(np.asarray(img), cmap=cmap, vmin=(vmins or [None] * n)[i], vmax=(vmaxs or [None] * n)[i])
        ax.set_title(titles[i], fontsize=9)
        ax.axis("off")
        if colorbar and cmap != "gray":
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    fig.tight_layout()
    return fig


def grid_heatmap(df: pd.DataFrame, value="dice", title="", fmt=".3f", cmap="viridis", center=None, ax=None):
    """Heatmap of ``value`` with sources as rows and targets as columns."""
    table = df.pivot_table(index="source", columns="target", values=value, aggfunc="mean")
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.3 * table.shape[1] + 2, 0.6 * table.shape[0] + 1.5))
    sns.heatmap(table, annot=True, fmt=fmt, cmap=cmap, center=center, ax=ax, cbar=True)
    ax.set_title(title)
    return ax.figure


def curves(curves_df: pd.DataFrame, title=""):
    """Held-out Dice against fine-tuning iterations, one line per method (mean over cells, band = seeds)."""
    per_seed = curves_df.groupby(["method", "seed", "iteration"]).dice.mean().reset_index()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    order = [m for m in METHOD_ORDER if m in set(per_seed.method)]
    sns.lineplot(per_seed, x="iteration", y="dice", hue="method", hue_order=order, errorbar="sd", ax=ax, marker="o")
    ax.set_ylabel("held-out Dice (mean over grid)")
    ax.set_title(title)
    return fig


def data_overview(name: str, root, subjects=None, n_subjects: int = 3):
    """One row per subject: every modality and the label at the axial slice with the most label,
    as the loaders read them (the phantom or the real data). Volumes are shown as stored."""
    from .datasets import open_dataset

    ds = open_dataset(name, root)
    subjects = list(subjects) if subjects is not None else ds.subjects[:n_subjects]
    mods = list(ds.modalities)
    fig, axes = plt.subplots(len(subjects), len(mods) + 1, figsize=(2.1 * (len(mods) + 1), 2.3 * len(subjects)),
                             squeeze=False)
    for r, s in enumerate(subjects):
        v = ds.load(s)
        lab = v["label"]
        z = int(np.argmax((lab > 0).sum(axis=(0, 1))))
        for c, m in enumerate(mods + ["label"]):
            ax = axes[r, c]
            img = v[m][:, :, z].T
            if m == "label":
                ax.imshow(np.ma.masked_equal(img, 0), cmap="tab10" if lab.max() < 10 else "viridis", interpolation="nearest")
            else:
                ax.imshow(img, cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(m, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{s} (z={z})", fontsize=8)
    fig.tight_layout()
    return fig
