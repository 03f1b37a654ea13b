"""Is a budget long enough? The doubling check behind every reported table, and its verdict.

The rule (decided before any measurement, never tuned on results): a family's tutorial budget
T is **accepted** when the same grid (cells, methods, seeds) run at 2T, with the same schedule
shape, changes no method's mean held-out Dice by more than ``DICE_TOL`` (0.01) and no method's
relative gain over vanilla by more than ``GAIN_TOL`` (1 percentage point). A source's pre-training
budget T_s is accepted when its held-out Dice on its own task moves by at most 0.01 between T_s
and 2T_s (and, for a tumour source, reaches ``SOURCE_FLOOR`` 0.35).

"Same schedule shape": the learning rate decays over the same fraction of the run
(``lr_decay``), and the held-out Dice is read as often relative to the run (``eval_every``
doubled), so the per-run status (``experiments.run_status``) reads comparable curves.

``benchmarks/budget_check.py FAMILY`` runs it and writes ``results/calibration/``;
``verdict_text`` / ``load_check`` read what it wrote (notebooks 04 and 05 print them).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pandas as pd

from . import experiments as E
from .utils import REPO_ROOT

DICE_TOL = 0.01
GAIN_TOL = 1.0
SOURCE_DICE_TOL = 0.01
CHECK_DIR = REPO_ROOT / "results" / "calibration"

#: What the main job reports per family (notebooks 04 and 05 use the same defaults; a test
#: checks they agree). ``sources`` / ``targets`` None: the preset's tutorial grid.
FAMILIES = {
    "tissue": {"family": "tissue", "dataset": "iseg2019", "sources": None, "targets": None, "sizes": None,
               "methods": ["vanilla", "class_weight", "trs_map", "trm", "trm@map=image"], "source_floor": 0.0},
    "tumour": {"family": "tumour", "dataset": "fets2021", "sources": None, "targets": None, "sizes": None,
               "methods": ["vanilla", "class_weight", "trs_map", "trm", "trm@map=image"], "source_floor": 0.35},
    "fewshot": {"family": "tissue", "dataset": "iseg2019", "sources": ["CSF-T1"], "targets": ["WM-T1"],
                "sizes": [100, 25], "methods": ["vanilla", "trm"], "source_floor": 0.0},
}
#: The floor every tumour source must reach on its own task (4-class mean held-out Dice).
SOURCE_FLOOR = FAMILIES["tumour"]["source_floor"]


def _family(family: str) -> dict:
    if family not in FAMILIES:
        raise ValueError(f"unknown budget family {family!r}; choose one of {list(FAMILIES)}")
    return FAMILIES[family]


def family_tasks(family: str, preset: str = "tutorial") -> tuple:
    """(dataset name, sources, targets) of a family's main-job grid."""
    f = _family(family)
    s, t = E.grid_tasks(f["dataset"], preset)
    return f["dataset"], list(f["sources"] or s), list(f["targets"] or t)


def budget_cfg(family: str, preset: str = "tutorial", factor: int = 1, lr: Optional[float] = None) -> dict:
    """The fine-tuning settings of ``family`` at ``factor`` x its budget, resolved for its dataset:
    iterations and ``eval_every`` scaled, everything else (the decay's fraction included) kept.
    ``lr``: a candidate fine-tuning learning rate in place of the preset's (sources untouched)."""
    f = _family(family)
    cfg = E.get_preset(preset)
    if f["sizes"] and cfg.get("fewshot"):
        cfg = {**cfg, **cfg["fewshot"]}
    cfg.pop("fewshot", None)
    if lr is not None:
        if not float(lr) > 0:
            raise ValueError(f"candidate learning rate {lr!r} for {family}: give a positive number, e.g. 3e-3")
        cfg["lr"] = float(lr)
    cfg = E.for_dataset(cfg, f["dataset"])
    cfg["iterations"] = int(cfg["iterations"])
    cfg["eval_every"] = int(cfg.get("eval_every") or cfg["iterations"])
    return E.scale_budget(cfg, factor)


def _root(family: str, preset: str, data_dir):
    f = _family(family)
    return E.resolve_datasets("phantom", data_dir, preset)[f["family"]][1]


def check_sources(family: str, preset: str = "tutorial", data_dir="data", factor: int = 2, log=print,
                  device="auto", root=None) -> pd.DataFrame:
    """Each source of the family trained at T_s and ``factor`` x T_s (both cached): its held-out
    Dice on its own task at each budget, its status, the change and the verdict."""
    f = _family(family)
    name, sources, _ = family_tasks(family, preset)
    root = root if root is not None else _root(family, preset, data_dir)
    base = E.get_preset(preset)
    t_s = E.source_iterations(base, name)
    trained = {}
    for tag, k in (("T", 1), ("2T", factor)):  # the missing ones side by side on a CPU (E.prepare_sources)
        cfg = dict(base, source_iterations=k * t_s)
        out = E.prepare_sources([(name, root, s) for s in sources], cfg, device=device, log=log)
        trained.update({(tag, s): out[(name, s)] for s in sources})
    rows = []
    for source in sources:
        row = {"family": family, "source": source, "iterations_T": t_s, "iterations_2T": factor * t_s}
        for tag, k in (("T", 1), ("2T", factor)):
            _, info = trained[(tag, source)]
            st = E.run_status(info["curve"])
            row.update({f"dice_{tag}": st["final"], f"status_{tag}": st["status"], f"drop_{tag}": st["drop"],
                        f"seconds_{tag}": info.get("seconds")})
            if log:
                log(f"source {source} at {k * t_s} iterations: held-out Dice {st['final']:.3f} ({st['status']}; "
                    f"{info['status']})")
        row["d_dice"] = row["dice_2T"] - row["dice_T"]
        row["floor"] = f["source_floor"]
        row["ok"] = bool(abs(row["d_dice"]) <= SOURCE_DICE_TOL and row["dice_T"] >= f["source_floor"])
        rows.append(row)
    return pd.DataFrame(rows)


def _summary(df: pd.DataFrame, by_size: bool) -> pd.DataFrame:
    """Per (size,) method: mean Dice, std over seeds, gain, status counts."""
    parts = []
    for n, d in (df.groupby("n_slices", sort=False) if by_size else [(None, df)]):
        s = E.summarize(d)
        c = E.status_counts(d).set_index("method")
        t = s[["dice_mean", "dice_std", "gain_pct", "cells_won"]].join(c)
        t.insert(0, "n_slices", n)
        parts.append(t.reset_index().rename(columns={"index": "method"}))
    return pd.concat(parts, ignore_index=True)


def _grid_worker(args) -> pd.DataFrame:
    """One job of ``check_grid`` in a worker process: one source's cells at one budget and size."""
    import torch

    name, root, source, targets, methods, seeds, cfg, n, device, threads = args
    torch.set_num_threads(threads)
    return E.run_grid(name, root, [source], targets, methods, seeds, cfg, max_slices=n, device=device, log=None)


def budget_multiple(family: str, preset: str, budget: Optional[int]) -> int:
    """How many times the preset's budget T a candidate ``budget`` is (1 for None). A candidate
    must be a whole multiple of T, so that the schedule keeps its shape (``scale_budget``)."""
    if budget is None:
        return 1
    t = budget_cfg(family, preset, 1)["iterations"]
    if int(budget) < t or int(budget) % t:
        raise ValueError(f"budget {budget} for {family}: give a whole multiple of the {preset} preset's {t} "
                         f"iterations (e.g. {2 * t} or {4 * t}), so the schedule keeps its shape")
    return int(budget) // t


def check_methods(family: str, methods=None) -> list:
    """The methods a grid check runs: the family's own (None), or a subset of them with vanilla in it
    (the gains are over vanilla); anything else is a one-line error naming the choices."""
    f = _family(family)
    methods = list(f["methods"]) if methods is None else list(methods)
    unknown = [m for m in methods if m not in f["methods"]]
    if unknown or "vanilla" not in methods:
        raise ValueError(f"methods {','.join(unknown or methods)} for {family}: give a subset of "
                         f"{','.join(f['methods'])} with vanilla in it (the gains are over vanilla)")
    return methods


def is_partial(family: str, methods) -> bool:
    """Whether a check on ``methods`` (None: the family's own) leaves out some of the family's
    methods: a partial check, which can fail a budget and never accepts one."""
    return methods is not None and set(methods) != set(_family(family)["methods"])


def check_grid(family: str, preset: str = "tutorial", data_dir="data", seeds=(0, 1, 2), factor: int = 2, log=print,
               device="auto", root=None, workers: Optional[int] = None, budget: Optional[int] = None,
               lr: Optional[float] = None, methods=None) -> tuple:
    """The family's main-job grid at T and ``factor`` x T. Returns ``(table, runs)``: ``compare``'s
    table (both budgets side by side, the changes, the verdict) and every run (``budget`` "T" / "2T").
    ``budget``: check a candidate T (a whole multiple of the preset's, ``budget_multiple``) instead
    of the preset's own; ``lr`` a candidate fine-tuning learning rate; ``methods`` a subset of the
    family's methods (a partial check: a method failing it fails the full check, passing it does not
    pass the full check).

    On the CPU with ``workers`` > 1 (default: one per core, at most 4) each (budget, size, source)
    job runs in a worker process with ``cores // workers`` threads, the longest first (``make bench``'s
    thread split: the tutorial's small U-Nets keep one thread busy better than two); the sources are
    trained (or loaded) first, here. The same runs as one after another, up to float rounding (the
    thread count changes the order of some sums)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from .utils import get_device

    f = _family(family)
    name, sources, targets = family_tasks(family, preset)
    root = root if root is not None else _root(family, preset, data_dir)
    workers, threads = E.cpu_workers(workers)
    base = budget_multiple(family, preset, budget)
    methods = check_methods(family, methods)
    jobs = []  # (tag, factor, size, source, cfg)
    for tag, k in (("T", base), ("2T", base * factor)):
        cfg = budget_cfg(family, preset, k, lr=lr)
        for n in f["sizes"] or [None]:
            jobs += [(tag, k, n, s, cfg) for s in sources]
    parallel = get_device(device).type == "cpu" and workers > 1 and len(jobs) > 1
    if not parallel:
        out = []
        for tag, k, n, s, cfg in jobs:
            if log:
                log(f"{family} grid at {cfg['iterations']} iterations, source {s}" + (f", {n} slices" if n else ""))
            out.append(E.run_grid(name, root, [s], targets, methods, seeds, cfg, max_slices=n, device=device,
                                  log=log))
    else:
        E.prepare_sources([(name, root, s) for s in sources], budget_cfg(family, preset, 1), device=device, log=log)
        if log:
            log(f"{family} grid: {len(jobs)} jobs (budget x size x source), {workers} at a time with {threads} "
                f"thread(s) each")
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:  # submitted longest first
            futures = {i: pool.submit(_grid_worker, (name, root, s, targets, methods, seeds, cfg, n, "cpu", threads))
                       for i, (_, k, n, s, cfg) in sorted(enumerate(jobs), key=lambda j: -j[1][1] * (j[1][2] or 10**6))}
            out = [futures[i].result() for i in range(len(jobs))]
    runs = pd.concat([df.assign(budget=tag, family=family, n_slices=n)
                      for df, (tag, _, n, _, _) in zip(out, jobs)], ignore_index=True)
    table = compare(runs)
    if is_partial(family, methods):  # a partial check never accepts a budget
        table["accepted"] = False
    return table, runs


def compare(runs: pd.DataFrame) -> pd.DataFrame:
    """The verdict from the runs of both budgets (``budget`` "T" / "2T"; ``n_slices`` set for a
    few-shot family): per (size,) method, each budget's mean Dice (std over seeds), gain over
    vanilla, status counts, then ``d_dice``, ``d_gain``, ``ok`` (both changes within the limits)
    and ``accepted`` (every method ok)."""
    by_size = "n_slices" in runs and runs.n_slices.notna().any()
    a = _summary(runs[runs.budget == "T"], by_size)
    b = _summary(runs[runs.budget == "2T"], by_size)
    t = a.merge(b, on=["n_slices", "method"], suffixes=("_T", "_2T"), sort=False)
    t.insert(0, "family", runs.family.iloc[0] if "family" in runs else "")
    t.insert(3, "iterations_T", int(runs[runs.budget == "T"].iterations.max()))
    t.insert(4, "iterations_2T", int(runs[runs.budget == "2T"].iterations.max()))
    t["d_dice"] = t.dice_mean_2T - t.dice_mean_T
    t["d_gain"] = (t.gain_pct_2T - t.gain_pct_T).fillna(0.0)
    t["ok"] = (t.d_dice.abs() <= DICE_TOL) & (t.d_gain.abs() <= GAIN_TOL)
    t["accepted"] = bool(t.ok.all())
    return t


def load_check(family: str, folder=None) -> dict:
    """The committed check of ``family``: ``{"grid", "sources", "meta"}`` (None where missing)."""
    folder = Path(folder) if folder is not None else CHECK_DIR
    out = {}
    for key, fname in (("grid", f"{family}_budget_check.csv"), ("sources", f"{family}_sources_budget_check.csv"),
                       ("runs", f"{family}_budget_runs.csv")):
        p = folder / fname
        out[key] = pd.read_csv(p) if p.exists() else None
    p = folder / f"{family}_budget_check.json"
    out["meta"] = json.loads(p.read_text()) if p.exists() else None
    return out


def grid_verdict_lines(family: str, g: pd.DataFrame) -> list:
    """The verdict of a grid check (``compare``'s table): its largest changes, then each method
    that fails with its Dice and gain at both budgets."""
    t, t2 = int(g.iterations_T.iloc[0]), int(g.iterations_2T.iloc[0])
    verdict = "ACCEPTED" if bool(g.accepted.iloc[0]) else "NOT accepted (the tables are early-budget)"
    partial = family in FAMILIES and is_partial(family, g.method)
    if partial:
        verdict = (f"NOT accepted (a partial check, methods {', '.join(dict.fromkeys(g.method))} only: it can fail "
                   f"a budget, never accept one)")
    lines = [f"{family}: fine-tuning budget {t} iterations {verdict}: at {t2} the largest change of a method's "
             f"mean Dice is {g.d_dice.abs().max():.4f} (limit {DICE_TOL}) and of a gain "
             f"{g.d_gain.abs().max():.2f} points (limit {GAIN_TOL:g})."]
    for r in g[~g.ok].itertuples():
        size = f" at {int(r.n_slices)} slices" if pd.notna(r.n_slices) else ""
        lines.append(f"  fails: {r.method}{size}: Dice {r.dice_mean_T:.4f} -> {r.dice_mean_2T:.4f}, "
                     f"gain {r.gain_pct_T:+.2f} % -> {r.gain_pct_2T:+.2f} %")
    return lines


def verdict_text(family: str, folder=None, preset: Optional[str] = "tutorial") -> str:
    """A few lines for a notebook or a log: the check's verdict, its largest changes, whether it
    was made at the preset's current budgets, and the command that reproduces it."""
    chk = load_check(family, folder)
    cmd = f"python benchmarks/budget_check.py {family}"
    if chk["grid"] is None and chk["sources"] is None:
        return f"{family}: no budget check committed; run `{cmd}` (the tables below are unchecked)"
    lines = []
    g, s = chk["grid"], chk["sources"]
    if g is not None:
        t = int(g.iterations_T.iloc[0])
        lines += grid_verdict_lines(family, g)
        preset = (chk["meta"] or {}).get("preset", preset)
        if preset is not None:
            now = budget_cfg(family, preset, 1)["iterations"]
            if now != t:
                lines.append(f"  STALE: the preset now uses {now} iterations; rerun `{cmd}`")
    if s is not None:
        ok = bool(s.ok.all())
        lines.append(f"{family} sources: pre-training budget {int(s.iterations_T.iloc[0])} iterations "
                     f"{'ACCEPTED' if ok else 'NOT accepted'}: " + "; ".join(
                         f"{r.source} {r.dice_T:.3f} -> {r.dice_2T:.3f} at {int(r.iterations_2T)}" for r in s.itertuples()))
    meta = chk["meta"] or {}
    if meta:
        lines.append(f"  measured at commit {meta.get('commit')} on {meta.get('machine')} in "
                     f"{meta.get('seconds', float('nan')) / 60:.0f} min, seeds {meta.get('seeds')}; reproduce: `{cmd}`")
    return "\n".join(lines)
