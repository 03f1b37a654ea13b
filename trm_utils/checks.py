"""Running a budget check: the family's sources at T_s and 2T_s, its main-job grid at T and 2T, and
committing sources the check accepts. ``benchmarks/budget_check.py`` is its command line; ``budget``
holds the rule that judges what these write, and reads it back.
"""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Optional

import pandas as pd
import torch

from . import budget as B
from . import experiments as E
from . import sources as S
from .predict import evaluate
from .presets import get_preset, source_iterations
from .utils import get_device


def family_root(family: str, preset: str, data_dir):
    """The data folder of a family's dataset (the phantom is written there when missing)."""
    f = B.family_settings(family)
    return E.resolve_datasets("phantom", data_dir, preset)[f["family"]][1]


def check_sources(family: str, preset: str = "tutorial", data_dir="data", factor: int = 2, log=print,
                  device="auto", root=None, tasks=None, workers: Optional[int] = None,
                  dataset: Optional[str] = None, start: int = 1) -> pd.DataFrame:
    """Each source of the family trained at T_s and ``factor`` x T_s (both cached): its held-out
    Dice on its own task at each budget, its status, the change and the verdict. ``tasks``: these
    source tasks instead of the family's main-job grid's (a sweep's), of ``dataset`` (default the
    family's: a real dataset's name with its ``root``); ``workers``: as ``experiments.prepare_sources``.
    ``start``: check ``start`` x T_s against ``factor`` x that instead (a step of a source's budget
    search, ``sweep.prepare_sources``); the rows' ``iterations_T`` / ``iterations_2T`` say which."""
    f = B.family_settings(family)
    name, sources, _ = B.family_tasks(family, preset)
    sources = list(tasks) if tasks else sources
    name = dataset or name
    root = root if root is not None else family_root(family, preset, data_dir)
    base = get_preset(preset)
    t_s = int(start) * source_iterations(base, name)
    trained = {}
    for tag, k in (("T", 1), ("2T", factor)):  # the missing ones side by side on a CPU (E.prepare_sources)
        cfg = dict(base, source_iterations=k * t_s)
        out = E.prepare_sources([(name, root, s) for s in sources], cfg, device=device, log=log, workers=workers)
        trained.update({(tag, s): out[(name, s)] for s in sources})
    rows = []
    for source in sources:
        row = {"family": family, "dataset": name, "source": source, "iterations_T": t_s, "iterations_2T": factor * t_s}
        for tag, k in (("T", 1), ("2T", factor)):
            _, info = trained[(tag, source)]
            st = B.run_status(info["curve"])
            row.update({f"dice_{tag}": st["final"], f"status_{tag}": st["status"], f"drop_{tag}": st["drop"],
                        f"seconds_{tag}": info.get("seconds")})
            if log:
                log(f"source {source} at {k * t_s} iterations: held-out Dice {st['final']:.3f} ({st['status']}; "
                    f"{info['status']})")
        row["floor"] = f["source_floor"]
        rows.append(row)
    return B.judge_sources(pd.DataFrame(rows))


def carry_sources(family: str, preset: str = "tutorial", data_dir="data", check_folder=None, folder=None,
                  log=print, root=None) -> list:
    """Commit the family's sources (``sources.write_carried``, into ``results/sources/``): the
    models trained at the preset's budget T_s, taken from this checkout's cache, once the committed
    source check in ``check_folder`` (default ``B.CHECK_DIR``) accepts T_s under rule v2 and was made
    at the preset's current T_s. Anything else is a one-line ``ValueError`` that says what to run.
    A source whose carried file already has this identity is left as it is. Returns the ``.pt`` paths."""
    name, sources, _ = B.family_tasks(family, preset)
    root = root if root is not None else family_root(family, preset, data_dir)
    cfg = get_preset(preset)
    t_s = source_iterations(cfg, name)
    chk = B.load_check(family, check_folder)["sources"]
    cmd = f"python benchmarks/budget_check.py {family} --skip-grid"
    if chk is None or int(chk.iterations_T.iloc[0]) != t_s:
        raise ValueError(f"{family}: no source check at the preset's {t_s} iterations in "
                         f"{check_folder or B.CHECK_DIR}; run `{cmd}` first")
    if not bool(chk.ok.all()):
        raise ValueError(f"{family}: the source check does not accept {t_s} iterations ({B.source_verdict_line(family, chk)}); "
                         f"a source is carried only at an accepted budget")
    out = []
    for task in sources:
        path, status, reason = E.source_choice(name, root, task, cfg)
        if status == "carried":
            log(f"{name} {task}: {reason}: unchanged")
            out.append(path)
            continue
        if status != "cached":
            raise ValueError(f"{name} {task} is not trained at {t_s} iterations in this checkout; run `{cmd}` first")
        out.append(carry_cached(name, root, task, cfg, folder, f"results/calibration/{family}_sources_budget_check.csv",
                                log=log, why=reason))
    return out


def carry_cached(name: str, root, task: str, cfg: dict, folder, budget_check: str, log=print, why: str = "",
                 check: Optional[dict] = None):
    """Write the source model this checkout's cache holds for ``task`` (``experiments.source_model_path``)
    into ``folder`` as a carried source (``sources.write_carried``), with its held-out Dice on its own
    task and ``budget_check``, the check that judged its budget (``check``: its row). Returns the ``.pt`` path."""
    path = E.source_model_path(name, root, task, cfg)
    if not path.exists():
        raise ValueError(f"{name} {task}: no trained model in this checkout's cache ({path}); train it first")
    state = torch.load(path, map_location="cpu", weights_only=False)
    model = E.new_unet(name, cfg)
    model.load_state_dict(state["state_dict"])
    own = evaluate(model, E.load_task(name, root, task, "test", cfg), device="cpu")["dice"]
    ident = S.source_identity(name, root, task, cfg)
    pt, _ = S.write_carried(state, ident, own, folder, budget_check=budget_check, check=check)
    if log:
        log(f"{name} {task}: carried {pt} (own-task held-out Dice {own:.4f}, {ident['training']['iterations']} "
            f"iterations" + (f"; was: {why}" if why else "") + ")")
    return pt


def _grid_worker(args) -> pd.DataFrame:
    """One job of ``check_grid`` in a worker process: one source's cells at one budget and size."""
    name, root, source, targets, methods, seeds, cfg, n, device, threads = args
    torch.set_num_threads(threads)
    return E.run_grid(name, root, [source], targets, methods, seeds, cfg, max_slices=n, device=device, log=None)


def check_grid(family: str, preset: str = "tutorial", data_dir="data", seeds=(0, 1, 2), factor: int = 2, log=print,
               device="auto", root=None, workers: Optional[int] = None, budget: Optional[int] = None,
               lr: Optional[float] = None, methods=None, reuse_t: Optional[pd.DataFrame] = None) -> tuple:
    """The family's main-job grid at T and ``factor`` x T. Returns ``(table, runs)``: ``compare``'s
    table (both budgets side by side, the changes, the verdict) and every run (``budget`` "T" / "2T").
    ``budget``: check a candidate T (a whole multiple of the preset's, ``budget_multiple``) instead
    of the preset's own; ``lr`` a candidate fine-tuning learning rate; ``methods`` a subset of the
    family's methods (a partial check: a method failing it fails the full check, passing it does not
    pass the full check). ``reuse_t``: the runs of an earlier check (its ``_budget_runs.csv``) whose 2T
    is this check's T, taken as this check's T runs instead of training them again (``reused_t_runs``:
    same cells, methods, seeds, budget and source models, else a one-line ``ValueError``). On one
    machine the same budget, seeds and sources give the same runs to the last bit, so a doubling
    series (400, 800, 1600, ...) trains each budget once.

    On the CPU with ``workers`` > 1 (default: one per core, at most 4) each (budget, size, source)
    job runs in a worker process with ``cores // workers`` threads, the longest first (``make bench``'s
    thread split: the tutorial's small U-Nets keep one thread busy better than two); the sources are
    trained (or loaded) first, here. The same runs as one after another, up to float rounding (the
    thread count changes the order of some sums)."""
    f = B.family_settings(family)
    name, sources, targets = B.family_tasks(family, preset)
    root = root if root is not None else family_root(family, preset, data_dir)
    workers, threads = E.cpu_workers(workers)
    base = B.budget_multiple(family, preset, budget)
    methods = B.check_methods(family, methods)
    jobs = []  # (tag, factor, size, source, cfg)
    for tag, k in (("T", base), ("2T", base * factor)):
        cfg = B.budget_cfg(family, preset, k, lr=lr)
        for n in f["sizes"] or [None]:
            jobs += [(tag, k, n, s, cfg) for s in sources]
    reused = None
    if reuse_t is not None:
        reused = reused_t_runs(reuse_t, family, preset, sources, methods, seeds, B.budget_cfg(family, preset, base, lr=lr),
                               root)
        jobs = [j for j in jobs if j[0] != "T"]
    parallel = get_device(device).type == "cpu" and workers > 1 and len(jobs) > 1
    if not parallel:
        out = []
        for tag, k, n, s, cfg in jobs:
            if log:
                log(f"{family} grid at {cfg['iterations']} iterations, source {s}" + (f", {n} slices" if n else ""))
            out.append(E.run_grid(name, root, [s], targets, methods, seeds, cfg, max_slices=n, device=device,
                                  log=log))
    else:
        E.prepare_sources([(name, root, s) for s in sources], B.budget_cfg(family, preset, 1), device=device, log=log)
        if log:
            log(f"{family} grid: {len(jobs)} jobs (budget x size x source), {workers} at a time with {threads} "
                f"thread(s) each")
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:  # submitted longest first
            futures = {i: pool.submit(_grid_worker, (name, root, s, targets, methods, seeds, cfg, n, "cpu", threads))
                       for i, (_, k, n, s, cfg) in sorted(enumerate(jobs), key=lambda j: -j[1][1] * (j[1][2] or 10**6))}
            out = [futures[i].result() for i in range(len(jobs))]
    runs = pd.concat(([reused] if reused is not None else [])
                     + [df.assign(budget=tag, family=family, n_slices=n) for df, (tag, _, n, _, _) in zip(out, jobs)],
                     ignore_index=True)
    table = B.compare(runs)
    if B.is_partial(family, methods):  # a partial check never accepts a budget
        table["accepted"] = False
    return table, runs


def reused_t_runs(prev: pd.DataFrame, family: str, preset: str, sources, methods, seeds, cfg: dict, root) -> pd.DataFrame:
    """The 2T runs of an earlier check (``prev``) that are exactly this check's T runs: the same
    iterations and learning rate, every (source, size, method, seed) present, each made with the
    source model this checkout would load (``source_identity``). Relabelled ``budget="T"``. Anything
    missing or different is a one-line ``ValueError`` that names it."""
    f = B.family_settings(family)
    its = int(cfg["iterations"])
    p = prev[(prev.budget == "2T") & (prev.iterations == its)]
    if p.empty:
        raise ValueError(f"the runs to reuse hold no 2T runs at {its} iterations (this check's T); give the runs file "
                         f"of the check at {its // 2} iterations")
    name = f["dataset"]
    base = get_preset(preset)
    want = {S.identity_hash(S.source_identity(name, root, s, base)) for s in sources}
    if "source_identity" not in p or not set(p.source_identity) <= want:
        raise ValueError("the runs to reuse were made with other source models than this checkout's (their "
                         "source_identity differs, or is not recorded); run the check in full")
    sizes = f["sizes"] or [None]
    key = lambda df: set(zip(df.source, df.method, df.seed.astype(int),  # noqa: E731
                             [None if pd.isna(v) else int(v) for v in df.n_slices]))
    need = {(s, m, int(sd), n) for s in sources for m in methods for sd in seeds for n in sizes}
    missing = need - key(p)
    if missing:
        raise ValueError(f"the runs to reuse lack {len(missing)} of this check's T runs, e.g. {sorted(missing, key=str)[0]}")
    keep = [(s, m, int(sd), None if pd.isna(n) else int(n)) in need
            for s, m, sd, n in zip(p.source, p.method, p.seed, p.n_slices)]
    return p[keep].assign(budget="T")
