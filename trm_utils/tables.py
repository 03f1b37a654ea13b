"""Tables of runs: the paper's headline per method (``summarize``: mean Dice over the grid, its
spread over seeds, the relative gain over vanilla, the cells won), the grid read at an earlier
iteration, the held-out curves as a long table, and the paper's own tables (``reference/``).

A grid is one row per (source, target, method, seed) run, as ``experiments.run_grid`` writes it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .presets import ABLATIONS, CORE_METHODS, IMAGE_READING
from .utils import REPO_ROOT, atomic_write_text, resolve_path


def dice_at(df: pd.DataFrame, iteration: int) -> pd.DataFrame:
    """The grid as it stood at ``iteration``: each run's held-out Dice at the last curve point at or
    before it (the same runs, read early). Same columns as ``df``, ``dice`` replaced."""
    out = df.copy()
    vals = []
    for c in df.curve:
        pts = [d for i, d in json.loads(c) if i <= iteration]
        vals.append(pts[-1] if pts else float("nan"))
    out["dice"] = vals
    out["iterations"] = iteration
    return out


def early_vs_final(df: pd.DataFrame, early: int) -> pd.DataFrame:
    """Per method: ``summarize`` of the grid at iteration ``early`` and at the end, side by side."""
    a, b = summarize(dice_at(df, early)), summarize(df)
    cols = ["dice_mean", "dice_std", "gain_pct", "cells_won"]
    last = int(df.iterations.max())
    return pd.concat({f"at {early}": a[cols], f"at {last} (end)": b[cols]}, axis=1)


def write_csv(df: pd.DataFrame, path) -> Path:
    return atomic_write_text(resolve_path(path), df.to_csv(index=False))


def summarize(df: pd.DataFrame, baseline: str = "vanilla") -> pd.DataFrame:
    """Per method: mean Dice over the grid cells and its spread over seeds, gain over ``baseline``.

    For each seed, the grid mean is the mean over cells; ``dice_mean`` / ``dice_std`` are the
    mean / standard deviation of that grid mean over seeds (std is 0 with one seed).
    ``gain_pct`` = 100 * (mean - baseline mean) / baseline mean, the paper's relative gain;
    ``cells_won`` counts cells where the method's seed-mean beats the baseline's.
    """
    per_seed = df.groupby(["method", "seed"]).dice.mean().unstack("seed")
    cell = df.groupby(["method", "source", "target"]).dice.mean()
    out = pd.DataFrame({"dice_mean": per_seed.mean(axis=1), "dice_std": per_seed.std(axis=1, ddof=1).fillna(0.0),
                        "n_seeds": per_seed.notna().sum(axis=1), "n_cells": cell.groupby("method").size()})
    if baseline in out.index:
        base = out.loc[baseline, "dice_mean"]
        out["gain_pct"] = 100 * (out.dice_mean - base) / base
        b = cell.loc[baseline]
        out["cells_won"] = [int((cell.loc[m].reindex(b.index) > b).sum()) for m in out.index]
    known = (*CORE_METHODS, IMAGE_READING, *ABLATIONS)
    order = [m for m in known if m in out.index] + [m for m in out.index if m not in known]
    return out.loc[order]


def curves_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Long table of the held-out Dice curves: one row per (run, iteration)."""
    rows = []
    for r in df.itertuples():
        for it, dice in json.loads(r.curve):
            rows.append({"dataset": r.dataset, "source": r.source, "target": r.target, "method": r.method,
                         "seed": r.seed, "iteration": it, "dice": dice})
    return pd.DataFrame(rows)


def paper_table(which: str) -> pd.DataFrame:
    """The paper's result tables (copied from the paper into ``reference/``)."""
    files = {"iseg2019": "table1_iseg2019.csv", "fets2021": "table2_fets2021.csv", "fewshot": "table3_fewshot_iseg2019.csv"}
    return pd.read_csv(REPO_ROOT / "reference" / files[which])


def paper_gains(which: str) -> pd.DataFrame:
    """The paper's mean Dice per method and relative gain over vanilla (its headline numbers)."""
    t = paper_table(which)
    t = t[t.source != "average"] if "source" in t else t
    m = t.groupby("method").dice.mean()
    return pd.DataFrame({"dice_mean": m, "gain_pct": 100 * (m - m["vanilla"]) / m["vanilla"]})
