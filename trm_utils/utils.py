"""Small shared helpers: seeding, device choice, atomic file writes, repository paths."""
from __future__ import annotations

import json
import os
import platform
import random
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) so a run repeats on the CPU."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    random.seed(int(seed))
    np.random.seed(int(seed) % 2**32)
    torch.manual_seed(int(seed))
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(int(seed))


def progress_bar(iterable, show: bool, desc: str):
    """``iterable`` with a tqdm progress bar when ``show``, else as it is."""
    if not show:
        return iterable
    from tqdm.auto import tqdm  # only where a bar is drawn: a headless run never imports it

    return tqdm(iterable, desc=desc, leave=False)


def get_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` gives CUDA when available, else the CPU; any other value is passed to torch.

    A request for CUDA on a machine without it is refused with a one-line message rather
    than failing later inside a kernel.
    """
    if isinstance(device, torch.device):
        dev = device
    elif device is None or str(device).lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(str(device))
        except RuntimeError as exc:
            raise ValueError(f"device {device!r} is not a torch device; use 'auto', 'cpu' or 'cuda'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for CUDA but none is available; use device='auto' or 'cpu'")
    return dev


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename.

    A crash leaves either the old file or the new one, never a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through a temporary file and a rename (checkpoints are never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def cache_root() -> Path:
    """Where source models and preprocessed slices are cached: ``$TRM_CACHE_DIR`` or ``<repo>/cache``."""
    return Path(os.environ.get("TRM_CACHE_DIR", REPO_ROOT / "cache"))


def available_cpus() -> int:
    """The cores this process may run on: its CPU affinity where the OS has one (a SLURM job, a
    container or ``taskset`` limits it to its allocation, while ``os.cpu_count()`` counts the whole
    node), else ``os.cpu_count()``; at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return max(1, os.cpu_count() or 1)


def resolve_path(path: str | os.PathLike) -> Path:
    """Anchor a relative path at the repository root (not the working directory).

    nbmake runs notebooks from ``notebooks/``, papermill and Colab from wherever they were
    started; anchoring at the root makes ``data/`` and ``runs/`` mean the same thing in all.
    """
    p = Path(os.path.expanduser(str(path)))
    return p if p.is_absolute() else REPO_ROOT / p


def machine_info() -> dict:
    """The CPU model, core count and library versions a result was computed with: the same seed
    gives the same numbers on the same machine; across CPU models the last bits may differ (and
    a run that has not finished learning can turn them into different results)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "cores_available": available_cpus(), "python": platform.python_version()}
    for pkg in ("torch", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out
