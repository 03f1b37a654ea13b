"""Presets, cached source models and the source x target x method x seed transfer grid.

The notebooks call these so that what they show is what the tests check. A grid writes one
row per (source, target, method, seed) to CSV as it goes; ``summarize`` turns it into the
paper's headline (mean Dice over the grid, relative gain over vanilla) with the spread over
seeds.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path
from typing import Iterable, Optional

import pandas as pd
import torch

from . import data as D
from . import sources as S
from .maps import transferability_maps
from .train import evaluate, finetune, finetune_cell, train_source
from .unet import UNet2D
from .utils import REPO_ROOT, atomic_torch_save, atomic_write_text, cache_root, get_device, resolve_path, seed_everything

CORE_METHODS = ("vanilla", "class_weight", "trs_map", "trm")
#: TRM under the other reading of eq. 4 (a map per image); ``trm`` itself reads the dataset-level map.
IMAGE_READING = "trm@map=image"
ABLATIONS = ("fg_only", "exp_only")

#: What each preset means. ``paper`` is the paper's protocol; ``tutorial`` is what 2 CPU cores
#: afford in the main job's 20 minutes (see notebook 04 for the curves behind its budget).
PRESETS = {
    "tutorial": {
        "phantom_preset": "tutorial",
        "image_size": {"iseg2019": 64, "fets2021": 64, "msd": 64},
        "base_channels": 8,
        "depth": 3,
        "batch_size": 8,
        # Budgets: each family's is checked by doubling it (``budget.py``, ``benchmarks/budget_check.py``;
        # the verdicts are in results/calibration/ and printed by notebooks 04 and 05). Tissue sources:
        # 500 iterations, the learning rate decaying over the last half: accepted (WM-T2 0.816 -> 0.811 at
        # 1000, WM-T1 0.811 -> 0.806); 1000 was not (held-out Dice 0.81 -> 0.795 at 2000: overfitting).
        # Tumour sources learn with cross-entropy + soft Dice (``source_loss``): with cross-entropy alone the
        # 14-T2 source reached Dice 0.17 after 1500 iterations (NCR and ET at 0). Budget: 12000, doubled by
        # rule v2's source check (14-FLAIR still learning at 3000 and 6000: +0.020, +0.0185; 12000 vs 24000
        # accepted: -0.005, +0.0099). The sources are carried (results/sources/), so the main job never pays
        # for pre-training.
        "source_iterations": {"iseg2019": 500, "fets2021": 12000, "msd": 12000},
        "source_lr": 2e-3,
        "source_lr_decay": {"iseg2019": 0.5, "fets2021": 0.5, "msd": 0.5},
        "source_loss": {"iseg2019": "ce", "fets2021": "ce_dice", "msd": "ce_dice"},
        # Tumour sources train on randomly flipped and intensity-jittered batches (``train.augment_batch``):
        # without it 14-T2 peaked at 0.71 and fell to 0.65 by 3000 iterations (0.57 by 6000): overfitting;
        # with it, 0.779 at 3000 and 0.769 at 6000 (14-FLAIR 0.873 and 0.894).
        "source_augment": {"iseg2019": False, "fets2021": True, "msd": True},
        # Fine-tuning: lr 1e-3 with a linear decay over the second half of the run (the remedy for a
        # noisy end; never a checkpoint picked by its held-out Dice). The paper's lr 1e-4 needs its 5000
        # iterations, 8x what 2 CPU cores afford in the main job. Tissue: 600 iterations (at 400 TRM
        # from a cross-modality source was still rising). Tumour: 400. Held-out Dice every 50 (tissue)
        # / 25 (tumour) iterations.
        "iterations": {"iseg2019": 600, "fets2021": 400, "msd": 400},
        "lr": 1e-3,
        "lr_decay": 0.5,
        "eval_every": {"iseg2019": 50, "fets2021": 25, "msd": 25},
        # The few-shot study (a capped target training set) overrides these: at 600 iterations its
        # held-out Dice peaked and then fell by 0.012-0.019, so it has a budget of its own.
        "fewshot": {"iterations": 400, "eval_every": 25},
        # The dataset-level transferability map's patch (eq. 4, maps.py): one entry per pixel coordinate
        # at 64 px (64 x 64 entries).
        "map_patch": 1,
    },
    # a seconds-long run of every code path, for the tests (not for results)
    "smoke": {
        "phantom_preset": "smoke",
        "image_size": {"iseg2019": 32, "fets2021": 32, "msd": 32},
        "base_channels": 4,
        "depth": 2,
        "batch_size": 4,
        "source_iterations": 15,
        "source_lr": 1e-3,
        "iterations": 6,
        "lr": 1e-3,
        "lr_decay": 0.5,
        "eval_every": 3,
        "map_patch": 1,
    },
    "paper": {
        "phantom_preset": "paper",
        "image_size": {"iseg2019": 192, "fets2021": 240, "msd": 240},
        "base_channels": 64,
        "depth": 4,
        "batch_size": 8,
        "source_iterations": 5000,
        "source_lr": 1e-3,
        "iterations": 5000,
        "lr": 1e-4,
        "eval_every": 500,
        # 4 x 4 patches as [22]'s released code: 48 x 48 (192 px) or 60 x 60 (240 px) entries, about the
        # tutorial map's 64 x 64
        "map_patch": 4,
    },
}

#: The paper's grids (Tables I and II) and few-shot study (Table III).
PAPER_TASKS = {
    "iseg2019": ["CSF-T1", "GM-T1", "WM-T1", "CSF-T2", "GM-T2", "WM-T2"],
    "fets2021": ["13-T1", "14-FLAIR", "14-T1", "14-T2", "17-T2", "18-FLAIR"],
    "msd": ["MSD-FLAIR", "MSD-T1", "MSD-T1CE", "MSD-T2"],
}
#: Small grids a CPU affords: same-modality / cross-modality and cross-task / cross-centre pairs.
#: (Sized for the main job's 20 minutes on 2 CPU cores at a converged budget: one target per family,
#: a same-modality and a cross-modality source; the full grids are the paper preset's.)
TUTORIAL_GRID = {
    "iseg2019": {"sources": ["WM-T2", "WM-T1"], "targets": ["GM-T2"]},
    "fets2021": {"sources": ["14-FLAIR", "14-T2"], "targets": ["18-FLAIR"]},
    "msd": {"sources": ["MSD-FLAIR", "MSD-T2"], "targets": ["MSD-T1CE"]},
}


def parse_method(label: str) -> tuple:
    """A grid's method label -> ``(method, options)`` for ``finetune`` / ``finetune_cell``.

    A plain name (``trm``) is the method with its defaults (the dataset-level map of eq. 4);
    ``name@key=value[,key=value]`` is a variant: ``map`` (the reading of eq. 4: ``dataset``, the
    default, or ``image``, a map per image), ``base`` (the exponential's base, eq. 6; the paper's
    10) and ``refresh`` (recompute the maps every k iterations with the current model), e.g.
    ``trm@map=image``, ``trm@base=2`` or ``trm@refresh=100``.
    """
    from .losses import check_method_reading, get_method
    from .maps import READINGS

    name, _, rest = str(label).partition("@")
    method = get_method(name)  # a clear error naming the valid methods
    opts = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if key not in ("base", "refresh", "map") or not eq:
            raise ValueError(f"method variant {label!r}: options are map=dataset|image, base=<number> and "
                             f"refresh=<iterations>, e.g. 'trm@map=image', 'trm@base=2' or 'trm@refresh=100'")
        if key == "map":
            if value not in READINGS:
                raise ValueError(f"method variant {label!r}: map must be one of {', '.join(READINGS)}, got {value!r}")
            opts["reading"] = value
            continue
        try:
            opts["base" if key == "base" else "refresh_every"] = float(value) if key == "base" else int(value)
        except ValueError:
            raise ValueError(f"method variant {label!r}: {key} must be a number, got {value!r}") from None
    if opts and not method.needs_map:
        raise ValueError(f"method variant {label!r}: {name!r} uses no transferability map, so map=, base= and "
                         f"refresh= do not apply to it")
    check_method_reading(name, opts.get("reading", "dataset"))
    return name, opts


#: Budget keys a preset may give per dataset, as ``{"iseg2019": 400, "fets2021": 1200, ...}``
#: (a plain value applies to every dataset); ``for_dataset`` resolves them.
PER_DATASET_KEYS = ("iterations", "lr", "lr_decay", "eval_every", "source_iterations", "source_lr", "source_lr_decay",
                    "source_loss", "source_augment")


def for_dataset(cfg: dict, name: str) -> dict:
    """``cfg`` with every per-dataset budget key (``PER_DATASET_KEYS``) resolved for dataset ``name``.

    A key given as a dict without ``name`` is an error naming the key and the datasets it has.
    """
    out = dict(cfg)
    for k in PER_DATASET_KEYS:
        v = out.get(k)
        if isinstance(v, dict):
            if name not in v:
                raise ValueError(f"preset key {k!r} has no value for dataset {name!r} (it has {sorted(v)}); "
                                 f"add one or give a single value")
            out[k] = v[name]
    return out


def scale_budget(cfg: dict, factor: int) -> dict:
    """``cfg`` with every fine-tuning budget x ``factor``: ``iterations`` and ``eval_every`` (per
    dataset where they are dicts), the few-shot block's too; the learning rate, its decay's
    fraction of the run and everything else kept: the same schedule shape, read as often relative
    to the run. ``budget.budget_cfg`` (the families' checks) and the sweep's budget checks both
    scale with it."""
    if int(factor) == 1:
        return cfg
    out = copy.deepcopy(cfg)

    def mul(v):
        if isinstance(v, dict):
            return {k: mul(x) for k, x in v.items()}
        return None if v is None else int(v) * int(factor)

    for block in (out, out.get("fewshot") or {}):
        for k in ("iterations", "eval_every"):
            if k in block:
                block[k] = mul(block[k])
    return out


def get_preset(preset: str, **overrides) -> dict:
    """A copy of ``PRESETS[preset]`` with the given keys replaced (None leaves a key as it is).

    An explicit ``iterations`` also replaces the few-shot study's own budget (``fewshot``), so
    one number sets every run's length.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {list(PRESETS)}")
    cfg = copy.deepcopy(PRESETS[preset])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    if overrides.get("iterations") is not None and "fewshot" not in overrides and cfg.get("fewshot"):
        cfg["fewshot"] = {k: v for k, v in cfg["fewshot"].items() if k != "iterations"}  # an explicit budget wins
    return cfg


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


def grid_tasks(name: str, preset: str) -> tuple:
    """(sources, targets) of the transfer grid for dataset ``name`` under ``preset``."""
    if preset == "paper":
        return list(PAPER_TASKS[name]), list(PAPER_TASKS[name])
    # the tutorial grid (also used by the smoke preset)
    g = TUTORIAL_GRID[name]
    return list(g["sources"]), list(g["targets"])


def load_task(name, root, task, split, cfg, max_slices=None, seed=0):
    return D.task_slices(name, task, root, split, image_size=cfg["image_size"][name], max_slices=max_slices, seed=seed)


def source_iterations(cfg: dict, name: str) -> int:
    """The preset's source pre-training iterations for dataset ``name`` (a number or a per-dataset dict)."""
    return int(for_dataset(cfg, name)["source_iterations"])


def new_unet(name: str, cfg: dict) -> UNet2D:
    return UNet2D(1, D.num_classes_of(name), cfg["base_channels"], cfg["depth"])


def source_model_path(name, root, task, cfg, seed=0, cache_dir=None) -> Path:
    """Where ``source_model`` caches the source U-Net for ``task`` when it trains one: named by the
    model's identity (``sources.source_identity``: the data by content, the task, the architecture
    and the training settings), so a changed setting trains a new model."""
    ident = S.source_identity(name, root, task, cfg, seed)
    cache_dir = resolve_path(cache_dir) if cache_dir is not None else cache_root() / "sources"
    return Path(cache_dir) / f"{name}-{task}-{S.identity_hash(ident)}.pt"


def source_choice(name, root, task, cfg, seed=0, cache_dir=None, retrain: bool = False) -> tuple:
    """``(path, status, reason)``: where the source for ``task`` comes from, before anything is loaded.

    ``status`` is ``"carried"`` (the committed model in ``results/sources/`` has exactly this
    identity), ``"cached"`` (this checkout trained it before) or ``"train"``; ``reason`` is the one
    line that says why (what differs from the carried model, or ``retrain_sources=True``). A damaged
    carried file raises ``sources.CarriedSourceError`` rather than being skipped silently."""
    ident = S.source_identity(name, root, task, cfg, seed)
    if retrain:
        why = "retrain_sources=True: the carried model is not used"
    else:
        carried, why = S.find_carried(ident)
        if carried is not None:
            return carried, "carried", why
    path = source_model_path(name, root, task, cfg, seed, cache_dir)
    return (path, "cached", f"{why}; trained before in this checkout ({path.name})") if path.exists() else \
        (path, "train", why)


def source_model(name, root, task, cfg, seed=0, device="auto", cache_dir=None, show_progress=False,
                 retrain: bool = False):
    """The source U-Net for ``task``: the carried one when its identity matches what would be
    trained (``sources.py``), else the cache's, else trained here and cached.

    Returns ``(model, info)``: ``info["status"]`` is ``"carried"``, ``"loaded"`` (from the cache) or
    ``"trained"``, ``info["reason"]`` the one line that says why, ``info["path"]`` the file. With
    ``retrain=True`` (the notebooks' ``retrain_sources``) the carried model is never used: the
    source is trained here (or taken from this checkout's cache, where an earlier notebook of the
    same run trained it).
    """
    b = for_dataset(cfg, name)
    its = int(b["source_iterations"])
    path, status, reason = source_choice(name, root, task, cfg, seed, cache_dir, retrain)
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
            "identity": S.identity_hash(S.source_identity(name, root, task, cfg, seed))}
    return model.to(device).eval(), info


def _train_source_worker(args) -> str:
    """One source trained in a worker process with ``threads`` threads (``prepare_sources``)."""
    name, root, task, cfg, seed, cache_dir, threads, retrain = args
    torch.set_num_threads(int(threads))
    _, info = source_model(name, root, task, cfg, seed=seed, device="cpu", cache_dir=cache_dir, retrain=retrain)
    return info["path"]


def cpu_workers(workers: Optional[int] = None) -> tuple:
    """``(workers, threads)`` for jobs run side by side in worker processes on the CPU: ``workers``
    (default one per core, at most 4) and ``cores // workers`` threads each (at least 1)."""
    import os

    cpus = os.cpu_count() or 1
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
    source is trained in a worker process with ``cpu_count // workers`` threads, however many are
    missing, so a source's numbers do not depend on what was cached. On CUDA, or with
    ``workers=1``, they are trained one after another in this process. A model trained in a
    worker is the same as one trained here with the same number of threads (seeded; cached by the
    same key).
    """
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

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
             retrain_sources: bool = False) -> pd.DataFrame:
    """Fine-tune every source on every other target with every method and seed.

    The sources are the carried ones where their identity matches (``source_model``;
    ``retrain_sources=True``: trained here, or this checkout's cached ones).

    A cell (source, target) fine-tunes all its methods x seeds at once with ``finetune_cell``
    (``engine="batched"``, the default) or one run after another with ``finetune``
    (``engine="per_run"``, the readable reference; the same numbers up to float rounding).
    With ``max_slices`` (the few-shot study) each seed draws its own subset of the target's
    training slices (recorded as ``subset_seed``), so the spread over seeds covers which slices
    were labelled; the runs of one seed then form one batch, and the preset's ``fewshot`` keys
    (its own budget) replace the grid's.

    One row per run: dataset, source, target, method, seed, subset_seed, source_origin and
    source_identity (carried / loaded / trained, and the model's identity hash: ``sources.py``), dice (mean foreground
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
    from .losses import get_method

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
                                         show_progress=show_progress, retrain=retrain_sources)
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


def stuck_runs(df: pd.DataFrame, threshold: float = BELOW) -> pd.DataFrame:
    """Runs that ended below ``threshold`` Dice (never left the all-background trap, typically)."""
    return df[df.dice < threshold][["source", "target", "method", "seed", "dice"]]


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


def family_tasks(name: str, preset: str, sources=None, targets=None, all_targets: bool = False) -> tuple:
    """The notebooks' task-list parameters, with None meaning the preset's grid
    (``all_targets``: every task of the dataset as a target, as notebook 02's score matrix)."""
    s, t = grid_tasks(name, preset)
    if all_targets:
        t = list(PAPER_TASKS[name])
    return list(sources) if sources else s, list(targets) if targets else t
