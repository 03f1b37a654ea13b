"""Questions a sweep can answer that the paper does not ask: does TRM's gain depend on the budget,
where does TRM help, and what does eq. (7)'s foreground normaliser do under Adam?

* ``budget_ladder``: a table's check sample read at every budget the budget search ran
  (``sweep.find_budget``: 1, 2, 4, ... x the preset's), each method's mean Dice and gain over vanilla
  at each; ``ladder_view`` tabulates the gains, ``ladder_figure`` draws them against the iterations.
* ``where_trm_helps``: per cell, TRM's gain over vanilla against three things known before
  fine-tuning: the cell's global transferability (pixel-LEEP, eq. 3), the dataset-level map's mean
  (``map_leep``: every pixel scored with its own patch's P(y|z), eq. 4) and how concentrated its risk
  map is (``risk_share_5``: the share of pixel positions with risk above 5, eq. 6). Spearman's rho
  with a bootstrap 95 % interval over cells (``spearman_ci``); ``helps_figure`` the scatter plots.
  A rho whose interval holds 0 predicts nothing, and the report says so. Cells of one target share
  their target's images, so the predictors and the gain can both differ by target; a rho across
  cells can then be a difference between targets. ``spearman_within`` answers the narrower question
  (does the predictor order the sources *for a given target*?): ranks taken within each target,
  pooled, with a bootstrap interval that resamples cells within targets.
* ``normaliser_spread``: eq. (7) divides a batch's loss by its foreground pixel count. Adam divides
  each step by the gradient's running scale, so a constant divisor changes nothing; what the
  normaliser adds is its spread from batch to batch (a batch with few foreground pixels weighs as
  many typical ones). Measured on a target's training labels with the batches fine-tuning draws.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata, spearmanr

from .tables import summarize
from .train import Batches

#: The cell-level quantities ``where_trm_helps`` relates to TRM's gain, with their labels.
PREDICTORS = {"pixel_leep": "pixel-LEEP (eq. 3)", "map_leep": "dataset map's mean (eq. 4)",
              "risk_share_5": "share of pixels with risk > 5 (eq. 6)"}
CELL_KEYS = ["dataset", "source", "target", "n_slices"]


def _cell_keys(runs: pd.DataFrame) -> list:
    return [k for k in CELL_KEYS if k in runs and not (k == "n_slices" and runs[k].isna().all())]


def budget_ladder(runs: pd.DataFrame) -> pd.DataFrame:
    """Each method's mean Dice (std over seeds) and gain over vanilla on a table's check sample, at
    every budget it ran: ``runs`` are one study's runs at every multiple (``factor`` column); the
    sample is the cells run at more than one multiple. One row per (factor, method); empty when no
    cell ran at two budgets."""
    keys = _cell_keys(runs)
    n_factors = runs.groupby(keys, dropna=False).factor.nunique()
    cells = n_factors[n_factors > 1].reset_index()[keys]
    if cells.empty:
        return pd.DataFrame(columns=["factor", "iterations", "cells", "method", "dice_mean", "dice_std", "gain_pct"])
    sample = runs.merge(cells, on=keys)
    rows = []
    for k, g in sample.groupby("factor", sort=True):
        s = summarize(g)
        for m, r in s.iterrows():
            rows.append({"factor": int(k), "iterations": int(g.iterations.max()), "cells": len(g.groupby(keys, dropna=False)),
                         "method": m, "dice_mean": float(r.dice_mean), "dice_std": float(r.dice_std),
                         "gain_pct": float(r.gain_pct) if pd.notna(r.get("gain_pct")) else np.nan})
    return pd.DataFrame(rows)


def _cells_at(ladder: pd.DataFrame) -> tuple:
    """``(the sample's cell count, cells held per iterations)`` of a ``budget_ladder``: a budget
    holding fewer than the sample is a search step still running."""
    return int(ladder.cells.max()), ladder.groupby("iterations").cells.max()


def ladder_view(ladder: pd.DataFrame) -> pd.DataFrame:
    """The report's table of a ``budget_ladder``: one row per budget (iterations), each method's gain
    over vanilla (%), and how many of the sample's cells the budget holds. A budget with fewer cells
    than the sample (a search step still running) says "k of n, step running": its mean is over part
    of the sample and decides nothing yet (``ladder_figure`` draws it hollow)."""
    if ladder.empty:
        return pd.DataFrame(columns=["iterations", "cells"])
    n_cells, cells_at = _cells_at(ladder)
    view = ladder.pivot_table(index="iterations", columns="method", values="gain_pct", sort=False)
    view.columns.name = None
    methods = list(dict.fromkeys(ladder.method))
    view = view[[m for m in methods if m in view.columns]].sort_index()
    view.insert(0, "cells", [str(n_cells) if int(cells_at[i]) == n_cells else f"{int(cells_at[i])} of {n_cells}, step running"
                             for i in view.index])
    return view.reset_index()


def gain_panels(frames: dict, x: str, paper: dict | None = None, marker: str = "o", trm_lw: float = 2.4) -> tuple:
    """One panel per key of ``frames`` (each a frame with ``method``, ``x`` and ``gain_pct``), sorted:
    every method but vanilla's gain over vanilla against ``x``, one colour per method across the
    panels (Table III has fewer methods than Tables I and II), TRM bold, the zero line and the paper's
    TRM gain dashed where ``paper`` gives it. Returns ``(fig, {key: axis})`` for the caller's labels."""
    keys = [k for k in sorted(frames) if len(frames[k])]
    methods = list(dict.fromkeys(m for k in keys for m in frames[k].method if m != "vanilla"))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4.6 * max(1, len(keys)), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        g = frames[key]
        for m, d in g[g.method != "vanilla"].groupby("method", sort=False):
            ax.plot(d[x], d.gain_pct, marker=marker, label=m, lw=trm_lw if m == "trm" else 1.2, color=colors[m])
        ax.axhline(0, color="k", lw=0.8)
        if paper and pd.notna(paper.get(key, np.nan)):
            ax.axhline(paper[key], color="k", ls="--", lw=1, label="paper: TRM")
    return fig, dict(zip(keys, axes[0]))


def ladder_figure(ladders: dict, paper: dict | None = None):
    """One panel per table (``ladders``: key -> ``budget_ladder``): each method's gain over vanilla
    on the check sample against the fine-tuning iterations (log scale), TRM bold; the paper's TRM
    gain dashed where ``paper`` gives it (``gain_panels``). A budget whose units are not all in yet
    (a search step still running: fewer cells than the sample's) is drawn with hollow markers and its
    tick says how many cells it holds, so a mean over part of the sample is not read as the sample's."""
    fig, axes = gain_panels(ladders, "iterations", paper)
    for key, ax in axes.items():
        g = ladders[key]
        n_cells, cells_at = _cells_at(g)
        partial = [int(i) for i, c in cells_at.items() if c < n_cells]
        for line in list(ax.get_lines()):
            x, y = np.asarray(line.get_xdata(), dtype=float), np.asarray(line.get_ydata(), dtype=float)
            hollow = np.isin(x, partial)
            if len(x) == len(y) and hollow.any() and line.get_marker() not in ("None", None, ""):
                ax.plot(x[hollow], y[hollow], ls="none", marker=line.get_marker(), color=line.get_color(),
                        markerfacecolor="white", zorder=line.get_zorder() + 1)
        ax.set_xscale("log", base=2)
        its = sorted(g.iterations.unique())
        ax.set_xticks(its, [f"{int(i)}\n({int(cells_at[i])} of {n_cells} cells)" if int(i) in partial else str(int(i))
                            for i in its])
        ax.minorticks_off()
        ax.set_xlabel("fine-tuning iterations")
        ax.set_ylabel("gain over vanilla (%)")
        ax.set_title(f"{key} (check sample, {n_cells} cells)", fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle("Gain over vanilla at every budget checked (mean over the sample's cells and seeds)", fontsize=10)
    fig.tight_layout()
    return fig


def spearman_ci(x, y, n_boot: int = 2000, seed: int = 0) -> dict:
    """Spearman's rho of ``x`` and ``y`` (one value per cell), its p-value, and a bootstrap 95 %
    interval (cells resampled with replacement; resamples with a constant side are skipped). NaN
    everywhere with fewer than 3 cells (no statistic over fewer than 3 points)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = len(x)
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"n_cells": n, "rho": np.nan, "p": np.nan, "ci_low": np.nan, "ci_high": np.nan}
    rho, p = spearmanr(x, y)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        i = rng.integers(0, n, n)
        if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
            boot.append(spearmanr(x[i], y[i])[0])
    lo, hi = (np.percentile(boot, [2.5, 97.5]) if boot else (np.nan, np.nan))
    return {"n_cells": n, "rho": float(rho), "p": float(p), "ci_low": float(lo), "ci_high": float(hi)}


def _within_r(x: np.ndarray, y: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Pearson's r of the within-group centred ranks of ``x`` and ``y`` (2-D: one row per resample;
    the cells sorted by group, group ``k``'s columns starting at ``starts[k]``), pooled over groups (a
    group with a constant side adds nothing); NaN for a row where no group has an order on both sides."""
    sizes = np.diff(np.append(starts, x.shape[1]))
    gid = np.repeat(np.arange(len(starts)), sizes)

    def centred(v):
        span = np.ptp(v, axis=1, keepdims=True) + 1.0
        r = rankdata((v - v.min(axis=1, keepdims=True)) + gid * span, axis=1)  # ranks never cross groups
        return r - np.repeat(np.add.reduceat(r, starts, axis=1) / sizes, sizes, axis=1)
    rx, ry = centred(x), centred(y)
    den = np.sqrt((rx ** 2).sum(axis=1) * (ry ** 2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(axis=1) / den, np.nan)


def spearman_within(x, y, groups, n_boot: int = 2000, seed: int = 0) -> dict:
    """Spearman's rho of ``x`` and ``y`` *within* groups (here: cells of one target): each side ranked
    within its group and centred, the centred ranks of all groups pooled into one correlation (a
    stratified Spearman; with one group it is that group's rho). Groups with fewer than 3 cells are
    left out (no statistic over fewer than 3 points). ``p``: a permutation test that shuffles ``y``
    within groups (``n_boot`` shuffles, two-sided); the 95 % interval: a bootstrap that resamples
    cells within each group. Returns ``n_groups`` and ``n_cells`` used; NaN where no group has 3
    cells with an order on both sides."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    groups = np.asarray(groups, dtype=object).astype(str)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y, groups = x[ok], y[ok], groups[ok]
    idx = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    idx = [i for i in idx if len(i) >= 3 and np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0]
    n_cells = int(sum(len(i) for i in idx))
    nan = {"n_groups": len(idx), "n_cells": n_cells, "rho": np.nan, "p": np.nan, "ci_low": np.nan, "ci_high": np.nan}
    if not idx:
        return nan
    order = np.concatenate(idx)
    starts = np.cumsum([0] + [len(i) for i in idx[:-1]])
    rho = float(_within_r(x[order][None], y[order][None], starts)[0])
    rng = np.random.default_rng(seed)
    # shuffles of y within groups, and bootstrap resamples of cells within groups (one row each)
    perm = np.concatenate([rng.permuted(np.tile(i, (n_boot, 1)), axis=1) for i in idx], axis=1)
    boot = np.concatenate([rng.choice(i, (n_boot, len(i))) for i in idx], axis=1)
    r_perm = _within_r(np.tile(x[order], (n_boot, 1)), y[perm], starts)
    r_boot = _within_r(x[boot], y[boot], starts)
    r_boot = r_boot[np.isfinite(r_boot)]
    p = float((np.sum(np.abs(r_perm) >= abs(rho) - 1e-12) + 1) / (n_boot + 1))
    lo, hi = (np.percentile(r_boot, [2.5, 97.5]) if len(r_boot) else (np.nan, np.nan))
    return {**nan, "rho": rho, "p": p, "ci_low": float(lo), "ci_high": float(hi)}


def trm_cells(runs: pd.DataFrame, method: str = "trm") -> pd.DataFrame:
    """One row per cell of a table's runs: vanilla's and ``method``'s mean Dice over seeds, the gain
    (100 x (method - vanilla) / vanilla) and the cell's ``PREDICTORS`` (one value per cell)."""
    keys = _cell_keys(runs)
    mean = runs.groupby(keys + ["method"], dropna=False).dice.mean().unstack("method")
    if method not in mean or "vanilla" not in mean:
        return pd.DataFrame()
    out = pd.DataFrame({"vanilla": mean["vanilla"], method: mean[method]})
    out["gain_pct"] = 100 * (out[method] - out.vanilla) / out.vanilla
    preds = [c for c in PREDICTORS if c in runs]
    feats = runs.groupby(keys, dropna=False)[preds].first()
    return out.join(feats).reset_index()


def where_trm_helps(tables: dict, method: str = "trm", n_boot: int = 2000, early=()) -> tuple:
    """``(cells, stats)`` over the tables' cells (``tables``: key -> that table's runs at its budget):
    ``cells`` one row per cell (``trm_cells``, with its ``table``), ``stats`` Spearman's rho of the gain
    with each predictor (``spearman_ci``) per table and over the tables' cells together (``all``),
    with ``predicts``: whether the 95 % interval excludes 0; beside it the same within targets
    (``spearman_within``, groups = a table's target: ``within_rho``, ``within_p``, ``within_ci_low``,
    ``within_ci_high``, ``within_groups``, ``predicts_within``). A predictor a sweep did not record
    (``risk_share_5`` before it existed) is left out.

    ``early``: the keys of tables whose budget is not accepted (early-budget: their gains say how fast
    the methods learn, not where they end). Their cells and rows carry ``early_budget`` True; ``all``
    pools only the accepted tables (with fewer than two of them, no ``all`` row), unless none is
    accepted, where it pools every table and is itself early-budget."""
    early = set(early)
    frames = [trm_cells(r, method).assign(table=k, early_budget=k in early) for k, r in tables.items()]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(), pd.DataFrame()
    cells = pd.concat(frames, ignore_index=True)
    rows = []
    groups = [(k, cells[cells.table == k]) for k in cells.table.unique()]
    pool = cells[~cells.early_budget] if not cells.early_budget.all() else cells
    if pool.table.nunique() > 1:
        groups.append(("all", pool))
    for key, g in groups:
        target = g.table + "|" + g.dataset.astype(str) + "|" + g.target.astype(str)  # spearman_within's groups
        for p, label in PREDICTORS.items():
            if p not in g or g[p].isna().all():
                continue
            st = spearman_ci(g[p], g.gain_pct, n_boot)
            wi = spearman_within(g[p], g.gain_pct, target, n_boot)
            rows.append({"table": key, "early_budget": bool(g.early_budget.any()), "predictor": p, "label": label,
                         **st, "predicts": _excludes_0(st),
                         "within_rho": wi["rho"], "within_p": wi["p"], "within_ci_low": wi["ci_low"],
                         "within_ci_high": wi["ci_high"], "within_groups": wi["n_groups"],
                         "predicts_within": _excludes_0(wi)})
    return cells, pd.DataFrame(rows)


def _excludes_0(st: dict) -> bool:
    return bool(np.isfinite(st["ci_low"]) and (st["ci_low"] > 0 or st["ci_high"] < 0))


def helps_line(stats: pd.DataFrame, table: str) -> str:
    """The answer in one line for ``table`` (or ``all``): each predictor's rho across cells and within
    targets, and which intervals exclude 0. A predictor that predicts across cells but not within
    targets is named as such: its rho is a difference between targets, not an order of the sources."""
    s = stats[stats.table == table]
    if s.empty:
        return f"{table}: no cells with both vanilla and TRM"
    parts = []
    for r in s.itertuples():
        if not np.isfinite(r.rho):
            parts.append(f"{r.predictor}: no statistic ({r.n_cells} cells, or one side constant)")
            continue
        part = f"{r.predictor} rho {r.rho:+.2f} (95% CI {r.ci_low:+.2f} to {r.ci_high:+.2f}, {r.n_cells} cells"
        if np.isfinite(r.within_rho):
            part += (f"; within {r.within_groups} target{'' if r.within_groups == 1 else 's'} {r.within_rho:+.2f}, "
                     f"CI {r.within_ci_low:+.2f} to {r.within_ci_high:+.2f}")
        parts.append(part + ")")
    yes = [r.predictor for r in s.itertuples() if r.predicts]
    within = [r.predictor for r in s.itertuples() if r.predicts_within]
    verdict = (f"predicts the gain: {', '.join(yes)}" if yes else "none of them predicts the gain (every interval holds 0)")
    if s.early_budget.any():
        verdict += (" [EARLY-BUDGET: these cells' gains are at a budget not accepted, not where the methods end"
                    + ("; not pooled in `all`]" if table != "all" and not stats.early_budget.all() else "]"))
    if s.within_rho.notna().any():
        verdict += (f"; within targets: {', '.join(within)}" if within else "; within targets: none")
        between = [p for p in yes if p not in within]
        if between:
            verdict += f" ({', '.join(between)}: a difference between targets, not an order of sources)"
    return f"{table}: " + "; ".join(parts) + f" -> {verdict}"


def helps_figure(cells: pd.DataFrame):
    """TRM's gain over vanilla per cell against each predictor the cells carry: one row of panels per
    table, each with its own scales (a table whose gains span -100 % would otherwise flatten another's
    few per cent), one colour per target; a thin line joins one target's cells (sorted by the
    predictor), so an order within targets and a difference between them can be told apart by eye.
    An early-budget table's cells are hollow and its row says so."""
    preds = [p for p in PREDICTORS if p in cells and cells[p].notna().any()]
    tables = sorted(cells.table.unique())
    nr, nc = len(tables), max(1, len(preds))
    fig, axes = plt.subplots(nr, nc, figsize=(4.2 * nc, 3.0 * nr), squeeze=False)
    for row, k in zip(axes, tables):
        g = cells[cells.table == k]
        early = bool(g.early_budget.any())
        for ax, p in zip(row, preds):
            for j, ((_, tgt), t) in enumerate(g.groupby(["dataset", "target"], sort=True)):
                t = t.sort_values(p)
                ax.plot(t[p], t.gain_pct, color=f"C{j % 10}", lw=0.7, alpha=0.5)
                ax.scatter(t[p], t.gain_pct, s=16, edgecolors=f"C{j % 10}",
                           facecolors="none" if early else f"C{j % 10}", label=str(tgt), alpha=0.85)
            ax.axhline(0, color="k", lw=0.8)
            ax.set_xlabel(PREDICTORS[p])
            ax.set_ylabel("TRM gain (%)")
            ax.set_title(k + (" (early-budget)" if early else ""), fontsize=9)
        row[-1].legend(fontsize=6, title="target", title_fontsize=7, loc="best")
    fig.suptitle("Where does TRM help? TRM's gain over vanilla, one point per cell (mean over seeds); "
                 "a line joins one target's cells", fontsize=10)
    fig.tight_layout()
    return fig


def normaliser_spread(labels, batch_size: int, seed: int = 0, n_batches: int = 1000) -> dict:
    """How much eq. (7)'s normaliser varies over the batches fine-tuning draws from ``labels``.

    Eq. (7) divides the batch's weighted cross-entropy by its foreground pixel count (the pixel
    count when a batch has none; ``losses.weighted_cross_entropy``); vanilla divides by the pixel
    count. Per batch, ``ratio`` = pixels / foreground pixels (1 for a batch with no foreground) is
    the factor by which eq. (7) scales that batch's loss relative to vanilla's mean. Under Adam a
    constant ratio is a no-op; its spread is the normaliser's only effect: a batch with ratio r
    weighs r / median times a typical batch, and one large r inflates Adam's running second
    moment for the next ~1/(1 - beta2) = 1000 steps.

    Args:
        labels: N x H x W integer labels of the target's training slices (0 = background).
        batch_size, seed: as fine-tuning draws its batches (``train.Batches``: seeded epoch-wise
            shuffling), so the batches are the ones a run with this seed sees.
        n_batches: how many batches to read.

    Returns: ``slices``, ``empty_slices`` (share of slices with no foreground), ``fg_share`` (the
    median slice's foreground share), the ratio's ``median``, ``p5``, ``p95``, ``max`` and
    ``max_over_median`` and ``p95_over_p5``.
    """
    labels = torch.as_tensor(labels)
    if labels.ndim != 3 or labels.shape[0] < 1:
        raise ValueError(f"labels must be N x H x W with N >= 1, got shape {tuple(labels.shape)}")
    if int(n_batches) < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    fg = (labels != 0).reshape(labels.shape[0], -1).sum(dim=1).double()
    per = labels[0].numel()
    batches = Batches(labels.shape[0], int(batch_size), int(seed))
    ratio = []
    for _ in range(int(n_batches)):
        idx = batches.next()
        n_fg = float(fg[idx].sum())
        ratio.append(len(idx) * per / n_fg if n_fg > 0 else 1.0)
    r = np.asarray(ratio)
    med = float(np.median(r))
    p5, p95 = (float(v) for v in np.percentile(r, [5, 95]))
    return {"slices": int(labels.shape[0]), "empty_slices": float((fg == 0).double().mean()),
            "fg_share": float(np.median((fg / per).numpy())), "median": med, "p5": p5, "p95": p95, "max": float(r.max()),
            "max_over_median": float(r.max()) / med, "p95_over_p5": p95 / p5}
