"""2D axial slice datasets of a task, the form the experiments train on.

``task_slices(name, task, root, split, ...)`` gives a torch Dataset of axial slices
(image 1 x H x W float32, label H x W int64) for a task name such as ``GM-T2``, ``14-FLAIR`` or
``MSD-FLAIR``: subjects split into train and test (never by slice), each volume z-scored over
its brain and cropped to its brain's bounding box, padded to a square and resized to the image
size (labels by nearest neighbour), slices without brain skipped, results cached as ``.npz``.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .datasets import (FETS_TO_CLASS, ISEG_LABELS, DataError, default_data_dir, num_classes_of, open_dataset,
                       parse_task)
from .utils import atomic_write_bytes, cache_root


class SliceDataset(torch.utils.data.Dataset):
    """Axial 2D slices of one task and split, held in memory.

    Attributes: ``images`` N x 1 x H x W float32, ``labels`` N x H x W int64,
    ``subject_ids`` (one per slice), ``slice_index`` (axial index in its volume),
    ``num_classes``, ``task``, ``dataset``, ``split``.
    """

    def __init__(self, images, labels, subject_ids, slice_index, num_classes, task, dataset, split):
        self.images, self.labels = images, labels
        self.subject_ids, self.slice_index = list(subject_ids), list(slice_index)
        self.num_classes, self.task, self.dataset, self.split = num_classes, task, dataset, split

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def __repr__(self):
        return (f"SliceDataset({self.dataset}:{self.task}, {self.split}, {len(self)} slices of "
                f"{tuple(self.images.shape[-2:])} from {len(set(self.subject_ids))} subjects)")


def split_subjects(subjects, split: str, test_fraction: float = 0.3, seed: int = 0) -> list:
    """Seeded split by subject (never by slice); at least one subject on each side."""
    if split not in ("train", "test", "all"):
        raise DataError(f"split must be 'train', 'test' or 'all', got {split!r}")
    subjects = sorted(subjects)
    if split == "all":
        return subjects
    if len(subjects) < 2:
        raise DataError(f"cannot split {len(subjects)} subject(s) into train and test; use split='all'")
    order = np.random.default_rng(seed).permutation(len(subjects))
    n_test = min(max(1, int(round(test_fraction * len(subjects)))), len(subjects) - 1)
    chosen = order[:n_test] if split == "test" else order[n_test:]
    return [subjects[i] for i in sorted(chosen)]


def brain_box(brain: np.ndarray, margin: int = 2) -> tuple:
    """In-plane bounding box ``(r0, r1, c0, c1)`` of a volume's brain over all its axial slices
    (``brain``: X x Y x Z bool), widened by ``margin`` voxels and clipped to the volume."""
    if not brain.any():
        return 0, brain.shape[0], 0, brain.shape[1]
    rows, cols = np.nonzero(brain.any(axis=2))
    return (max(0, rows.min() - margin), min(brain.shape[0], rows.max() + 1 + margin),
            max(0, cols.min() - margin), min(brain.shape[1], cols.max() + 1 + margin))


def fit_slices(stack: np.ndarray, box: tuple, size: int, labels: bool) -> np.ndarray:
    """Crop axial slices (Z x X x Y) to ``box``, zero-pad to a centred square, resize to ``size``.

    Images are resized by area averaging when shrinking and bilinearly when enlarging; labels
    by nearest neighbour, so label values stay exact. The whole brain is kept at any ``size``
    (a crop to the central pixels would cut the cortex and any peripheral tumour away).
    """
    r0, r1, c0, c1 = box
    crop = stack[:, r0:r1, c0:c1]
    h, w = crop.shape[1:]
    s = max(h, w)
    pad = ((0, 0), ((s - h) // 2, s - h - (s - h) // 2), ((s - w) // 2, s - w - (s - w) // 2))
    sq = np.pad(crop, pad)
    if s == size:
        return sq
    t = torch.from_numpy(np.ascontiguousarray(sq))[:, None]
    if labels:
        out = F.interpolate(t.float(), size=(size, size), mode="nearest-exact").round().to(t.dtype)
    else:
        out = F.interpolate(t.float(), size=(size, size), mode="area" if size < s else "bilinear",
                            **({} if size < s else {"align_corners": False}))
    return out[:, 0].numpy().astype(stack.dtype)


def zscore_brain(vol: np.ndarray) -> np.ndarray:
    """Per-volume z-score over brain voxels (non-zero in the skull-stripped image); 0 outside."""
    brain = vol != 0
    if not brain.any():
        return np.zeros_like(vol, dtype=np.float32)
    v = vol[brain]
    out = np.zeros_like(vol, dtype=np.float32)
    out[brain] = (v - v.mean()) / (v.std() + 1e-8)
    return out


_MEMORY_CACHE: dict = {}


def task_slices(name: str, task: str, root=None, split: str = "train", image_size: int = 64,
                max_slices: Optional[int] = None, seed: int = 0, test_fraction: float = 0.3,
                split_seed: int = 0, partitioning: int = 2, cache_dir=None) -> SliceDataset:
    """Axial slices of ``task`` as a torch Dataset of (image 1 x H x W float32, label H x W int64).

    Tissue tasks (``CSF-T1`` ...) are binary (label == tissue); tumour tasks (``14-FLAIR``,
    ``MSD-T2`` ...) have 4 classes (background, NCR, ED, ET). Subjects are split into train
    and test by ``split_seed`` (never by slice); each volume is z-scored over its brain voxels;
    slices without brain are skipped; each volume is cropped to its brain's bounding box (over all slices), padded to a square and
    resized to ``image_size`` (labels by nearest neighbour): the whole brain is kept at any size.
    ``max_slices`` draws that many training slices with ``seed`` (the few-shot study).

    Preprocessed slices are cached in memory and as ``.npz`` under ``cache_dir`` (default
    ``$TRM_CACHE_DIR/slices``, by default ``<repo>/cache/slices``), keyed by the files' names, sizes and times.
    """
    root = Path(root) if root is not None else default_data_dir()
    ds = open_dataset(name, root, **({"partitioning": partitioning} if name == "fets2021" else {}))
    kind, key, mod = parse_task(name, task, ds)
    pool = ds.subjects_in(key) if name == "fets2021" else ds.subjects
    subjects = split_subjects(pool, split, test_fraction, split_seed)
    cache_key = hashlib.sha1(json.dumps([name, task.upper(), split, image_size, test_fraction, split_seed,
                                         partitioning, ds.signature(subjects), 2]).encode()).hexdigest()[:20]
    if cache_key not in _MEMORY_CACHE:
        cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "slices"
        cache_file = cache_dir / f"{name}-{task.upper()}-{split}-{cache_key}.npz"
        if cache_file.exists():
            with np.load(cache_file, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        else:
            arrays = _extract_slices(ds, subjects, kind, key, mod, image_size)
            if len(arrays["labels"]) == 0:
                raise DataError(f"task {task} ({split}) has no slices left after skipping slices without brain "
                                f"in {len(subjects)} subject(s) of {ds.folder}; check the images are skull-stripped")
            buf = _npz_bytes(arrays)
            atomic_write_bytes(cache_file, buf)
        _MEMORY_CACHE[cache_key] = arrays
    a = _MEMORY_CACHE[cache_key]
    idx = np.arange(len(a["labels"]))
    if max_slices is not None and split == "train":
        if int(max_slices) < 1:
            raise DataError(f"max_slices must be >= 1, got {max_slices}")
        if max_slices < len(idx):
            idx = np.sort(np.random.default_rng(seed).choice(len(idx), int(max_slices), replace=False))
    return SliceDataset(torch.from_numpy(a["images"][idx]).unsqueeze(1), torch.from_numpy(a["labels"][idx]).long(),
                        a["subjects"][idx].tolist(), a["slices"][idx].tolist(), num_classes_of(name), task.upper(),
                        name, split)


def _npz_bytes(arrays: dict) -> bytes:
    bio = io.BytesIO()
    np.savez_compressed(bio, **arrays)
    return bio.getvalue()


def _extract_slices(ds, subjects, kind, key, mod, image_size) -> dict:
    images, labels, subs, slices = [], [], [], []
    for s in subjects:
        vols = ds.load(s)
        if mod not in vols:
            raise DataError(f"subject {s} in {ds.folder} has no {mod} image; available: {sorted(k for k in vols if k != 'label')}")
        raw = vols[mod]
        img = zscore_brain(raw)
        lab = vols["label"]
        if kind == "tissue":
            lab = (lab == ISEG_LABELS[key]).astype(np.int64)
        else:
            lab = np.vectorize(FETS_TO_CLASS.get, otypes=[np.int64])(lab) if lab.size else lab
        keep = [z for z in range(raw.shape[2]) if (raw[:, :, z] != 0).any()]  # slices without brain are skipped
        if not keep:
            continue
        box = brain_box(raw != 0)
        images.append(fit_slices(np.moveaxis(img[:, :, keep], 2, 0), box, image_size, labels=False))
        labels.append(fit_slices(np.moveaxis(lab[:, :, keep], 2, 0), box, image_size, labels=True))
        subs += [str(s)] * len(keep)
        slices += keep
    n = len(subs)
    return {
        "images": np.concatenate(images).astype(np.float32) if n else np.zeros((0, image_size, image_size), np.float32),
        "labels": np.concatenate(labels).astype(np.int64) if n else np.zeros((0, image_size, image_size), np.int64),
        "subjects": np.array(subs, dtype=str),
        "slices": np.array(slices, dtype=np.int64),
    }
