"""Source models carried with the repository: what a source model *is*, where the committed ones
lie, and whether one may be used for what a notebook or a sweep would train.

Why carry them. A source U-Net retrained on another CPU is another model (the last bits of its
sums differ and grow over thousands of iterations: 14-T2's held-out Dice was 0.7793 on one CPU and
0.7392 on another), and every cell that transfers from it moves with it, by more than the seeds
do. Pre-training is also the largest fixed cost of the main job. So the tutorial preset's sources
are trained once, at a budget the source check accepts (``budget.py``, rule v2), and committed
under ``results/sources/``: ``<dataset>-<task>.pt`` (weights and training history) beside
``<dataset>-<task>.json`` (identity, provenance, curve, own-task Dice, SHA-256 of the ``.pt``).

**Identity** (``source_identity``): everything that decides the weights: the dataset and task,
the seed, the architecture (U-Net width, depth, classes, image size), the training settings
(iterations, learning rate and its decay, batch size, loss, augmentation, how often the held-out
curve is read) and the data by content (``datasets.content_signature``). It holds no code text:
a refactor that changes no behaviour leaves every carried model valid; a change of behaviour must
change a setting, or ``IDENTITY_FORMAT``. **Provenance** (``provenance``: the commit, CPU, threads
and date that trained it) is recorded, never compared.

``experiments.source_model`` asks ``find_carried`` first: a carried file whose identity matches is
loaded; one that differs is named with what differs and the model is taken from the cache or
trained; a damaged file (its bytes not those its ``.json`` records) is an error that says how to
restore it. ``tests/test_sources.py`` checks that every committed source matches the identity the
current code computes for it.
"""
from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Optional

import torch

from .datasets import content_signature, num_classes_of
from .utils import REPO_ROOT, atomic_torch_save, atomic_write_json, machine_info

SOURCES_DIR = REPO_ROOT / "results" / "sources"
#: Raised when the meaning of an identity field or the training code's behaviour changes on purpose.
IDENTITY_FORMAT = 1


class CarriedSourceError(ValueError):
    """A committed source file that cannot be trusted (damaged, or its record unreadable)."""


def _per_dataset(cfg: dict, key: str, name: str, default=None):
    v = cfg.get(key, default)
    return v.get(name, default) if isinstance(v, dict) else v


def source_identity(name: str, root, task: str, cfg: dict, seed: int = 0, memo_dir=None) -> dict:
    """What decides a source model's weights (module docstring); ``cfg`` is a preset
    (``presets.get_preset``), per-dataset keys resolved here for dataset ``name``."""
    its = int(_per_dataset(cfg, "source_iterations", name))
    return {
        "format": IDENTITY_FORMAT,
        "dataset": name,
        "task": task,
        "seed": int(seed),
        "architecture": {"model": "UNet2D", "in_channels": 1, "classes": int(num_classes_of(name)),
                         "base_channels": int(cfg["base_channels"]), "depth": int(cfg["depth"]),
                         "image_size": int(cfg["image_size"][name])},
        "training": {"iterations": its, "lr": float(_per_dataset(cfg, "source_lr", name)),
                     "lr_decay": _per_dataset(cfg, "source_lr_decay", name),
                     "batch_size": int(cfg["batch_size"]),
                     "loss": _per_dataset(cfg, "source_loss", name, "ce") or "ce",
                     "augment": bool(_per_dataset(cfg, "source_augment", name, False)),
                     "eval_every": max(1, its // 20)},
        "data": content_signature(name, root, memo_dir),
    }


def identity_hash(identity: dict) -> str:
    """12 hex digits naming an identity (the cache's file names use it too)."""
    return hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def identity_diff(carried: dict, asked: dict, prefix: str = "") -> list:
    """``["training.iterations: carried 6000, asked 3000", ...]``: where two identities differ."""
    out = []
    for k in sorted(set(carried) | set(asked)):
        a, b = carried.get(k), asked.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: carried {a}, asked {b}")
    return out


def carried_paths(name: str, task: str, folder=None) -> tuple:
    """(``.pt``, ``.json``) of the carried source for ``task`` of dataset ``name``."""
    folder = Path(folder) if folder is not None else SOURCES_DIR
    return folder / f"{name}-{task}.pt", folder / f"{name}-{task}.json"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def read_record(name: str, task: str, folder=None) -> Optional[dict]:
    """The ``.json`` record of a carried source (None when there is none); a record that cannot be
    read, or a ``.pt`` whose bytes are not the recorded ones, is a ``CarriedSourceError``."""
    pt, rec = carried_paths(name, task, folder)
    if not rec.exists() and not pt.exists():
        return None
    fix = (f"restore it (`git checkout -- {_rel(pt.parent)}`) or train the source here instead "
           f"(retrain_sources=True)")
    if not rec.exists() or not pt.exists():
        missing = rec if not rec.exists() else pt
        raise CarriedSourceError(f"carried source {_rel(pt)}: {missing.name} is missing; {fix}")
    try:
        record = json.loads(rec.read_text())
        record["identity"], record["sha256"]  # noqa: B018 -- both must be there
    except (ValueError, KeyError, TypeError) as exc:
        raise CarriedSourceError(f"carried source record {_rel(rec)} cannot be read ({exc}); {fix}") from None
    if file_sha256(pt) != record["sha256"]:
        raise CarriedSourceError(f"carried source {_rel(pt)} is damaged (its SHA-256 is not the one "
                                 f"{rec.name} records); {fix}")
    return record


def find_carried(identity: dict, folder=None) -> tuple:
    """``(path, reason)``: the carried ``.pt`` when its identity is ``identity`` (``reason`` says so),
    else ``(None, reason)`` with the one line that says why not (none carried, or what differs)."""
    name, task = identity["dataset"], identity["task"]
    pt, _ = carried_paths(name, task, folder)
    record = read_record(name, task, folder)
    if record is None:
        return None, f"no carried source for {name} {task}"
    diff = identity_diff(record["identity"], identity)
    if diff:
        more = f"; and {len(diff) - 3} more" if len(diff) > 3 else ""
        return None, f"the carried {_rel(pt)} is another model ({'; '.join(diff[:3])}{more})"
    prov = record.get("provenance", {})
    return pt, (f"carried {_rel(pt)} ({identity['training']['iterations']} iterations, trained at commit "
                f"{prov.get('commit', '?')} on {prov.get('cpu', '?')})")


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(device: torch.device) -> dict:
    """Where and when a source is trained (recorded with it, never part of its identity)."""
    info = machine_info()
    return {"commit": _git_commit(), "cpu": info["cpu"], "machine": platform.machine(),
            "device": str(device), "threads": torch.get_num_threads(), "torch": info["torch"],
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_carried(state: dict, identity: dict, own_dice: float, folder=None, budget_check: Optional[str] = None,
                  check: Optional[dict] = None) -> tuple:
    """Commit a trained source: ``state`` is what ``experiments.source_model`` caches
    (``state_dict``, ``history``, ``provenance``); writes the ``.pt`` and its ``.json`` record
    (identity, its hash, provenance, held-out curve, ``own_dice``, the budget check that accepted
    its budget, the ``.pt``'s SHA-256), each atomically; ``check``: that check's row for this source
    (its Dice at T and 2T and whether rule 1 accepts T), kept in the record. Returns both paths."""
    name, task = identity["dataset"], identity["task"]
    pt, rec = carried_paths(name, task, folder)
    hist = state.get("history", {})
    atomic_torch_save({"state_dict": state["state_dict"], "history": hist, "identity": identity,
                       "provenance": state.get("provenance", {})}, pt)
    curve = [[e["iteration"], round(float(e["dice"]), 6)] for e in hist.get("eval", [])]
    size = sum(v.numel() for v in state["state_dict"].values())
    atomic_write_json(rec, {"identity": identity, "identity_hash": identity_hash(identity),
                            "provenance": state.get("provenance", {}), "seconds": hist.get("seconds"),
                            "parameters": int(size), "own_task_dice": round(float(own_dice), 6),
                            "curve": curve, "budget_check": budget_check, **({"source_check": check} if check else {}),
                            "sha256": file_sha256(pt)})
    return pt, rec


def record_summary(rec: dict) -> dict:
    """A carried source's record in one row: dataset, source, own-task Dice, budget, its Dice at 2x
    the budget (where its own check row is kept), whether rule 1 accepted the budget, the check that
    judged it, the SHA-256 (12 digits) and the CPU that trained it. A record without its own check
    row is the repository's, committed only once its check accepted it."""
    chk = rec.get("source_check") or {}
    return {"dataset": rec["identity"]["dataset"], "source": rec["identity"]["task"],
            "own_task_dice": rec["own_task_dice"], "iterations": rec["identity"]["training"]["iterations"],
            "dice_2T": chk.get("dice_2T"), "accepted": bool(chk["ok"]) if chk else True,
            "budget_check": rec.get("budget_check"), "sha256": rec["sha256"][:12],
            "trained_on": (rec.get("provenance") or {}).get("cpu")}


def carried_records(folder=None) -> list:
    """Every carried source's record, sorted by file name (each checked against its ``.pt``)."""
    folder = Path(folder) if folder is not None else SOURCES_DIR
    out = []
    for rec in sorted(folder.glob("*.json")):
        r = json.loads(rec.read_text())
        out.append(read_record(r["identity"]["dataset"], r["identity"]["task"], folder) | {"file": _rel(rec)})
    return out
