"""Sweeps: the paper's Tables I, II and III (and the ablations) as resumable sets of units.

    python -m trm_utils.sweep run --study table1 --dataset phantom --seeds 3 --executor local [--dry-run]
    python -m trm_utils.sweep run --study table1,table2,table3 --out runs/sweep/phantom --workers 2
    python -m trm_utils.sweep run --study table2 --dataset fets2021 --data-dir /data --preset paper \\
        --executor slurm --partition gpu --gpus-per-job 1 --time-min 240 --array-parallelism 16
    python -m trm_utils.sweep report runs/sweep/phantom
    python -m trm_utils.sweep rekey runs/sweep/phantom     # a sweep folder from before hash format 2

A **unit** is one transfer cell (dataset, source, target, few-shot size) with all its methods x
seeds, trained together by the batched engine (``finetune_cell``). Each unit is a papermill
execution of ``notebooks/06_transfer_cell.ipynb``; the executed notebook is kept beside the
unit's ``result.csv``, so every number of a final table traces to the notebook that made it.

Layout of a sweep folder ``OUT``::

    OUT/sweep.json                      settings (dataset, preset, seeds, methods, overrides)
    OUT/units/<unit>-<hash>/unit.json   status (done / failed + error), seconds, parameters
    OUT/units/<unit>-<hash>/result.csv  one row per run (as experiments.run_grid writes it)
    OUT/units/<unit>-<hash>/<unit>.ipynb  the executed notebook
    OUT/report/                         tables, statistics and heatmaps (``report``)

**The budget check** (the finished-learning rule, ``budget.py``): every sweep of Tables I-III also
runs a sample of each table's cells at ``CHECK_FACTOR`` (2) x the budget, with the same schedule
shape (``presets.scale_budget``), as units of their own (``<unit>-x2``). The sample is fixed by a rule that
never looks at results (``check_sample``: every cell of the table's first target, of its first
two for Table III) and is written into ``sweep.json``; the report compares each method's mean Dice
and gain over vanilla on those cells at T and 2T and labels a table whose check fails
**early-budget**. ``--no-budget-check`` leaves the sample out.

``<hash>`` covers everything that determines a unit's numbers: the cell, methods, seeds, the
resolved preset, the data's content (``data_signature``: file names and bytes, not where the data
lie or when they were written, so a regenerated phantom or a copy of the data on another machine
resumes the same sweep) and the source code of the method's modules. Folders run before hash
format 2 (which named the data by their path and file times) are carried over by ``rekey``. A unit
whose ``unit.json`` says done is skipped; a killed sweep loses the units in flight only
(``unit.json`` is written last, atomically); a failed unit is recorded with its error and the
rest go on; running the same command again retries only what is not done.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

from . import budget as B
from . import experiments as E
from . import presets as P
from . import sources as SRC
from .batched import finetune_cell
from .checks import carry_cached, check_sources
from .datasets import DataError, content_signature, open_dataset
from .report import write_report
from .units import (HASH_FORMAT, SweepError, default_workers, run_local, run_submitit, slurm_executor, unit_parameters,
                    unit_spec, unit_status)
from .tables import write_csv
from .utils import REPO_ROOT, atomic_write_json, available_cpus, get_device, resolve_path

STUDIES = ("table1", "table2", "table3", "ablations")
DATASETS = ("phantom", "iseg2019", "fets2021", "msd")
EXECUTORS = ("local", "slurm")
#: Which task family each study needs (the ablations run on every family the dataset has).
STUDY_FAMILIES = {"table1": ("tissue",), "table2": ("tumour",), "table3": ("tissue",), "ablations": ("tissue", "tumour")}
#: Table III: "employing one task as the source model, we conducted transfer fine-tuning on the
#: remaining five tasks"; the five targets printed are GM-T1, WM-T1, CSF-T2, GM-T2, WM-T2.
FEWSHOT_SOURCE = {"iseg2019": "CSF-T1"}
#: Target training slices of the few-shot study. The paper's 400 / 100 / 50 of iSeg-2019's
#: training slices; the phantom's tutorial preset has ~280 per task: 100 / 25 / 12 keep the paper's 8 : 2 : 1.
FEWSHOT_SIZES = {"paper": [400, 100, 50], "tutorial": [100, 25, 12], "smoke": [8, 4]}
#: The ablation variants (``presets.parse_method`` labels): the TRM's two parts alone, maps
#: refreshed during fine-tuning, and the exponential's base (the paper's 10 against 2 and 100).
ABLATION_METHODS = ("vanilla", "trm", "fg_only", "exp_only", "trm@refresh={refresh}", "trm@base=2", "trm@base=100")
#: The methods each table compares by default: the paper's four with TRM in both readings of eq. 4
#: (``trm``: the dataset-level map; ``trm@map=image``: a map per image); Table III, as the paper's,
#: vanilla against TRM.
STUDY_METHODS = {"table1": (*P.CORE_METHODS, P.IMAGE_READING), "table2": (*P.CORE_METHODS, P.IMAGE_READING),
                 "table3": ("vanilla", "trm", P.IMAGE_READING)}
#: The modules whose source decides a unit's numbers (part of its hash). Reports and runners
#: are not: editing them never invalidates finished units.
METHOD_MODULES = ("leep", "predict", "maps", "losses", "train", "memory", "batched", "unet", "slices", "datasets", "metrics")
#: The budget check: the sampled cells run again at this multiple of the budget.
CHECK_FACTOR = 2
#: How many targets (in the paper's task order) give the check its cells, per table: every cell
#: of the first target (5 cells in Tables I and II; Table III: 2 targets x every size = 6).
CHECK_TARGETS = {"table1": 1, "table2": 1, "table3": 2}
#: Keys of a unit's notebook parameters that say where and how it runs, not what it computes.
RUN_ONLY_PARAMETERS = ("output_dir", "device", "num_threads", "cache_dir", "show_progress", "sources_dir")
#: A sweep's own source models, one per source task, in ``OUT/sources/`` (``prepare_sources``).
SOURCES_SUBDIR = "sources"
#: The sources' budget check (rule 1 on each source trained here), beside them.
SOURCE_CHECKS = "source_checks.csv"
#: The budget search's default: the table at the preset's budget, checked once at 2x it. ``--max-factor 8``
#: doubles the candidate (1, 2, 4, 8 x the preset's) until rule v2 accepts one (``find_budget``).
MAX_FACTOR = 1


@dataclass(frozen=True)
class Unit:
    """One transfer cell with all its methods x seeds (one papermill execution)."""

    study: str
    family: str           # tissue / tumour
    name: str             # iseg2019 / fets2021 / msd (the task naming)
    source: str
    target: str
    n_slices: Optional[int]
    methods: tuple
    seeds: tuple
    factor: int = 1       # the budget's multiple: 1 for a table's cell, CHECK_FACTOR for its budget check

    @property
    def uid(self) -> str:
        size = f"-n{self.n_slices}" if self.n_slices else ""
        x = f"-x{self.factor}" if self.factor != 1 else ""
        return f"{self.study}-{self.name}-{self.source}-to-{self.target}{size}{x}"


@dataclass
class Settings:
    """What every unit of a sweep folder shares; a folder never mixes two of these."""

    dataset: str
    data_dir: str
    preset: str
    seeds: list
    overrides: dict = field(default_factory=dict)

    def cfg(self) -> dict:
        return P.get_preset(self.preset, **self.overrides)


# ----------------------------------------------------------------------------- expansion

def _check_choice(kind: str, value, valid) -> None:
    if value not in valid:
        raise SweepError(f"unknown {kind} {value!r}; choose one of {', '.join(map(str, valid))}")


def parse_seeds(seeds) -> list:
    """``3`` -> [0, 1, 2]; ``"0,1,4"`` or a list -> those seeds."""
    if isinstance(seeds, int):
        out = list(range(seeds))
    elif isinstance(seeds, str):
        out = list(range(int(seeds))) if "," not in seeds else [int(s) for s in seeds.split(",") if s.strip()]
    else:
        out = [int(s) for s in seeds]
    if not out or any(s < 0 for s in out):
        raise SweepError(f"seeds {seeds!r}: give a count (--seeds 3) or non-negative seeds (--seeds 0,1,2)")
    return out


def families_of(settings: Settings) -> dict:
    """{family: (name, root)} of the sweep's data (the phantom is made when missing)."""
    fams = E.resolve_datasets(settings.dataset, settings.data_dir, settings.preset)
    for name, root in fams.values():
        try:
            open_dataset(name, root)
        except DataError as err:
            raise SweepError(f"{err} (or use --dataset phantom, which is generated offline)") from None
    return fams


def expand(study: str, settings: Settings, fams: dict, methods=None, sources=None, targets=None,
           sizes=None) -> list:
    """The units of ``study``: every source on every other target of each family the data has.

    ``sources`` / ``targets`` filter the grid (an empty result is an error); ``sizes`` are the
    few-shot sizes (``FEWSHOT_SIZES`` of the preset by default); ``methods`` default to the
    study's (``STUDY_METHODS``; ``ABLATION_METHODS`` for the ablations).
    """
    _check_choice("study", study, STUDIES)
    wanted = [f for f in STUDY_FAMILIES[study] if f in fams]
    if not wanted:
        have = ", ".join(f"{f} ({n})" for f, (n, _) in fams.items())
        raise SweepError(f"study {study} needs {' or '.join(STUDY_FAMILIES[study])} data; dataset "
                         f"{settings.dataset!r} has {have}. Use --dataset phantom or one with that family")
    cfg = settings.cfg()
    seeds = tuple(settings.seeds)
    units = []
    for fam in wanted:
        name = fams[fam][0]
        tasks = list(P.PAPER_TASKS[name])
        for given, kind in ((sources, "source"), (targets, "target")):
            bad = [t for t in (given or []) if t not in tasks]
            if bad:
                raise SweepError(f"unknown {kind} task(s) {bad} for {name}; its tasks are {', '.join(tasks)}")
        if study == "ablations":
            ms = tuple(m.format(refresh=max(1, int(P.for_dataset(cfg, name)["iterations"]) // 4)) for m in (methods or ABLATION_METHODS))
            g = P.TUTORIAL_GRID[name]
            pairs = [(s, t) for t in g["targets"] for s in g["sources"] if s != t]
        else:
            ms = tuple(methods or STUDY_METHODS[study])
            if study == "table3":
                if name not in FEWSHOT_SOURCE:
                    continue
                pairs = [(FEWSHOT_SOURCE[name], t) for t in tasks if t != FEWSHOT_SOURCE[name]]
            else:
                pairs = [(s, t) for t in tasks for s in tasks if s != t]
        for m in ms:
            try:
                P.parse_method(m)
            except ValueError as err:
                raise SweepError(str(err)) from None
        pairs = [(s, t) for s, t in pairs if (not sources or s in sources) and (not targets or t in targets)]
        ns = [None]
        if study == "table3":
            ns = [int(n) for n in (sizes or FEWSHOT_SIZES.get(settings.preset, FEWSHOT_SIZES["tutorial"]))]
        units += [Unit(study, fam, name, s, t, n, ms, seeds) for n in ns for s, t in pairs]
    if not units:
        raise SweepError(f"study {study}: no cell left after filtering (sources={sources}, targets={targets}); "
                         f"a cell needs a source different from its target")
    return units


def check_sample(study: str, units: list, factor: int = CHECK_FACTOR) -> list:
    """The budget check's units of ``study``: its units (as ``expand`` gives them, cells in the
    paper's task order) whose target is one of the first ``CHECK_TARGETS[study]`` targets, at
    ``factor`` x the budget. A rule fixed before any result: which cells never depends on what
    they gave. Empty for a study without a check (the ablations)."""
    k = CHECK_TARGETS.get(study, 0)
    targets = list(dict.fromkeys(u.target for u in units if u.study == study))[:k]
    return [replace(u, factor=int(factor)) for u in units if u.study == study and u.target in targets]


# ----------------------------------------------------------------------------- hashing

def code_version() -> str:
    """Hash of the source of the modules that decide a run's numbers (``METHOD_MODULES``)."""
    h = hashlib.sha1()
    for m in METHOD_MODULES:
        h.update((REPO_ROOT / "trm_utils" / f"{m}.py").read_bytes())
    return h.hexdigest()[:12]


def data_signature(fams: dict, memo_dir=None) -> dict:
    """Dataset name -> a hash of its content (``datasets.content_signature``): the same data give
    the same signature wherever they lie and whenever they were written; a changed byte or an added
    subject changes it. File hashes are memoised in ``<memo_dir>/file_hashes.json``."""
    return {name: content_signature(name, root, memo_dir) for name, root in fams.values()}


def unit_hash(unit: Unit, cfg: dict, signature: dict, code: str, source: Optional[str] = None) -> str:
    """10 hex digits naming what decides the unit's numbers (module docstring); ``source``: the
    SHA-256 of the sweep's carried model of the unit's source (``prepare_sources``), so a unit is
    bound to the one model its source is throughout the sweep (a sweep without ``OUT/sources/``,
    from before they were carried, hashes as it did)."""
    u = asdict(unit)
    if u.get("factor", 1) == 1:  # a table's own cell hashes as before the budget check existed
        u.pop("factor", None)
    key = {"unit": u, "cfg": cfg, "data": signature.get(unit.name), "code": code, "format": HASH_FORMAT}
    if source:
        key["source"] = source
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------- the sweep's sources

def sources_dir(out) -> Path:
    """``OUT/sources/``: the sweep's source models, one per source task (``prepare_sources``)."""
    return resolve_path(out) / SOURCES_SUBDIR


def unit_sources(units: list, fams: dict) -> dict:
    """``{(family, dataset, task): data root}`` of every source the units fine-tune from."""
    return {(u.family, u.name, u.source): fams[u.family][1] for u in units}


def source_cfg(cfg: dict, name: str, iterations: Optional[int]) -> dict:
    """``cfg`` with dataset ``name``'s source budget set to ``iterations`` (a source that rule 1
    accepted past the preset's T_s, ``prepare_sources``); ``cfg`` itself when that is T_s or None, so
    the units of every other source hash as they did."""
    if iterations is None or int(iterations) == P.source_iterations(cfg, name):
        return cfg
    v = cfg.get("source_iterations")
    return {**cfg, "source_iterations": {**v, name: int(iterations)} if isinstance(v, dict) else int(iterations)}


def _search_iterations(rec: Optional[dict], cfg: dict, name: str) -> Optional[int]:
    """The budget of a carried source's record when it is a step of the source budget search (T_s x 2^j),
    else None (the preset's T_s: a record at any other budget is another model, refused as before)."""
    if rec is None:
        return None
    its, t_s = int(rec["identity"]["training"]["iterations"]), P.source_iterations(cfg, name)
    k = its // t_s if its % t_s == 0 else 0
    return its if k >= 1 and (k & (k - 1)) == 0 else None


def source_records(out, units: list, fams: dict, cfg: dict) -> dict:
    """``{(dataset, task): record}`` of the sweep's carried sources (``sources.read_record``), None
    for a source whose model ``OUT/sources/`` does not hold yet. A file there that is another model
    than the units would train (another identity: the preset's source settings or the data changed)
    or is damaged is a ``SweepError``: it is never replaced behind the finished units' back."""
    folder = sources_dir(out)
    got = {}
    for (_, name, task), root in unit_sources(units, fams).items():
        try:
            rec = SRC.read_record(name, task, folder)
            its = _search_iterations(rec, cfg, name)
            path, why = SRC.find_carried(SRC.source_identity(name, root, task, source_cfg(cfg, name, its)), folder)
        except SRC.CarriedSourceError as err:
            raise SweepError(str(err)) from None
        if path is None and rec is not None:
            raise SweepError(f"{why}: the sweep's units were run with it; give a new --out folder for these settings")
        got[(name, task)] = rec
    return got


def _copy_carried(name: str, task: str, folder: Path) -> None:
    """The repository's committed source (``results/sources/``) into ``folder``, record last."""
    folder.mkdir(parents=True, exist_ok=True)
    for src in SRC.carried_paths(name, task):
        tmp = folder / f".{src.name}.tmp"
        shutil.copy2(src, tmp)
        os.replace(tmp, folder / src.name)


def plan_sources(out, units: list, fams: dict, cfg: dict) -> dict:
    """What ``prepare_sources`` will do with each source the units use, before it does anything:
    ``{"sweep": [(dataset, task), ...]`` (already in ``OUT/sources/``), ``"repository": [...]`` (the
    repository's committed model of the same identity, to copy), ``"train": {(family, dataset, root):
    [task, ...]}``} (to train at T_s and 2 T_s and judge by rule 1)."""
    have = source_records(out, units, fams, cfg)
    plan_ = {"sweep": [k for k, r in have.items() if r is not None], "repository": [], "train": {}}
    for (fam, name, task), root in unit_sources(units, fams).items():
        if have[(name, task)] is not None:
            continue
        if SRC.find_carried(SRC.source_identity(name, root, task, cfg))[0] is not None:
            plan_["repository"].append((name, task))
        else:
            plan_["train"].setdefault((fam, name, root), []).append(task)
    return plan_


def prepare_sources(out, settings: Settings, units: list, fams: dict, device="auto", workers=None,
                    log=print, max_factor: int = MAX_FACTOR) -> pd.DataFrame:
    """Give every source the units use one model, in ``OUT/sources/``, before any unit runs.

    In order (``plan_sources``): the sweep's own (already there: kept); the repository's committed
    model of the same identity (``results/sources/``, accepted by its own committed check: copied
    with its record); else trained here at the preset's T_s and at 2 T_s (``checks.check_sources``;
    the models are cached, the missing ones side by side on a CPU), judged by rule 1
    (``budget.judge_sources``: not more than 0.01 higher at 2 T_s, every tumour source at least
    0.35) and the T_s model carried with its check row. A source rule 1 does not accept at T_s is
    checked again at 2 T_s vs 4 T_s, and so on by doubling while the next candidate is at most
    ``max_factor`` x T_s (the tables' budget search, ``find_budget``, applied to the source): it is
    carried at the first budget accepted (its units then fine-tune from that model, ``source_cfg``).
    One that no candidate up to ``max_factor`` x T_s passes is carried at the last candidate all the
    same and labelled so: its rows in ``OUT/sources/source_checks.csv`` (one per step), its record's
    ``source_check``, the report's sources table and the label of every table that uses it.
    Units then load these and never train a source (notebook 06's ``sources_dir``), so a sweep
    resumed on another machine, or exported and resumed, uses the same models.

    Returns one row per source: dataset, source, origin (sweep / repository / trained here),
    own-task Dice, iterations, accepted (rule 1) and the file's SHA-256.
    """
    cfg = settings.cfg()
    folder = sources_dir(out)
    todo = plan_sources(out, units, fams, cfg)
    origin = {k: "sweep" for k in todo["sweep"]}
    for name, task in todo["repository"]:
        _copy_carried(name, task, folder)
        origin[(name, task)] = "repository"
        if log:
            log(f"source {name} {task}: the repository's carried model "
                f"({SRC.carried_paths(name, task)[0].name}), copied into {folder}")
    for (fam, name, root), tasks in todo["train"].items():
        k, left = 1, list(tasks)
        while left:
            if log:
                log(f"source check of {name} {', '.join(left)} (rule 1: {k} x T_s and {2 * k} x T_s, {len(left)} "
                    "source(s) to train)")
            chk = check_sources(fam, settings.preset, root=root, tasks=left, device=device, log=log, workers=workers,
                                dataset=name, start=k)
            _merge_source_checks(folder, chk)
            nxt = []
            for r in chk.to_dict("records"):
                row = {c: (v.item() if hasattr(v, "item") else v) for c, v in r.items()}
                if not r["ok"] and 2 * k <= max_factor:
                    if log:
                        log(f"source {name} {r['source']}: not accepted by rule 1 at {r['iterations_T']} iterations "
                            f"(held-out Dice {r['dice_T']:.4f}, {r['dice_2T']:.4f} at {r['iterations_2T']}); next: "
                            f"{r['iterations_2T']} vs {2 * r['iterations_2T']}")
                    nxt.append(r["source"])
                    continue
                carry_cached(name, root, r["source"], source_cfg(cfg, name, int(r["iterations_T"])), folder,
                             f"{SOURCES_SUBDIR}/{SOURCE_CHECKS}", log=log, check=row)
                origin[(name, r["source"])] = "trained here"
                if log and not r["ok"]:
                    log(f"source {name} {r['source']}: NOT accepted by rule 1 (held-out Dice {r['dice_T']:.4f} at "
                        f"{r['iterations_T']} iterations, {r['dice_2T']:.4f} at {r['iterations_2T']}); carried, and "
                        "every table that uses it is labelled so")
            left, k = nxt, 2 * k
    return sources_table(out, units, fams, cfg, origin)


def prepare_sources_in_job(executor, out, settings: Settings, units: list, fams: dict, device="auto",
                           log=print, max_factor: int = MAX_FACTOR) -> pd.DataFrame:
    """``prepare_sources`` with the training done in one job of ``executor`` (a SLURM sweep: the
    login node that submits the units trains nothing), waited for; then the sources table is read
    here. Nothing to train: no job (the repository's models are copied here, in seconds). A job
    that fails is a one-line ``SweepError`` naming its log folder; the models it finished stay
    cached on the shared file system and its next try trains only the others."""
    todo = plan_sources(out, units, fams, settings.cfg())
    if not todo["train"]:
        return prepare_sources(out, settings, units, fams, device=device, log=log, max_factor=max_factor)
    tasks = [f"{name} {t}" for (_, name, _), ts in todo["train"].items() for t in ts]
    job = executor.submit(prepare_sources, out, settings, units, fams, device, None, print, max_factor)
    if log:
        log(f"sources: {len(tasks)} to train ({', '.join(tasks)}) in job {job.job_id}; "
            f"log under {executor.folder}; waiting for it")
    try:
        job.result()
    except Exception as err:
        raise SweepError(f"the sources job {job.job_id} failed ({str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}); "
                         f"its log is under {executor.folder}; run the same command again to retry") from None
    return prepare_sources(out, settings, units, fams, device=device, log=log, max_factor=max_factor)


def _merge_source_checks(folder: Path, chk: pd.DataFrame) -> None:
    f = folder / SOURCE_CHECKS
    old = pd.read_csv(f) if f.exists() else None
    if old is not None:
        keys = [k for k in ("dataset", "source", "iterations_T") if k in old and k in chk]  # one row per step
        keep = ~old.set_index(keys).index.isin(chk.set_index(keys).index)
        chk = pd.concat([old[keep], chk], ignore_index=True)
    write_csv(chk, f)


def sources_table(out, units: list, fams: dict, cfg: dict, origin: Optional[dict] = None) -> pd.DataFrame:
    """One row per source the units use: its carried model's own-task Dice, budget, rule-1 verdict,
    SHA-256 and where it came from (``origin``, when known)."""
    rows = []
    for (name, task), rec in source_records(out, units, fams, cfg).items():
        if rec is None:
            rows.append({"dataset": name, "source": task, "origin": "missing"})
            continue
        rows.append({**SRC.record_summary(rec), "origin": (origin or {}).get((name, task), "sweep")})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- the sweep folder

def open_sweep(out, settings: Settings, studies, planned: Optional[dict] = None) -> Path:
    """Create ``out`` or check that it holds a sweep with the same settings (never mix two).

    ``planned``: ``{"units": {study: [uid, ...]}, "budget_check": {study: [uid, ...]}}``, the units
    this command plans, merged into ``sweep.json`` (the report counts what is still missing, and
    the budget check's sample is on record before its first result)."""
    out = resolve_path(out)
    meta = out / "sweep.json"
    mine = asdict(settings)
    if meta.exists():
        theirs = json.loads(meta.read_text())
        diff = {k: (theirs.get("settings", {}).get(k), v) for k, v in mine.items()
                if theirs.get("settings", {}).get(k) != v}
        if diff:
            what = "; ".join(f"{k}: folder has {a!r}, asked {b!r}" for k, (a, b) in diff.items())
            raise SweepError(f"{out} holds another sweep's results with different settings ({what}); "
                             f"give a new --out folder, or delete {out} to start over")
        studies = sorted(set(theirs.get("studies", [])) | set(studies))
        created = theirs.get("created")
        kept = {k: v for k, v in theirs.items() if k == "budgets"}  # the budget search's record stays
        before = {k: theirs.get(k) or {} for k in ("planned", "budget_check")}
    elif out.exists() and any(out.iterdir()):
        raise SweepError(f"{out} exists and is not a sweep folder (no sweep.json); give a new --out folder")
    else:
        created = time.strftime("%Y-%m-%d %H:%M:%S")
        before = {"planned": {}, "budget_check": {}}
        kept = {}
    out.mkdir(parents=True, exist_ok=True)
    planned = planned or {}
    rec = {"settings": mine, "studies": sorted(set(studies)), "created": created, **kept}
    for key, new in (("planned", planned.get("units") or {}), ("budget_check", planned.get("budget_check") or {})):
        merged = {st: sorted(set(before[key].get(st, [])) | set(new.get(st, []))) for st in {*before[key], *new}}
        if merged:
            rec[key] = dict(sorted(merged.items()))
    if "budget_check" in rec:
        rec["budget_check_factor"] = CHECK_FACTOR
    atomic_write_json(meta, rec)
    return out


# ----------------------------------------------------------------------------- cost estimate

def estimate_seconds(units: list, settings: Settings, fams: dict, out, device="auto", cache_dir=None,
                     timed: Optional[dict] = None) -> dict:
    """A rough cost per unit on this machine: 5 timed iterations of ``finetune_cell`` with the
    unit's number of runs on random data of the preset's size, times its iterations, plus
    ~10 % for evaluation and, on the first unit of each source, the source training the sweep
    will do for it (``source_iterations_to_train``: T_s and 2 T_s for rule 1, none when the
    sweep's ``OUT/sources/`` or the repository carries it; timed as a one-run fine-tuning iteration,
    an underestimate: a source trains its encoder too). ``timed``: a dict shared between calls, so
    each (dataset, runs) is timed once."""
    cfg = settings.cfg()
    dev = get_device(device)
    timed = {} if timed is None else timed

    def per_iteration(name, n_runs):
        key = (name, n_runs)
        if key not in timed:
            size = cfg["image_size"][name]
            model = E.new_unet(name, cfg)
            g = torch.Generator().manual_seed(0)
            data = (torch.rand(4 * cfg["batch_size"], 1, size, size, generator=g),
                    torch.randint(0, model.num_classes, (4 * cfg["batch_size"], size, size), generator=g))
            runs = [("vanilla", i) for i in range(n_runs)]
            kw = dict(lr=1e-3, batch_size=cfg["batch_size"], device=dev, show_progress=False)
            finetune_cell(model, data, runs, iterations=2, **kw)
            t0 = time.perf_counter()
            finetune_cell(model, data, runs, iterations=5, **kw)
            timed[key] = (time.perf_counter() - t0) / 5
        return timed[key]

    res, seen_sources = {}, set()
    for u in units:
        groups = len(u.seeds) if u.n_slices else 1
        n_runs = len(u.methods) * (1 if u.n_slices else len(u.seeds))
        sec = 1.1 * groups * u.factor * int(P.for_dataset(cfg, u.name)["iterations"]) * per_iteration(u.name, n_runs)
        if (u.name, u.source) not in seen_sources:
            sec += source_iterations_to_train(u, fams, cfg, out, cache_dir) * per_iteration(u.name, 1)
        seen_sources.add((u.name, u.source))
        res[u.uid] = sec + 5.0  # kernel start-up
    return res


def source_iterations_to_train(u: Unit, fams: dict, cfg: dict, out, cache_dir=None) -> int:
    """Source-training iterations the sweep still has to spend on the unit's source: 0 when
    ``plan_sources`` takes it from the sweep's ``OUT/sources/`` or the repository; else its rule-1
    check, T_s and 2 T_s (``checks.check_sources``), each unless this checkout has it cached. A lower
    bound: a source rule 1 rejects at T_s costs the further steps of its search (4 T_s, ...), which
    are not known before its check (``prepare_sources``)."""
    if not plan_sources(out, [u], fams, cfg)["train"]:
        return 0
    root, t_s = fams[u.family][1], P.source_iterations(cfg, u.name)
    return sum(k * t_s for k in (1, 2)
               if E.source_choice(u.name, root, u.source, dict(cfg, source_iterations=k * t_s),
                                  cache_dir=cache_dir)[1] == "train")


def export(out, dest) -> int:
    """Copy a sweep's settings, its source models (``sources/``: a resume from the copy uses the
    same models; byte-identical copies of the repository's ``results/sources/`` cost git nothing) and
    its finished units' result files (``unit.json``, ``result.csv``, ``cell.json``; not the executed
    notebooks or figures) into ``dest``, which
    ``report`` reads like the original. ``dest`` is a new folder, or an earlier export of the same
    sweep (same settings), which is brought up to date: units finished since are added, a unit
    re-run under the same name replaced (a sweep committed as its units land). Returns the number
    of units copied."""
    src, dst = resolve_path(out), resolve_path(dest)
    if not (src / "sweep.json").exists():
        raise SweepError(f"{src} is not a sweep folder (no sweep.json)")
    if dst.exists() and any(dst.iterdir()):
        mine = json.loads((src / "sweep.json").read_text()).get("settings")
        theirs = json.loads((dst / "sweep.json").read_text()).get("settings") if (dst / "sweep.json").exists() else None
        if theirs != mine:
            raise SweepError(f"{dst} exists and is not an export of this sweep (its settings differ or it has no "
                             "sweep.json); give a new folder")
    dst.mkdir(parents=True, exist_ok=True)
    n = 0
    for d in sorted((src / "units").glob("*")):
        if unit_status(d) != "done":
            continue
        target = dst / "units" / d.name
        if (target / "unit.json").exists() and (target / "unit.json").read_bytes() == (d / "unit.json").read_bytes():
            continue  # already there, the same run
        (target / "unit.json").unlink(missing_ok=True)  # not done while its files are replaced
        for f in ("result.csv", "cell.json", "unit.json"):  # unit.json last: it marks the copy done
            if (d / f).exists():
                target.mkdir(parents=True, exist_ok=True)
                tmp = target / f".{f}.tmp"
                shutil.copy2(d / f, tmp)
                os.replace(tmp, target / f)
        n += 1
    srcs = sorted((src / SOURCES_SUBDIR).glob("*"), key=lambda f: f.suffix == ".json")  # each record after its model
    for f in srcs:
        target = dst / SOURCES_SUBDIR / f.name
        if f.is_file() and not (target.exists() and target.read_bytes() == f.read_bytes()):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / f".{f.name}.tmp"
            shutil.copy2(f, tmp)
            os.replace(tmp, target)
    tmp = dst / ".sweep.json.tmp"
    shutil.copy2(src / "sweep.json", tmp)
    os.replace(tmp, dst / "sweep.json")
    return n


# ----------------------------------------------------------------------------- rekey

def _what_it_computes(params: dict) -> str:
    return json.dumps({k: v for k, v in params.items() if k not in RUN_ONLY_PARAMETERS}, sort_keys=True, default=str)


def rekey(out, cache_dir=None, log=print) -> dict:
    """Carry the finished units of a sweep folder from before hash format 2 over to it.

    Format 1 named the data by their folder's path and the files' times, so a phantom
    regenerated in a new checkout (byte for byte the same: ``tests/test_data.py`` checks it
    across numpy's CPU code paths) or a copy of the data made every finished unit look new. For
    each unit the folder's ``sweep.json`` plans (settings, studies, budget check) that is not done
    under its format-2 hash, a finished format-1 folder of the same unit is renamed to that hash
    when it ran exactly the parameters the unit now would (cell, methods, seeds, the whole
    resolved preset); its ``unit.json`` keeps the old hash under ``rekeyed``. Format 1 recorded
    neither the data's content nor the code's version, so that part is the caller's word: run
    it only on data and method code unchanged since the units ran (``git log`` of
    ``METHOD_MODULES`` against the sweep's dates). Returns counts: rekeyed, already, mismatched.
    """
    out = resolve_path(out)
    meta_file = out / "sweep.json"
    if not meta_file.exists():
        raise SweepError(f"{out} is not a sweep folder (no sweep.json); give the folder `sweep run --out` wrote")
    meta = json.loads(meta_file.read_text())
    settings = Settings(**meta["settings"])
    planned = {uid for key in ("planned", "budget_check") for uids in (meta.get(key) or {}).values() for uid in uids}
    _, _, rows = plan(meta.get("studies", []), settings, out, cache_dir=cache_dir, budget_check=bool(meta.get("budget_check")))
    old = {}
    for f in sorted((out / "units").glob("*/unit.json")):
        rec = json.loads(f.read_text())
        if rec.get("status") == "done" and rec.get("hash_format", 1) < HASH_FORMAT:
            old.setdefault(rec["uid"], []).append((f.parent, rec))
    counts = {"rekeyed": 0, "already": 0, "mismatched": 0}
    for u, spec, st in rows:
        if planned and u.uid not in planned:
            continue
        if st == "done":
            counts["already"] += 1
            continue
        want = _what_it_computes(unit_parameters(spec))
        cands = old.get(u.uid, [])
        same = [(d, rec) for d, rec in cands if _what_it_computes(rec.get("parameters", {})) == want]
        if len(same) != 1:
            if cands:
                counts["mismatched"] += 1
                log(f"  {u.uid}: {len(cands)} format-1 folder(s), none ran what the unit runs now; left as it is")
            continue
        d, rec = same[0]
        new_dir = Path(spec["dir"])
        if new_dir.exists():
            shutil.rmtree(new_dir)  # an unfinished attempt under the new hash (status todo above)
        os.replace(d, new_dir)
        rec.update(hash=spec["hash"], hash_format=HASH_FORMAT, data_signature=spec["data"], code_version=spec["code"],
                   rekeyed={"from_hash": rec["hash"], "from_format": rec.get("hash_format", 1),
                            "on": time.strftime("%Y-%m-%d %H:%M:%S"),
                            "basis": "same parameters checked; same data content and method code asserted by rekey's caller"})
        rec["parameters"]["output_dir"] = str(new_dir)
        atomic_write_json(new_dir / "unit.json", rec)
        counts["rekeyed"] += 1
    return counts


# ----------------------------------------------------------------------------- the command line

def plan(studies, settings: Settings, out, methods=None, sources=None, targets=None, sizes=None,
         device="auto", num_threads=0, cache_dir=None, budget_check: bool = True, factors=None) -> tuple:
    """(out folder, fams, [(unit, spec, status)]) for ``studies`` under ``settings``: each study's
    cells at its budget's multiple (``factors``: ``{study: k}``, or for the ablations ``{family: k}``;
    default 1), then (``budget_check``) its check sample at twice that (``check_sample``)."""
    fams = families_of(settings)
    units = []
    for st in studies:
        mine = expand(st, settings, fams, methods, sources, targets, sizes)
        k = (factors or {}).get(st, 1)
        table = [replace(u, factor=int(k.get(u.family, 1) if isinstance(k, dict) else k)) for u in mine]
        units += table + (check_sample(st, mine, 2 * int(k)) if budget_check and not isinstance(k, dict) else [])
    return resolve_path(out), fams, specs_of(units, settings, out, fams, device, num_threads, cache_dir)


def specs_of(units: list, settings: Settings, out, fams: dict, device="auto", num_threads=0, cache_dir=None) -> list:
    """``[(unit, spec, status)]``: each unit's hash (its cell, the preset scaled to its budget, the
    data's content, the method code and its source model's SHA-256 where the sweep holds it), its
    runner's spec and whether it is done."""
    cfg, sig, code = settings.cfg(), data_signature(fams, cache_dir), code_version()
    out = resolve_path(out)
    recs = source_records(out, units, fams, cfg)
    shas = {k: (r or {}).get("sha256") for k, r in recs.items()}
    rows = []
    for u in units:
        ucfg = source_cfg(P.scale_budget(cfg, u.factor), u.name, _search_iterations(recs.get((u.name, u.source)), cfg,
                                                                                       u.name))
        sha = shas.get((u.name, u.source))
        h = unit_hash(u, ucfg, sig, code, sha)
        spec = unit_spec(out, u, settings, ucfg, h, device, num_threads, cache_dir,  # the cfg that was hashed
                         data=sig.get(u.name), code=code, sources_dir=sources_dir(out), source=sha)
        rows.append((u, spec, unit_status(Path(spec["dir"]))))
    return rows


def planned_of(rows: list, table_factors: Optional[dict] = None) -> dict:
    """What ``open_sweep`` records of a plan: each study's table units (at its budget's multiple,
    ``table_factors``, default 1) and its budget check's other units."""
    out = {"units": {}, "budget_check": {}}
    for u, _, _ in rows:
        k = (table_factors or {}).get(u.study, 1)
        k = k.get(u.family, 1) if isinstance(k, dict) else k
        out["units" if u.factor == k else "budget_check"].setdefault(u.study, []).append(u.uid)
    return out


# ----------------------------------------------------------------------------- the budget search

def sample_check(rows_t: list, rows_2t: list) -> Optional[pd.DataFrame]:
    """Rule v2 on a check sample: ``budget.compare`` of the runs at T (``rows_t``, ``specs_of``'s rows)
    and at 2T (``rows_2t``); None until every unit of both is done."""
    frames = []
    for tag, rows in (("T", rows_t), ("2T", rows_2t)):
        for _, spec, _ in rows:
            f = Path(spec["dir"]) / "result.csv"
            if unit_status(Path(spec["dir"])) != "done":
                return None
            frames.append(pd.read_csv(f).assign(budget=tag))
    both = pd.concat(frames, ignore_index=True)
    both["family"] = both.dataset
    if "n_slices" not in both or both.n_slices.isna().all():
        both = both.drop(columns="n_slices", errors="ignore")
    return B.compare(both)


def find_budget(study: str, units: list, settings: Settings, out, fams: dict, run, max_factor: int = MAX_FACTOR,
                log=print, **spec_kw) -> dict:
    """The table's budget by rule v2 on its check sample (``check_sample``), decided by the rule alone:
    the sample at k and 2k x the preset's budget for k = 1, 2, 4, ... until rule v2 accepts k (no method
    of the paper's table more than 0.01 higher at 2k) or k reaches ``max_factor``. ``run(rows, "budget_check")``
    records the rows' units as the study's check in ``sweep.json`` and runs those not done. Returns ``{"max_factor", "checks": [one row per k: iterations, accepted, the largest
    rise, TRM's gain over vanilla at T and 2T], "table_factor": the accepted k (else ``max_factor``),
    "accepted": bool}``; an unfinished check (a failed unit) stops the search with ``table_factor`` None."""
    checks, k = [], 1
    while True:
        rows_t = specs_of(check_sample(study, units, k), settings, out, fams, **spec_kw)
        rows_2t = specs_of(check_sample(study, units, 2 * k), settings, out, fams, **spec_kw)
        run(rows_t + rows_2t, "budget_check")
        t = sample_check(rows_t, rows_2t)  # reads each unit's status from its folder, as it is now
        if t is None:
            if log:
                log(f"{study}: the check of {k}x is not complete (a unit failed); the search stops here")
            return {"max_factor": int(max_factor), "checks": checks, "table_factor": None, "accepted": False}
        g = t[t.gated]
        trm = t[t.method == "trm"]
        row = {"factor": k, "iterations_T": int(t.iterations_T.iloc[0]), "iterations_2T": int(t.iterations_2T.iloc[0]),
               "cells": len(rows_t), "accepted": bool(t.accepted.iloc[0]), "largest_rise": float(g.d_dice.max()),
               "largest_fall": float(g.d_dice.min()),
               "trm_gain_pct_T": float(trm.gain_pct_T.mean()) if len(trm) else None,
               "trm_gain_pct_2T": float(trm.gain_pct_2T.mean()) if len(trm) else None}
        checks.append(row)
        if log:
            log(f"{study}: {row['iterations_T']} vs {row['iterations_2T']} iterations on {row['cells']} cells: "
                f"{'accepted' if row['accepted'] else 'not accepted'} (largest rise {row['largest_rise']:+.4f}, rule v2: "
                f"at most +{B.DICE_TOL})")
        if row["accepted"] or 2 * k > max_factor:
            return {"max_factor": int(max_factor), "checks": checks, "table_factor": k, "accepted": row["accepted"]}
        k *= 2


def record_budget(out, study: str, info: dict, check_uids: Optional[list] = None) -> None:
    """``find_budget``'s result into ``sweep.json`` (``budgets``), atomically; ``check_uids``: the
    search's units that are not the table's (its sample at the other budgets), which replace the
    study's ``budget_check`` list (during the search it lists every sample unit it runs)."""
    meta_file = resolve_path(out) / "sweep.json"
    meta = json.loads(meta_file.read_text())
    meta.setdefault("budgets", {})[study] = info
    if check_uids is not None:
        meta.setdefault("budget_check", {})[study] = sorted(check_uids)
    atomic_write_json(meta_file, meta)


def _split(text):
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trm_utils.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or resume) the units of one or more studies")
    r.add_argument("--study", required=True, help=f"comma-separated: {', '.join(STUDIES)} or all")
    r.add_argument("--dataset", default="phantom", help=f"one of {', '.join(DATASETS)}")
    r.add_argument("--data-dir", default="data", help="folder holding the dataset (the phantom is made under it)")
    r.add_argument("--preset", default="tutorial", help=f"one of {', '.join(P.PRESETS)} (paper: the paper's protocol)")
    r.add_argument("--seeds", default="3", help="a count (3 -> seeds 0,1,2) or a list (0,1,2)")
    r.add_argument("--methods", default=None, help="comma-separated methods (default: the study's)")
    r.add_argument("--sources", default=None, help="keep only these source tasks")
    r.add_argument("--targets", default=None, help="keep only these target tasks")
    r.add_argument("--sizes", default=None, help="few-shot target slices (table3), e.g. 400,100,50")
    r.add_argument("--iterations", type=int, default=None, help="override the preset's fine-tuning iterations")
    r.add_argument("--out", default=None, help="sweep folder (default runs/sweep/<dataset>-<preset>)")
    r.add_argument("--executor", default="local", help="local or slurm")
    r.add_argument("--workers", type=int, default=None, help="local: units at once (default: 1 per 4 cores, >= 1)")
    r.add_argument("--threads", type=int, default=None, help="local: torch CPU threads per unit (default: cores / workers)")
    r.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    r.add_argument("--cache-dir", default=None, help="source-model cache (default $TRM_CACHE_DIR or <repo>/cache)")
    r.add_argument("--partition", default=None, help="slurm: partition")
    r.add_argument("--time-min", type=int, default=120, help="slurm: time limit per job (minutes)")
    r.add_argument("--gpus-per-job", type=int, default=0, help="slurm: GPUs per job")
    r.add_argument("--cpus-per-job", type=int, default=4, help="slurm: CPUs per job")
    r.add_argument("--array-parallelism", type=int, default=8, help="slurm: jobs of the array running at once")
    r.add_argument("--no-budget-check", action="store_true",
                   help=f"leave out the budget check (each table's sample of cells at {CHECK_FACTOR}x the budget)")
    r.add_argument("--max-factor", type=int, default=MAX_FACTOR,
                   help="the budget search: candidate budgets 1, 2, 4, ... x the preset's up to this multiple, each "
                        "checked on the table's sample at 2x it (rule v2) until one is accepted; the table runs at the "
                        "accepted one (else at this multiple, labelled so). Default 1: the preset's budget, checked once")
    r.add_argument("--dry-run", action="store_true", help="list the units and their estimated cost; run nothing")
    r.add_argument("--sources-only", action="store_true",
                   help="prepare the sweep's source models (OUT/sources: copied or trained and checked) and stop; with "
                        "--executor slurm the training runs in a job of its own (the login node trains nothing)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    rep = sub.add_parser("report", help="tables, statistics and heatmaps of a sweep folder")
    rep.add_argument("out", help="the sweep folder")
    rep.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the gains' intervals")
    exp = sub.add_parser("export", help="copy a sweep's result files (no executed notebooks) to share or commit them")
    exp.add_argument("out", help="the sweep folder")
    exp.add_argument("dest", help="a new folder, or an earlier export of the same sweep (brought up to date)")
    rk = sub.add_parser("rekey", help="carry a sweep folder's finished units over from hash format 1 (data named by "
                                      "path and file times) to format 2 (by content); only for unchanged data and code")
    rk.add_argument("out", help="the sweep folder (or an export of one)")
    rk.add_argument("--cache-dir", default=None, help="where the data files' hashes are memoised (default <repo>/cache)")
    args = ap.parse_args(argv)
    try:
        if args.command == "rekey":
            c = rekey(args.out, args.cache_dir)
            print(f"{c['rekeyed']} units rekeyed to hash format {HASH_FORMAT}, {c['already']} already current, "
                  f"{c['mismatched']} with parameters that differ from the plan (left as they are)")
            return 0
        if args.command == "report":
            files = write_report(args.out, n_boot=args.bootstrap)
            print("\n".join(str(f) for f in files))
            return 0
        if args.command == "export":
            n = export(args.out, args.dest)
            print(f"copied {n} finished units to {args.dest} (units already there and unchanged are not counted)")
            return 0
        return _run(args)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _ladder(max_factor: int) -> list:
    """The candidate multiples of the preset's budget: 1, 2, 4, ... up to ``max_factor``."""
    out, k = [], 1
    while k <= max(1, int(max_factor)):
        out.append(k)
        k *= 2
    return out


def _dry_run(args, studies, settings, out, filt, kw, workers) -> int:
    """``--dry-run``: every unit the sweep may run, with its estimated cost on this machine: per
    study its check sample at each candidate budget (1, 2, ... x ``--max-factor``, and 2x the
    largest) and its table at each candidate, then the total if the first candidate is accepted and
    if none is (the search's worst case)."""
    fams = families_of(settings)
    recorded = (json.loads((resolve_path(out) / "sweep.json").read_text()).get("budgets", {})
                if (resolve_path(out) / "sweep.json").exists() else {})
    ladder = _ladder(args.max_factor)
    best = worst = 0.0
    timed = {}
    for st in studies:
        units = expand(st, settings, fams, *filt)
        by_k = {}
        for k in ladder + [2 * ladder[-1]]:
            check = check_sample(st, units, k) if not args.no_budget_check else []
            table = [replace(u, factor=k) for u in units] if k in ladder else []
            rows = specs_of(check + table, settings, out, fams, **kw)
            est = estimate_seconds([u for u, _, stt in rows if stt != "done"], settings, fams, out, args.device,
                                   args.cache_dir, timed)
            done = {u.uid for u, _, stt in rows if stt == "done"}
            by_k[k] = (sum(est.get(u.uid, 0.0) for u in check), sum(est.get(u.uid, 0.0) for u in table),
                       len(check), len(table), len(done))
        for k, (c, t, nc, nt, nd) in by_k.items():
            print(f"{st:<9} {k:>2}x ({nc} sample units ~{c / 3600:5.2f} h" + (f"; table {nt} units ~{t / 3600:5.2f} h" if nt else "")
                  + f"; {nd} done)")
        if st == "ablations" or args.no_budget_check:  # the ablations run at their tables' budgets
            b, w = by_k[1][1], (by_k[ladder[-1]][1] if st == "ablations" else by_k[1][1])
        else:
            b = by_k[1][0] + by_k[2][0] + by_k[1][1]
            w = sum(v[0] for v in by_k.values()) + by_k[ladder[-1]][1]
        rec = recorded.get(st, {})
        print(f"{st:<9} accepted at 1x: ~{b / 3600:.2f} unit-hours; none accepted up to {ladder[-1]}x: ~{w / 3600:.2f} unit-hours"
              + (f" (recorded: table at {rec.get('table_factor')}x)" if rec else ""))
        best, worst = best + b, worst + w
    par = workers if args.executor == "local" else args.array_parallelism
    print(f"estimated {best / 3600:.2f} to {worst / 3600:.2f} unit-hours on this machine ({args.device}; about "
          f"{best / 3600 / max(1, par):.2f} to {worst / 3600 / max(1, par):.2f} h with {par} at once; a source neither "
          "carried nor cached counted once, at T_s and 2 T_s; timed now, here: a busy machine inflates it)")
    return 0


def _run(args) -> int:
    studies = list(STUDIES[:3]) if args.study == "all" else _split(args.study)
    for st in studies:
        _check_choice("study", st, STUDIES)
    studies = sorted(studies, key=STUDIES.index)  # the ablations take the tables' budgets: last
    _check_choice("dataset", args.dataset, DATASETS)
    _check_choice("preset", args.preset, tuple(P.PRESETS))
    _check_choice("executor", args.executor, EXECUTORS)
    if args.max_factor < 1:
        raise SweepError(f"--max-factor {args.max_factor}: give 1 (the preset's budget) or a power of 2, e.g. 8")
    overrides = {"iterations": args.iterations} if args.iterations else {}
    settings = Settings(args.dataset, args.data_dir, args.preset, parse_seeds(args.seeds), overrides)
    workers = args.workers or default_workers()
    n_cpu = available_cpus()
    threads = (args.threads or max(1, n_cpu // workers)) if args.executor == "local" else 0
    out = args.out or f"runs/sweep/{args.dataset}-{args.preset}"
    sizes = [int(x) for x in _split(args.sizes)] if args.sizes else None
    filt = (_split(args.methods), _split(args.sources), _split(args.targets), sizes)
    kw = dict(device=args.device, num_threads=threads, cache_dir=args.cache_dir)
    if args.dry_run:
        return _dry_run(args, studies, settings, out, filt, kw, workers)
    if args.executor == "slurm":
        slurm_executor(Path(out) / "slurm", partition=args.partition)  # fail early when submitit/sbatch are missing
    out_p, fams, rows = plan(studies, settings, out, *filt, budget_check=not args.no_budget_check, **kw)
    open_sweep(out_p, settings, studies)  # each study's units are put on record as it plans them, before they run
    if args.executor == "slurm":  # the training, if any, in a job of its own: the login node trains nothing
        ex_src = slurm_executor(out_p / "slurm", partition=args.partition, time_min=args.time_min,
                                gpus_per_job=args.gpus_per_job, cpus_per_job=args.cpus_per_job, name="trm-sources")
        src = prepare_sources_in_job(ex_src, out_p, settings, [u for u, _, _ in rows], fams, device=args.device, log=print,
                                     max_factor=args.max_factor)
    else:
        src = prepare_sources(out_p, settings, [u for u, _, _ in rows], fams, device=args.device, log=print,
                              max_factor=args.max_factor)
    print(f"sources: {len(src)} in {sources_dir(out_p)}, " + ", ".join(
        f"{r.source} ({r.origin}, Dice {r.own_task_dice:.3f}{'' if r.accepted else ', NOT accepted by rule 1'})"
        for r in src.itertuples()))
    if args.sources_only:
        return 0
    results = []

    def run(rows, kind=None):
        plan_rec = planned_of(rows, factors)
        if kind == "budget_check":
            plan_rec = {"budget_check": {}}
            for u, _, _ in rows:
                plan_rec["budget_check"].setdefault(u.study, []).append(u.uid)
        open_sweep(out_p, settings, sorted({u.study for u, _, _ in rows}), plan_rec)
        todo = [spec for _, spec, st in rows if st != "done"]
        if not todo:
            return
        print(f"{len(rows)} units, {len(rows) - len(todo)} already done, {len(todo)} to run -> {out_p}")
        if args.executor == "local":
            results.extend(run_local(todo, workers, progress=not args.no_progress))
        else:
            ex = slurm_executor(out_p / "slurm", partition=args.partition, time_min=args.time_min,
                                gpus_per_job=args.gpus_per_job, cpus_per_job=args.cpus_per_job,
                                array_parallelism=args.array_parallelism)
            results.extend(run_submitit(todo, ex, progress=not args.no_progress))

    t0 = time.perf_counter()
    factors = {}
    budgets = json.loads((out_p / "sweep.json").read_text()).get("budgets", {})
    for st in studies:
        if st == "ablations":  # each family's ablations at its table's budget (Table I: tissue, II: tumour)
            factors[st] = {fam: int((budgets.get(t) or {}).get("table_factor") or 1)
                           for fam, t in (("tissue", "table1"), ("tumour", "table2"))}
        elif not args.no_budget_check:
            units = expand(st, settings, fams, *filt)
            info = find_budget(st, units, settings, out_p, fams, run, args.max_factor, **kw)
            budgets[st] = info
            if info["table_factor"] is None:
                record_budget(out_p, st, info)
                continue
            factors[st] = k = info["table_factor"]
            ks = sorted({c["factor"] for c in info["checks"]} | {2 * c["factor"] for c in info["checks"]})
            record_budget(out_p, st, info, [u.uid for f in ks if f != k for u in check_sample(st, units, f)])
        run(plan([st], settings, out_p, *filt, budget_check=not args.no_budget_check, factors=factors, **kw)[2])
    failed = [r for r in results if r["status"] == "failed"]
    print(f"{len(results) - len(failed)} units finished, {len(failed)} failed in {(time.perf_counter() - t0) / 60:.1f} min"
          + ("; run the same command again to retry the failures" if failed else ""))
    for r in failed:
        print(f"  FAILED {r['uid']}: {r['error']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
