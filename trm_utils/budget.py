"""Is a budget long enough? The doubling check behind every reported table, and its verdict.

**The rule, v2** (decided before the data it judges, never tuned on results; it replaced v1, which
failed a budget for a fall as well as for a rise):

1. *Finished learning.* A fine-tuning budget T is **accepted** when, at 2T with the same schedule
   shape, no method of the paper's table (``GATE_METHODS``) has a mean held-out Dice more than
   ``DICE_TOL`` (0.01) *higher* than at T. A fall is overfitting under the paper's fixed-budget
   protocol: it is reported beside the table as the level's drift at 2T, never a failure, never
   remedied by picking a checkpoint. A source's pre-training budget: its held-out Dice on its own
   task not more than 0.01 higher at 2T, and every tumour source at least ``SOURCE_FLOOR`` (0.35).
2. *The gate covers the methods of the paper's tables* (vanilla, class weight, Trs map, TRM with
   the dataset-level map; few-shot: vanilla and TRM). Variants and ablations (``trm@map=image``,
   ``fg_only``, ...) run at the same budget and get their own verdict (still learning or not),
   which never blocks the table.
3. *A gain's stability is reported, not gated*: beside every gain over vanilla, its value at 2T and
   "stable" when the two differ by at most ``GAIN_TOL`` (1 percentage point), otherwise "depends on
   the budget".
4. The per-run status (flat / overfit / rising / below 0.05, ``run_status``, below) is a
   diagnostic shown beside every table.

"Same schedule shape": the learning rate decays over the same fraction of the run
(``lr_decay``), and the held-out Dice is read as often relative to the run (``eval_every``
doubled), so the per-run status reads comparable curves.

``benchmarks/budget_check.py FAMILY`` runs it (``checks.py``) and writes ``results/calibration/``;
``verdict_text`` / ``load_check`` read what it wrote (notebooks 04 and 05 print them), judging
every committed file by the rule in force (``judge``), whatever rule its ``ok`` column was written
under.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pandas as pd

from .presets import CORE_METHODS, for_dataset, get_preset, grid_tasks, scale_budget, source_iterations
from .tables import summarize
from .utils import REPO_ROOT

DICE_TOL = 0.01
GAIN_TOL = 1.0
SOURCE_DICE_TOL = 0.01
#: The methods of the paper's tables: the rule's gate (Tables I and II; Table III has vanilla and TRM).
GATE_METHODS = CORE_METHODS
RULE = ("rule v2: T is accepted when at 2T no method of the paper's table has a mean held-out Dice more than "
        f"{DICE_TOL} higher (a fall is overfitting, reported as drift); a gain is stable when it moves at most "
        f"{GAIN_TOL:g} point at 2T (reported, not gated)")
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


# ----------------------------------------------------------------------------- the per-run status

#: The per-run status rule (issue "finished learning, decided"): the smoothing window (evaluations)
#: and the two thresholds. Decided before any measurement; never tuned on results.
STATUS_WINDOW = 3
RISING_TOL = 0.01
OVERFIT_TOL = 0.02
#: A run ending below this held-out Dice is listed by name (a failure of its method, or a slow run).
BELOW = 0.05
STATUSES = ("flat", "overfit", "rising")


def smooth_curve(values, window: int = STATUS_WINDOW) -> list:
    """Running mean over ``window`` consecutive evaluations (trailing; the first points average
    what there is so far)."""
    v = [float(x) for x in values]
    return [sum(v[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(v))]


def run_status(curve, window: int = STATUS_WINDOW, rising_tol: float = RISING_TOL,
               overfit_tol: float = OVERFIT_TOL) -> dict:
    """Has a run finished learning? A diagnostic shown beside every table, never a gate.

    ``curve`` is ``[(iteration, dice), ...]`` (a run's held-out Dice, as ``run_grid`` records it).
    The curve is smoothed by a running mean over ``window`` consecutive evaluations, then:

    * ``rising``: the smoothed final exceeds the smoothed value at the start of the last third
      (the first evaluation at or after 2/3 of the last iteration) by more than ``rising_tol``;
    * ``overfit``: else, the smoothed maximum exceeds the smoothed final by more than
      ``overfit_tol`` (the run peaked and fell: it has finished learning; its size is ``drop``,
      and no checkpoint is ever picked to undo it);
    * ``flat``: otherwise.

    Returns ``{"status", "final", "smoothed_final", "smoothed_max", "rise", "drop"}``; ``status``
    is ``"empty"`` for an empty curve.
    """
    pts = sorted((int(i), float(d)) for i, d in curve)
    if not pts:
        nan = float("nan")
        return {"status": "empty", "final": nan, "smoothed_final": nan, "smoothed_max": nan, "rise": nan, "drop": nan}
    its = [i for i, _ in pts]
    sm = smooth_curve([d for _, d in pts], window)
    start = next(k for k, i in enumerate(its) if i >= 2 / 3 * its[-1] - 1e-6)
    rise, drop = sm[-1] - sm[start], max(sm) - sm[-1]
    status = "rising" if rise > rising_tol else "overfit" if drop > overfit_tol else "flat"
    return {"status": status, "final": pts[-1][1], "smoothed_final": sm[-1], "smoothed_max": max(sm),
            "rise": rise, "drop": drop}


def status_table(df: pd.DataFrame, **kw) -> pd.DataFrame:
    """``run_status`` for every run of a grid (one row per run, from its ``curve`` column), with
    ``below`` (the run ended below ``BELOW`` Dice)."""
    rows = []
    for r in df.itertuples():
        st = run_status(json.loads(r.curve), **kw)
        rows.append({"source": r.source, "target": r.target, "method": r.method, "seed": r.seed, **st,
                     "below": bool(r.dice < BELOW)})
    return pd.DataFrame(rows)


def status_counts(df: pd.DataFrame, by=("method",)) -> pd.DataFrame:
    """Per method (or ``by``): runs, and how many are flat / overfit / rising / below 0.05, with the
    largest overfitting drop (0 when none overfit). ``df`` is a grid (with ``curve``, whatever its
    other columns) or a ``status_table``; the groups keep their order of appearance."""
    if "curve" not in df:  # already a status_table
        st = df
    else:
        st = status_table(df)
        for k in by:
            if k not in st and k in df:
                st[k] = df[k].values
    by = [b for b in by if b in st]
    st = st.assign(_overfit_drop=st["drop"].where(st.status == "overfit", 0.0),
                   **{f"_{s}": (st.status == s).astype(int) for s in STATUSES}, _below=st["below"].astype(int))
    g = st.groupby(by, sort=False)
    out = pd.DataFrame({"runs": g.size(), **{s: g[f"_{s}"].sum() for s in STATUSES}, "below_0.05": g["_below"].sum(),
                        "max_drop": g["_overfit_drop"].max()})
    return out.reset_index()


def status_line(counts: pd.DataFrame) -> str:
    """One line per method for the notebooks: ``vanilla 6 runs: 5 flat, 1 overfit (max drop 0.03), ...``."""
    parts = []
    for _, d in counts.iterrows():
        txt = f"{d.get('method', '')}: " + ", ".join(f"{d[s]} {s}" for s in STATUSES) + f" of {d['runs']}"
        if d["overfit"]:
            txt += f" (largest drop {d['max_drop']:.3f})"
        if d["below_0.05"]:
            txt += f", {d['below_0.05']} below {BELOW}"
        parts.append(txt)
    return "; ".join(parts)


def stuck_runs(df: pd.DataFrame, threshold: float = BELOW) -> pd.DataFrame:
    """Runs that ended below ``threshold`` Dice (never left the all-background trap, typically)."""
    return df[df.dice < threshold][["source", "target", "method", "seed", "dice"]]



# ----------------------------------------------------------------------------- the rule

def family_settings(family: str) -> dict:
    if family not in FAMILIES:
        raise ValueError(f"unknown budget family {family!r}; choose one of {list(FAMILIES)}")
    return FAMILIES[family]


def family_tasks(family: str, preset: str = "tutorial") -> tuple:
    """(dataset name, sources, targets) of a family's main-job grid."""
    f = family_settings(family)
    s, t = grid_tasks(f["dataset"], preset)
    return f["dataset"], list(f["sources"] or s), list(f["targets"] or t)


def budget_cfg(family: str, preset: str = "tutorial", factor: int = 1, lr: Optional[float] = None) -> dict:
    """The fine-tuning settings of ``family`` at ``factor`` x its budget, resolved for its dataset:
    iterations and ``eval_every`` scaled, everything else (the decay's fraction included) kept.
    ``lr``: a candidate fine-tuning learning rate in place of the preset's (sources untouched)."""
    f = family_settings(family)
    cfg = get_preset(preset)
    if f["sizes"] and cfg.get("fewshot"):
        cfg = {**cfg, **cfg["fewshot"]}
    cfg.pop("fewshot", None)
    if lr is not None:
        if not float(lr) > 0:
            raise ValueError(f"candidate learning rate {lr!r} for {family}: give a positive number, e.g. 3e-3")
        cfg["lr"] = float(lr)
    cfg = for_dataset(cfg, f["dataset"])
    cfg["iterations"] = int(cfg["iterations"])
    cfg["eval_every"] = int(cfg.get("eval_every") or cfg["iterations"])
    return scale_budget(cfg, factor)


def judge_sources(s: pd.DataFrame) -> pd.DataFrame:
    """Rule v2 for sources (module docstring) on a source check table (``check_sources``'s, or a
    committed CSV): ``d_dice``, ``drift`` and ``ok`` (not more than ``SOURCE_DICE_TOL`` higher at
    2T, and at least the family's floor at T)."""
    s = s.copy()
    s["d_dice"] = s.dice_2T - s.dice_T
    s["drift"] = [drift_word(d) for d in s.d_dice]
    s["ok"] = (s.d_dice <= SOURCE_DICE_TOL) & (s.dice_T >= s.floor)
    return s


def _summary(df: pd.DataFrame, by_size: bool) -> pd.DataFrame:
    """Per (size,) method: mean Dice, std over seeds, gain, status counts."""
    parts = []
    for n, d in (df.groupby("n_slices", sort=False) if by_size else [(None, df)]):
        s = summarize(d)
        c = status_counts(d).set_index("method")
        t = s[["dice_mean", "dice_std", "gain_pct", "cells_won"]].join(c)
        t.insert(0, "n_slices", n)
        parts.append(t.reset_index().rename(columns={"index": "method"}))
    return pd.concat(parts, ignore_index=True)


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
    f = family_settings(family)
    methods = list(f["methods"]) if methods is None else list(methods)
    unknown = [m for m in methods if m not in f["methods"]]
    if unknown or "vanilla" not in methods:
        raise ValueError(f"methods {','.join(unknown or methods)} for {family}: give a subset of "
                         f"{','.join(f['methods'])} with vanilla in it (the gains are over vanilla)")
    return methods


def is_partial(family: str, methods) -> bool:
    """Whether a check on ``methods`` (None: the family's own) leaves out some of the family's
    methods: a partial check, which can fail a budget and never accepts one."""
    return methods is not None and set(methods) != set(family_settings(family)["methods"])


def compare(runs: pd.DataFrame) -> pd.DataFrame:
    """The verdict from the runs of both budgets (``budget`` "T" / "2T"; ``n_slices`` set for a
    few-shot family): per (size,) method, each budget's mean Dice (std over seeds), gain over
    vanilla, status counts, then ``judge``'s columns."""
    by_size = "n_slices" in runs and runs.n_slices.notna().any()
    a = _summary(runs[runs.budget == "T"], by_size)
    b = _summary(runs[runs.budget == "2T"], by_size)
    t = a.merge(b, on=["n_slices", "method"], suffixes=("_T", "_2T"), sort=False)
    t.insert(0, "family", runs.family.iloc[0] if "family" in runs else "")
    t.insert(3, "iterations_T", int(runs[runs.budget == "T"].iterations.max()))
    t.insert(4, "iterations_2T", int(runs[runs.budget == "2T"].iterations.max()))
    return judge(t)


def drift_word(d_dice: float) -> str:
    """What a method's change of mean Dice at 2T says: still learning (a rise over ``DICE_TOL``),
    overfitting (a fall over it), or settled."""
    return "still learning" if d_dice > DICE_TOL else ("overfitting" if d_dice < -DICE_TOL else "settled")


def judge(t: pd.DataFrame) -> pd.DataFrame:
    """Rule v2 (module docstring) applied to a check table (``compare``'s, or a committed CSV
    written under any earlier rule: only its Dice and gain columns are read). Adds ``d_dice``,
    ``d_gain``, ``gated`` (a method of the paper's table), ``learning`` (more than ``DICE_TOL``
    higher at 2T), ``ok`` (not learning), ``drift`` (``drift_word``), ``gain_stable`` (the gain moves
    at most ``GAIN_TOL`` points; vanilla's is always stable) and ``accepted`` (every gated method
    ok; False with no gated method)."""
    t = t.copy()
    t["d_dice"] = t.dice_mean_2T - t.dice_mean_T
    t["d_gain"] = (t.gain_pct_2T - t.gain_pct_T).fillna(0.0)
    t["gated"] = t.method.isin(GATE_METHODS)
    t["learning"] = t.d_dice > DICE_TOL
    t["ok"] = ~t.learning
    t["drift"] = [drift_word(d) for d in t.d_dice]
    t["gain_stable"] = t.d_gain.abs() <= GAIN_TOL
    t["accepted"] = bool(t.gated.any() and t[t.gated].ok.all())
    t["rule"] = "v2"
    return t


def load_check(family: str, folder=None, stem: Optional[str] = None) -> dict:
    """The committed check of ``family``: ``{"grid", "sources", "runs", "meta", "sources_meta"}`` (None
    where missing), the grid and sources judged by the rule in force. ``stem``: a candidate budget's
    files (e.g. ``tumour_T1600``) instead of the preset's own (``<family>_budget_check.csv``)."""
    folder = Path(folder) if folder is not None else CHECK_DIR
    stem = stem or family
    out = {}
    for key, fname in (("grid", f"{stem}_budget_check.csv"), ("sources", f"{stem}_sources_budget_check.csv"),
                       ("runs", f"{stem}_budget_runs.csv")):
        p = folder / fname
        out[key] = pd.read_csv(p) if p.exists() else None
    for key, fname in (("meta", f"{stem}_budget_check.json"), ("sources_meta", f"{stem}_sources_budget_check.json")):
        p = folder / fname
        out[key] = json.loads(p.read_text()) if p.exists() else None
    if out["grid"] is not None:  # judged by the rule in force, whatever rule wrote its ok column
        out["grid"] = judge(out["grid"])
        if is_partial(family, out["grid"].method.unique()):
            out["grid"]["accepted"] = False
    if out["sources"] is not None:
        out["sources"] = judge_sources(out["sources"])
    return out


def doubling_series(family: str, folder=None) -> pd.DataFrame:
    """Every committed full check of ``family`` at the preset's learning rate, in budget order: the
    preset's own (``<family>_budget_check.csv``) and each candidate budget (``<family>_T<T>_...``),
    judged by rule v2. One row per (check, size, method): ``iterations_T``, ``iterations_2T``, both
    Dice and gains, ``d_dice``, ``drift``, ``gain_stable``, ``accepted``. A series run by doubling
    (400, 800, 1600, ...) gives each method's drift per doubling and the gain at every budget."""
    folder = Path(folder) if folder is not None else CHECK_DIR
    files = [folder / f"{family}_budget_check.csv"] + sorted(folder.glob(f"{family}_T*_budget_check.csv"))
    parts = []
    for p in files:
        stem = p.name[: -len("_budget_check.csv")]
        if not p.exists() or stem.endswith(("_sources", "_partial")) or "_lr" in stem:
            continue
        t = judge(pd.read_csv(p)).assign(check=p.name)
        if family in FAMILIES and is_partial(family, t.method.unique()):  # as load_check reads it
            t["accepted"] = False
        parts.append(t)
    if not parts:
        return pd.DataFrame()
    out = pd.concat(parts, ignore_index=True).sort_values(["iterations_T", "n_slices", "method"], kind="stable")
    return out.reset_index(drop=True)


def gain_by_budget(series: pd.DataFrame, method: str = "trm") -> pd.DataFrame:
    """``method``'s gain over vanilla at every budget of a doubling series (each check's T, and the
    last check's 2T), per few-shot size where there are sizes: ``iterations``, ``gain_pct``, ``check``."""
    rows = []
    s = series[series.method == method]
    for n, g in s.groupby(s.n_slices.fillna(-1), sort=False):
        g = g.sort_values("iterations_T")
        for r in g.itertuples():
            rows.append({"n_slices": None if n == -1 else int(n), "iterations": int(r.iterations_T),
                         "gain_pct": r.gain_pct_T, "check": r.check})
        last = g.iloc[-1]
        if int(last.iterations_2T) not in set(g.iterations_T):
            rows.append({"n_slices": None if n == -1 else int(n), "iterations": int(last.iterations_2T),
                         "gain_pct": last.gain_pct_2T, "check": last.check})
    return pd.DataFrame(rows, columns=["n_slices", "iterations", "gain_pct", "check"])


def series_choice(family: str, folder=None) -> Optional[str]:
    """Which check of ``family``'s doubling series a notebook shows: the lowest budget rule v2
    accepts, else the longest budget checked (still learning); its file stem (``tumour`` or
    ``tumour_T1600``), or None when nothing is committed."""
    series = doubling_series(family, folder)
    if series.empty:
        return None
    checks = series.drop_duplicates("check").sort_values("iterations_T")
    ok = checks[checks.accepted]
    pick = (ok if not ok.empty else checks.iloc[::-1]).iloc[0]
    return pick.check[: -len("_budget_check.csv")]


LABELS = {"vanilla": "vanilla", "class_weight": "class weight", "trs_map": "Trs map", "trm": "TRM",
          "trm@map=image": "TRM per-image"}


def _who(r) -> str:
    size = f" at {int(r.n_slices)} slices" if "n_slices" in r._fields and pd.notna(r.n_slices) else ""
    return LABELS.get(r.method, r.method) + size


def grid_verdict_lines(family: str, g: pd.DataFrame) -> list:
    """The verdict of a grid check under rule v2 (``judge``'s table): accepted or not, with the
    methods still learning; each gated method's drift at 2T; each variant's own verdict; each
    gain at T and 2T with its stability."""
    g = judge(g) if "gated" not in g else g
    t, t2 = int(g.iterations_T.iloc[0]), int(g.iterations_2T.iloc[0])
    gated, variants = g[g.gated], g[~g.gated]
    partial = family in FAMILIES and is_partial(family, g.method)
    learning = gated[gated.learning]
    if partial:
        head = (f"NOT accepted (a partial check, methods {', '.join(dict.fromkeys(g.method))} only: it can fail "
                f"a budget, never accept one)")
    elif bool(g.accepted.iloc[0]):
        top = gated.loc[gated.d_dice.idxmax()]
        head = (f"ACCEPTED: at {t2} no method of the paper's table is more than {DICE_TOL} higher (largest change "
                f"{top.d_dice:+.4f}, {_who(next(gated.loc[[top.name]].itertuples()))})")
    else:
        head = f"NOT accepted: still learning at {t} (the table at this budget is early-budget)"
    lines = [f"{family}: fine-tuning budget {t} iterations {head} [rule v2, {t} vs {t2}]"]
    for r in learning.itertuples():
        lines.append(f"  still learning: {_who(r)}: Dice {r.dice_mean_T:.4f} -> {r.dice_mean_2T:.4f} ({r.d_dice:+.4f})")
    lines.append("  drift at 2T: " + "; ".join(
        f"{_who(r)} {r.d_dice:+.4f}" + (" (overfitting, the paper's fixed-budget protocol)" if r.drift == "overfitting"
                                        else f" ({r.drift})")
        for r in gated.itertuples()))
    for r in variants.itertuples():
        lines.append(f"  variant {_who(r)}: {r.drift} at {t} (Dice {r.dice_mean_T:.4f} -> {r.dice_mean_2T:.4f}, "
                     f"{r.d_dice:+.4f}); shown beside the table, not gating it")
    gains = [r for r in g.itertuples() if r.method != "vanilla"]
    if gains:
        lines.append("  gain over vanilla at T -> 2T: " + "; ".join(
            f"{_who(r)} {r.gain_pct_T:+.2f} % -> {r.gain_pct_2T:+.2f} % "
            f"({'stable' if r.gain_stable else 'depends on the budget'})" for r in gains))
    return lines


def source_verdict_line(family: str, s: pd.DataFrame) -> str:
    """The sources' verdict under rule v2: accepted or not, each source's Dice at T_s and 2T_s."""
    s = judge_sources(s) if "drift" not in s else s
    floor = float(s.floor.max()) if "floor" in s else 0.0
    return (f"{family} sources: pre-training budget {int(s.iterations_T.iloc[0])} iterations "
            f"{'ACCEPTED' if bool(s.ok.all()) else 'NOT accepted'} [rule v2" + (f", floor {floor:g}" if floor else "")
            + "]: " + "; ".join(f"{r.source} {r.dice_T:.4f} -> {r.dice_2T:.4f} at {int(r.iterations_2T)} ({r.drift}"
                                + (", below the floor" if r.dice_T < r.floor else "") + ")" for r in s.itertuples()))


def _measured(meta: dict, cmd: str) -> str:
    cpu = meta.get("cpu") or f"an unrecorded CPU ({meta.get('machine', '?').split(',')[0]})"
    return (f"  measured at commit {meta.get('commit')} on {cpu}, {meta.get('threads')} thread(s) per process, in "
            f"{meta.get('seconds', float('nan')) / 60:.0f} min; reproduce: `{cmd}`")


def _sources_used(meta: dict) -> str:
    used = meta.get("sources_used")
    if not used:
        return "  source models: trained in the checkout that ran it (before sources were carried; not the carried ones)"
    carried = [s for s, why in used.items() if why.startswith("carried")]
    if len(carried) == len(used):
        return "  source models: the carried ones (results/sources/)"
    return "  source models: " + "; ".join(f"{s}: {why}" for s, why in used.items())


def verdict_text(family: str, folder=None, preset: Optional[str] = "tutorial", stem: Optional[str] = None) -> str:
    """A few lines for a notebook or a log: the grid check's verdict (rule v2), which source models
    it ran with, where and when it was measured; the same for the source check; a STALE line where
    a check was made at other budgets than the preset's; the commands that reproduce them. ``stem``:
    a candidate budget's check (``load_check``) instead of the preset's own."""
    chk = load_check(family, folder, stem)
    candidate = stem not in (None, family)
    if candidate:  # the family's own source check still applies
        own = load_check(family, folder)
        chk["sources"], chk["sources_meta"] = own["sources"], own["sources_meta"]
    cmd = f"python benchmarks/budget_check.py {family}"
    if chk["grid"] is None and chk["sources"] is None:
        return f"{family}: no budget check committed; run `{cmd}` (the tables below are unchecked)"
    lines = []
    g, s = chk["grid"], chk["sources"]
    meta, smeta = chk["meta"] or {}, chk["sources_meta"] or {}
    preset = meta.get("preset", smeta.get("preset", preset))
    if g is not None:
        lines += grid_verdict_lines(family, g)
        grid_cmd = f"{cmd} --budget {int(g.iterations_T.iloc[0])}" if candidate else cmd
        if candidate:
            lines.append(f"  a candidate budget: the preset's fine-tuning budget is "
                         f"{budget_cfg(family, preset or 'tutorial', 1)['iterations']} iterations")
        elif preset is not None:
            now = budget_cfg(family, preset, 1)["iterations"]
            if now != int(g.iterations_T.iloc[0]):
                lines.append(f"  STALE: the preset now uses {now} iterations; rerun `{cmd} --skip-sources`")
        if meta:
            lines += [_sources_used(meta), _measured(meta, f"{grid_cmd} --skip-sources") + f", seeds {meta.get('seeds')}"]
    if s is not None:
        lines.append(source_verdict_line(family, s))
        if preset is not None:
            now = source_iterations(get_preset(preset), family_settings(family)["dataset"])
            if now != int(s.iterations_T.iloc[0]):
                lines.append(f"  STALE: the preset's sources now train for {now} iterations; rerun `{cmd} --skip-grid`")
        if smeta:
            lines.append(_measured(smeta, f"{cmd} --skip-grid"))
    return "\n".join(lines)
