"""The transfer grid: source models (carried, cached or trained) and the source x target x method x
seed runs that fine-tune them.

The notebooks call these so that what they show is what the tests check. ``run_grid`` writes one
row per (source, target, method, seed) to CSV as it goes; ``tables.summarize`` turns it into the
paper's headline (mean Dice over the grid, relative gain over vanilla) with the spread over seeds;
``budget.run_status`` says whether each run finished learning.
"""
from __future__ import annotations

import copy
import json
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Optional

import pandas as pd
import torch

from . import data as D
from . import sources as S
from .batched import finetune_cell
from .budget import run_status
from .losses import get_method
from .maps import risk_share, transferability_maps
from .predict import evaluate
from .presets import PRESETS, for_dataset, parse_method
from .tables import write_csv
from .train import finetune, train_source
from .unet import UNet2D
from .utils import atomic_torch_save, available_cpus, cache_root, get_device, resolve_path, seed_everything


def resolve_datasets(dataset: str, data_dir, preset: str = "tutorial", seed: int = 0) -> dict:
    """Map the notebooks' ``dataset`` parameter to {"tissue"/"tumour": (name, root)}.

    ``phantom`` writes (or reuses) both phantom sets under ``data_dir/phantom``; a real dataset
    name is looked up under ``data_dir`` and gives one family.
    """
    data_dir = resolve_path(data_dir)
    if dataset == "phantom":
        root = data_dir / "phantom"
        pp = PRESETS[preset]["phantom_preset"] if preset in PRESETS else "tutorial"
        D.make_phantom("iseg2019", root, seed=seed, preset=pp)
        D.make_phantom("fets2021", root, seed=seed, preset=pp)
        return {"tissue": ("iseg2019", root), "tumour": ("fets2021", root)}
    if dataset == "iseg2019":
        return {"tissue": ("iseg2019", data_dir)}
    if dataset in ("fets2021", "msd"):
        return {"tumour": (dataset, data_dir)}
    raise ValueError(f"unknown dataset {dataset!r}; choose phantom, iseg2019, fets2021 or msd")


def load_task(name, root, task, split, cfg, max_slices=None, seed=0):
    return D.task_slices(name, task, root, split, image_size=cfg["image_size"][name], max_slices=max_slices, seed=seed)


def new_unet(name: str, cfg: dict) -> UNet2D:
    return UNet2D(1, D.num_classes_of(name), cfg["base_channels"], cfg["depth"])


def source_model_path(name, root, task, cfg, seed=0, cache_dir=None, ident: Optional[dict] = None) -> Path:
    """Where ``source_model`` caches the source U-Net for ``task`` when it trains one: named by the
    model's identity (``sources.source_identity``: the data by content, the task, the architecture
    and the training settings), so a changed setting trains a new model. ``ident``: that identity,
    when the caller has it already."""
    ident = ident if ident is not None else S.source_identity(name, root, task, cfg, seed)
    cache_dir = resolve_path(cache_dir) if cache_dir is not None else cache_root() / "sources"
    return Path(cache_dir) / f"{name}-{task}-{S.identity_hash(ident)}.pt"


def source_choice(name, root, task, cfg, seed=0, cache_dir=None, retrain: bool = False,
                  ident: Optional[dict] = None, sources_dir=None) -> tuple:
    """``(path, status, reason)``: where the source for ``task`` comes from, before anything is loaded.

    ``status`` is ``"carried"`` (the committed model in ``results/sources/`` has exactly this
    identity), ``"cached"`` (this checkout trained it before) or ``"train"``; ``reason`` is the one
    line that says why (what differs from the carried model, or ``retrain_sources=True``). A damaged
    carried file raises ``sources.CarriedSourceError`` rather than being skipped silently. ``ident``:
    the source's identity (``sources.source_identity``), when the caller has it already.
    ``sources_dir``: where the carried models lie (default the repository's ``results/sources/``; a
    sweep's own ``OUT/sources/``)."""
    ident = ident if ident is not None else S.source_identity(name, root, task, cfg, seed)
    if retrain:
        why = "retrain_sources=True: the carried model is not used"
    else:
        carried, why = S.find_carried(ident, sources_dir)
        if carried is not None:
            return carried, "carried", why
    path = source_model_path(name, root, task, cfg, seed, cache_dir, ident)
    return (path, "cached", f"{why}; trained before in this checkout ({path.name})") if path.exists() else \
        (path, "train", why)


def source_model(name, root, task, cfg, seed=0, device="auto", cache_dir=None, show_progress=False,
                 retrain: bool = False, sources_dir=None, sources_only: bool = False):
    """The source U-Net for ``task``: the carried one when its identity matches what would be
    trained (``sources.py``), else the cache's, else trained here and cached.

    Returns ``(model, info)``: ``info["status"]`` is ``"carried"``, ``"loaded"`` (from the cache) or
    ``"trained"``, ``info["reason"]`` the one line that says why, ``info["path"]`` the file and
    ``info["sha256"]`` its bytes' SHA-256 (which model, exactly). ``sources_dir``: the folder of carried
    models to look in (``source_choice``); ``sources_only=True`` (a sweep's units): a source not
    carried there is a ``ValueError``, never trained or taken from a cache. With
    ``retrain=True`` (the notebooks' ``retrain_sources``) the carried model is never used: the
    source is trained here (or taken from this checkout's cache, where an earlier notebook of the
    same run trained it).
    """
    b = for_dataset(cfg, name)
    its = int(b["source_iterations"])
    ident = S.source_identity(name, root, task, cfg, seed)
    path, status, reason = source_choice(name, root, task, cfg, seed, cache_dir, retrain, ident, sources_dir)
    if sources_only and status != "carried":
        raise ValueError(f"source {name} {task} is not carried in {sources_dir or S.SOURCES_DIR} ({reason}); a sweep "
                         "prepares its sources before its units (python -m trm_utils.sweep run ... [--sources-only])")
    device = get_device(device)
    seed_everything(seed)
    model = new_unet(name, cfg)
    if status in ("carried", "cached"):
        state = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["state_dict"])
        hist, status = state["history"], ("carried" if status == "carried" else "loaded")
        prov = state.get("provenance", {})
    else:
        train = load_task(name, root, task, "train", cfg)
        test = load_task(name, root, task, "test", cfg)
        hist = train_source(model, train, its, b["source_lr"], cfg["batch_size"], device=device, seed=seed,
                            show_progress=show_progress, eval_data=test,
                            eval_every=max(1, its // 20), lr_decay=b.get("source_lr_decay"),
                            loss=b.get("source_loss", "ce"), augment=bool(b.get("source_augment")))
        prov = S.provenance(device)
        atomic_torch_save({"state_dict": model.state_dict(), "history": hist, "provenance": prov}, path)
        status = "trained"
        reason = f"trained here in {hist.get('seconds', 0):.0f} s: {reason}"
    curve = [[e["iteration"], e["dice"]] for e in hist.get("eval", [])]
    info = {"status": status, "reason": reason, "path": str(path), "seconds": hist.get("seconds"), "curve": curve,
            "run_status": run_status(curve) if curve else None, "provenance": prov,
            "identity": S.identity_hash(ident), "sha256": S.file_sha256(path)}
    return model.to(device).eval(), info


def _train_source_worker(args) -> str:
    """One source trained in a worker process with ``threads`` threads (``prepare_sources``)."""
    name, root, task, cfg, seed, cache_dir, threads, retrain = args
    torch.set_num_threads(int(threads))
    _, info = source_model(name, root, task, cfg, seed=seed, device="cpu", cache_dir=cache_dir, retrain=retrain)
    return info["path"]


def cpu_workers(workers: Optional[int] = None) -> tuple:
    """``(workers, threads)`` for jobs run side by side in worker processes on the CPU: ``workers``
    (default one per available core, at most 4) and ``cores // workers`` threads each (at least 1);
    the cores are those this process may use (``utils.available_cpus``: a SLURM job's allocation,
    not the node's)."""
    cpus = available_cpus()
    workers = min(cpus, 4) if workers is None else int(workers)
    return workers, max(1, cpus // workers)


def prepare_sources(jobs, cfg: dict, seed: int = 0, device="auto", cache_dir=None, workers: Optional[int] = None,
                    log=print, retrain: bool = False) -> dict:
    """Train the source models of ``jobs`` (``[(name, root, task), ...]``) that are neither carried
    (``source_model``) nor cached yet, ``workers`` at a time, then load them all:
    ``{(name, task): (model, info)}``; each source's one-line reason is logged.

    On the CPU, two small U-Nets trained side by side with one thread each do more work per
    second than one after another with both threads (the tutorial's networks are too small to
    keep two threads busy); with ``workers`` > 1 (default: one per CPU core, at most 4) every missing
    source is trained in a worker process with ``cores // workers`` threads, however many are
    missing, so a source's numbers do not depend on what was cached. On CUDA, or with
    ``workers=1``, they are trained one after another in this process. A model trained in a
    worker is the same as one trained here with the same number of threads (seeded; cached by the
    same key).
    """
    device = get_device(device)
    missing = [(n, r, t) for n, r, t in jobs if source_choice(n, r, t, cfg, seed, cache_dir, retrain)[1] == "train"]
    workers, threads = cpu_workers(workers)  # from the configured workers, not from how many are missing
    if device.type == "cpu" and int(workers) > 1 and missing:
        workers = min(int(workers), len(missing))
        if log:
            log(f"training {len(missing)} source models, {workers} at a time with {threads} thread(s) each: "
                + ", ".join(t for _, _, t in missing))
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            list(pool.map(_train_source_worker,
                          [(n, r, t, cfg, seed, cache_dir, threads, retrain) for n, r, t in missing]))
    out = {}
    for n, r, t in jobs:
        model, info = source_model(n, r, t, cfg, seed=seed, device=device, cache_dir=cache_dir, retrain=retrain)
        if (n, r, t) in missing and info["status"] == "loaded":
            info["status"] = f"trained in a worker ({threads} thread{'s' if threads > 1 else ''})"
            info["reason"] = f"trained here in {info['seconds'] or 0:.0f} s: " + info["reason"].split("; trained before")[0]
        if log:
            log(f"source {n} {t}: {info['reason']}")
        out[(n, t)] = (model, info)
    return out


def run_grid(name, root, sources: Iterable[str], targets: Iterable[str], methods: Iterable[str], seeds: Iterable[int],
             cfg: dict, device="auto", out_csv=None, show_progress=False, max_slices=None, cache_dir=None,
             log=print, engine: str = "batched", keep_models: Optional[dict] = None,
             retrain_sources: bool = False, sources_dir=None, sources_only: bool = False) -> pd.DataFrame:
    """Fine-tune every source on every other target with every method and seed.

    The sources are the carried ones where their identity matches (``source_model``;
    ``retrain_sources=True``: trained here, or this checkout's cached ones; ``sources_dir`` /
    ``sources_only``: a sweep's own carried sources, and nothing else).

    A cell (source, target) fine-tunes all its methods x seeds at once with ``finetune_cell``
    (``engine="batched"``, the default) or one run after another with ``finetune``
    (``engine="per_run"``, the readable reference; the same numbers up to float rounding).
    With ``max_slices`` (the few-shot study) each seed draws its own subset of the target's
    training slices (recorded as ``subset_seed``), so the spread over seeds covers which slices
    were labelled; the runs of one seed then form one batch, and the preset's ``fewshot`` keys
    (its own budget) replace the grid's.

    One row per run: dataset, source, target, method, seed, subset_seed, source_origin and
    source_identity (carried / loaded / trained, and the model's identity hash: ``sources.py``), source_sha256 (the
    model file's bytes), risk_share_5 (``maps.risk_share`` of the dataset-level map: the share of pixel
    positions with transfer risk above 5; NaN where the cell computed no dataset map), dice (mean foreground
    Dice on the target's held-out test subjects), dice_per_class, pixel_leep (the source's score
    on the target training set, eq. 3), map_leep (the same pixels scored with each patch's own
    P(y|z): the dataset-level map's global score), curve (held-out Dice every ``eval_every`` iterations, recorded
    for analysis only), seconds (the cell's time shared out over its runs). Written to
    ``out_csv`` after every cell, atomically. ``methods`` may hold variants (``parse_method``:
    ``trm@map=image``, ``trm@base=2``, ``trm@refresh=100``); the row keeps the label. The maps of
    every reading the methods use are computed once per cell (``maps.transferability_maps``, the
    preset's ``map_patch``).

    ``keep_models``: a dict whose keys are ``(source, target, method, seed)`` runs to keep; the grid
    fills in each one's fine-tuned model (e.g. to draw its risk map after fine-tuning, without
    training it again). Only the runs asked for are kept.
    """
    if engine not in ("batched", "per_run"):
        raise ValueError(f"engine must be 'batched' or 'per_run', got {engine!r}")
    if max_slices is not None and cfg.get("fewshot"):
        cfg = {**cfg, **cfg["fewshot"]}  # the few-shot study's own budget (see the tutorial preset)
    cfg = for_dataset(cfg, name)
    if int(cfg["iterations"]) < 1:
        raise ValueError(f"a grid needs iterations >= 1, got {cfg['iterations']}")
    device = get_device(device)
    methods, seeds = list(methods), [int(s) for s in seeds]
    parsed = {m: parse_method(m) for m in methods}  # fails before any training on a misspelt method
    readings = tuple(dict.fromkeys(o.get("reading", "dataset") for n, o in parsed.values() if get_method(n).needs_map))
    patch = int(cfg.get("map_patch", 1))
    rows, told = [], set()
    for target in targets:
        test = load_task(name, root, target, "test", cfg)
        # (subset seed, seeds trained on it): one subset for all seeds, or one per seed (few-shot)
        groups = [(None, seeds)] if max_slices is None else [(s, [s]) for s in seeds]
        trains = {g: load_task(name, root, target, "train", cfg, max_slices=max_slices, seed=g or 0) for g, _ in groups}
        for source in sources:
            if source == target:
                continue
            src, src_info = source_model(name, root, source, cfg, device=device, cache_dir=cache_dir,
                                         show_progress=show_progress, retrain=retrain_sources, sources_dir=sources_dir,
                                         sources_only=sources_only)
            if log and source not in told:  # which model, and why: once per source
                told.add(source)
                log(f"source {source}: {src_info['status']}: {src_info['reason']}")
            before = evaluate(src, test, device=device)["dice"]
            for subset_seed, group_seeds in groups:
                train = trains[subset_seed]
                tr = transferability_maps(src, train, readings or ("dataset",), patch, device=device)
                labels = [(m, s) for m in methods for s in group_seeds]
                runs = [(parsed[m][0], s, parsed[m][1]) for m, s in labels]
                want = [k for k, (m, s) in enumerate(labels) if keep_models is not None
                        and (source, target, m, s) in keep_models]
                hists, models = _train_runs(src, train, test, runs, tr, cfg, device, show_progress, engine, bool(want))
                for k in want:
                    keep_models[(source, target, *labels[k])] = models[k]
                for (method, seed), hist in zip(labels, hists):
                    final = hist["eval"][-1]
                    rows.append({
                        "dataset": name, "source": source, "target": target, "method": method, "seed": seed,
                        "subset_seed": subset_seed, "dice": final["dice"],
                        "dice_per_class": json.dumps(final["dice_per_class"]),
                        "dice_before": before, "pixel_leep": tr["score"], "map_leep": tr["dataset"]["score"],
                        "n_train_slices": len(train),
                        "iterations": cfg["iterations"], "final_loss": hist["loss"][-1] if hist["loss"] else float("nan"),
                        "curve": json.dumps([[e["iteration"], e["dice"]] for e in hist["eval"]]),
                        "seconds": hist["seconds"], "engine": engine,
                        "source_origin": src_info["status"], "source_identity": src_info["identity"],
                        "source_sha256": src_info["sha256"],
                        "risk_share_5": risk_share(tr["dataset"]["hardness"]) if "dataset" in tr else float("nan"),
                    })
            if log:
                cell = pd.DataFrame(rows)
                cell = cell[(cell.source == source) & (cell.target == target)].groupby("method").dice.mean()
                log(f"{source:>10} -> {target:<10} " + "  ".join(f"{m} {cell[m]:.3f}" for m in methods))
            if out_csv is not None:
                write_csv(pd.DataFrame(rows), out_csv)
    return pd.DataFrame(rows)


def _train_runs(src, train, test, runs, maps, cfg, device, show_progress, engine, return_models=False) -> tuple:
    """One history per (method, seed) run of a cell, each ending with its held-out Dice, and the
    fine-tuned models (None unless ``return_models``)."""
    kw = dict(iterations=cfg["iterations"], lr=cfg["lr"], batch_size=cfg["batch_size"], eval_data=test,
              eval_every=cfg["eval_every"] or cfg["iterations"], device=device, show_progress=show_progress,
              lr_decay=cfg.get("lr_decay"), patch=int(cfg.get("map_patch", 1)))
    if engine == "batched":
        out = finetune_cell(src, train, runs, maps=maps, precision=cfg.get("precision", "fp32"),
                            return_models=return_models, **kw)
        return out if return_models else (out, None)
    hists, models = [], []
    for method, seed, opts in runs:
        t0 = time.perf_counter()
        model = copy.deepcopy(src)
        h = finetune(model, train, method, maps=maps, seed=seed, **opts, **kw)
        h["seconds"] = time.perf_counter() - t0
        hists.append(h)
        models.append(model.eval() if return_models else None)
    return hists, (models if return_models else None)
