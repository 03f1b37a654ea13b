"""The data layer in one import: the readers of the real layouts (``datasets``), the slice
datasets (``slices``) and the phantom writer (``phantom``), under the names the notebooks use.

Entry points:

* ``make_phantom(kind, root, ...)`` writes the embedded phantom in the real layout of
  ``kind`` (``iseg2019``, ``fets2021``, or ``msd``) under ``root`` (once; reused after).
* ``open_dataset(name, root)`` lists subjects and loads one subject's volumes.
* ``task_slices(name, task, root, split, ...)`` gives a torch Dataset of axial slices.

Command line: ``python -m trm_utils.data phantom [ROOT]`` and ``python -m trm_utils.data verify NAME ROOT``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import phantom as ph
from .datasets import (DATASETS, FETS_DIR, FETS_TO_CLASS, FETS_VALUES, HOW_TO_GET, ISEG_DIR, ISEG_LABELS,
                       ISEG_VALUES, MSD_CHANNELS, MSD_DIR, MSD_TO_FETS, TUMOUR_CLASSES, DataError, FeTS2021,
                       ISeg2019, MSDBrainTumour, class_names, content_signature, dataset_files, default_data_dir, load_volume, num_classes_of,
                       open_dataset, parse_task, verify)
from .phantom import PHANTOM_MANIFEST, PhantomConfig
from .slices import SliceDataset, brain_box, fit_slices, split_subjects, task_slices, zscore_brain

#: the phantom's size presets (``phantom.PRESETS``)
PRESETS = ph.PRESETS

__all__ = [
    "DATASETS", "FETS_DIR", "FETS_TO_CLASS", "FETS_VALUES", "HOW_TO_GET", "ISEG_DIR", "ISEG_LABELS", "ISEG_VALUES",
    "MSD_CHANNELS", "MSD_DIR", "MSD_TO_FETS", "TUMOUR_CLASSES", "DataError", "FeTS2021", "ISeg2019", "MSDBrainTumour",
    "class_names", "content_signature", "dataset_files", "default_data_dir", "load_volume", "num_classes_of", "open_dataset", "parse_task", "verify",
    "PHANTOM_MANIFEST", "PhantomConfig", "PRESETS", "make_phantom",
    "SliceDataset", "brain_box", "fit_slices", "split_subjects", "task_slices", "zscore_brain",
]


def make_phantom(kind: str, root=None, seed: int = 0, preset: str = "tutorial", noise: float = 1.0,
                 force: bool = False, **overrides) -> Path:
    """``phantom.make_phantom`` with ``root`` defaulting to ``default_data_dir() / "phantom"``."""
    root = Path(root) if root is not None else default_data_dir() / "phantom"
    return ph.make_phantom(kind, root, seed=seed, preset=preset, noise=noise, force=force, **overrides)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trm_utils.data", description="phantom writer and dataset checks")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("phantom", help="write the embedded phantom (both kinds) under ROOT")
    a.add_argument("root", nargs="?", default=None)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--preset", default="tutorial", choices=list(PRESETS))
    a.add_argument("--kinds", default="iseg2019,fets2021")
    v = sub.add_parser("verify", help="verify a dataset's layout under ROOT")
    v.add_argument("name", choices=list(DATASETS))
    v.add_argument("root")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "phantom":
            root = Path(args.root) if args.root else default_data_dir() / "phantom"
            for kind in args.kinds.split(","):
                print(f"{kind} phantom: {make_phantom(kind, root, seed=args.seed, preset=args.preset)}")
        else:
            print(verify(args.name, args.root))
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
