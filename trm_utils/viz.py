"""Figures shared by the notebooks (matplotlib / seaborn)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .datasets import open_dataset

METHOD_ORDER = ["vanilla", "class_weight", "trs_map", "trm", "trm@map=image", "fg_only", "exp_only"]
METHOD_LABEL = {"vanilla": "vanilla", "class_weight": "class weight", "trs_map": "Trs map", "trm": "TRM (ours)",
                "trm@map=image": "TRM, per-image map", "fg_only": "fg-norm only", "exp_only": "exp-weight only"}


def image_row(panels, titles, cmaps=None, vmins=None, vmaxs=None, size=2.6, colorbar=True):
    """One row of image panels (2D arrays) with titles and optional colour bars."""
    return image_grid(panels, titles, len(panels), cmaps, vmins, vmaxs, size, colorbar)


def image_grid(panels, titles, ncols, cmaps=None, vmins=None, vmaxs=None, size=2.6, colorbar=True):
    """Image panels in rows of ``ncols``; ``cmaps``, ``vmins`` and ``vmaxs`` are given per column."""
    n = len(panels)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, (size + 0.3) * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        c = i % ncols
        cmap = (cmaps or ["gray"] * ncols)[c]
        im = ax.imshow(np.asarray(panels[i]), cmap=cmap, vmin=(vmins or [None] * ncols)[c],
                       vmax=(vmaxs or [None] * ncols)[c])
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


def cell_curves(curves_df: pd.DataFrame, title="", mark=None, ncols: int = 4):
    """Held-out Dice against iterations, one panel per (source, target) cell, one line per method
    (mean over seeds, band = min-max over seeds). ``mark``: an iteration to draw as a dashed line."""
    cells = curves_df[["source", "target"]].drop_duplicates().values.tolist()
    ncols = min(ncols, len(cells))
    nrows = int(np.ceil(len(cells) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.7 * nrows), squeeze=False, sharey=True)
    order = [m for m in METHOD_ORDER if m in set(curves_df.method)]
    colors = dict(zip(order, sns.color_palette(n_colors=len(order))))
    for ax, (src, tgt) in zip(axes.flat, cells):
        d = curves_df[(curves_df.source == src) & (curves_df.target == tgt)]
        for m in order:
            g = d[d.method == m].groupby("iteration").dice
            mean, lo, hi = g.mean(), g.min(), g.max()
            ax.plot(mean.index, mean.values, color=colors[m], label=METHOD_LABEL.get(m, m), lw=1.4)
            ax.fill_between(mean.index, lo.values, hi.values, color=colors[m], alpha=0.15, lw=0)
        if mark and mark < d.iteration.max():
            ax.axvline(mark, color="grey", ls="--", lw=0.8)
        ax.set_title(f"{src} -> {tgt}", fontsize=9)
        ax.set_xlabel("iteration")
    for ax in axes.flat[len(cells):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("held-out Dice")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
