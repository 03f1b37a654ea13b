"""Readers for iSeg-2019, FeTS 2021 and MSD Task01_BrainTumour, the phantom writer, and the
2D slice datasets the experiments train on (DESIGN.md section 3).

Entry points:

* ``make_phantom(kind, root, ...)`` writes the embedded phantom in the real layout of
  ``kind`` (``iseg2019``, ``fets2021``, or ``msd``) under ``root`` (once; reused after).
* ``open_dataset(name, root)`` lists subjects and loads one subject's volumes; ``root`` is the
  directory the dataset was extracted into or the dataset's own folder.
* ``task_slices(name, task, root, split, ...)`` gives a torch Dataset of axial slices
  (image 1 x H x W float32, label H x W int64) for a task name such as ``GM-T2``,
  ``14-FLAIR`` or ``MSD-FLAIR``.

Every problem with the data on disk raises ``DataError`` (a ``ValueError``) with one line that
names the file or value and what to do.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import re
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np
import torch

from . import phantom as ph
from .utils import REPO_ROOT, atomic_write_bytes, atomic_write_json, cache_root

DATASETS = ("iseg2019", "fets2021", "msd")
ISEG_DIR = "iSeg-2019-Training"
FETS_DIR = "MICCAI_FeTS2021_TrainingData"
MSD_DIR = "Task01_BrainTumour"
ISEG_VALUES = (0, 10, 150, 250)
FETS_VALUES = (0, 1, 2, 4)
#: FeTS label value -> class index (background, NCR, ED, ET)
FETS_TO_CLASS = {0: 0, 1: 1, 2: 2, 4: 3}
#: MSD label -> FeTS convention (1 edema -> ED 2, 2 non-enhancing -> NCR 1, 3 enhancing -> ET 4)
MSD_TO_FETS = {0: 0, 1: 2, 2: 1, 3: 4}
MSD_CHANNELS = {"FLAIR": 0, "T1": 1, "T1CE": 2, "T2": 3}
TUMOUR_CLASSES = ("background", "NCR", "ED", "ET")
PHANTOM_MANIFEST = ".phantom.json"
HOW_TO_GET = ("run ./data_download.sh --help to fetch or import the real data, "
              "or use dataset='phantom' (./data_download.sh phantom)")


class DataError(ValueError):
    """A problem with data on disk, in one line that names the file or value and the fix."""


def default_data_dir() -> Path:
    """``$TRM_DATA_DIR`` or ``<repo>/data``."""
    return Path(os.environ.get("TRM_DATA_DIR", REPO_ROOT / "data"))


# ---------------------------------------------------------------------------------------
# volume I/O
# ---------------------------------------------------------------------------------------

def load_volume(path: Path) -> np.ndarray:
    """Load a NIfTI or Analyze volume as float32 or integer array, trailing singletons dropped."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"missing file {path}; re-extract the dataset or re-run ./data_download.sh")
    try:
        arr = np.asarray(nib.load(str(path)).dataobj)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise DataError(f"{path} is corrupt or truncated ({type(exc).__name__}); re-download or re-import it") from exc
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise DataError(f"{path} contains NaN or Inf voxels; fix or exclude this subject")
    return arr


def _check_labels(arr: np.ndarray, expected, path) -> np.ndarray:
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(arr == np.round(arr)):
            raise DataError(f"{path} has non-integer label values; expected integers {sorted(expected)}")
    values = np.unique(arr).astype(int)
    bad = sorted(set(values.tolist()) - set(expected))
    if bad:
        raise DataError(f"{path} has unexpected label values {bad}; expected a subset of {sorted(expected)}")
    return arr.astype(np.int16)


def _check_shapes(volumes: dict, where: str) -> None:
    shapes = {k: v.shape[:3] for k, v in volumes.items()}
    if len(set(shapes.values())) > 1:
        raise DataError(f"subject {where}: image and label shapes differ {shapes}; re-export the subject with one grid")


# ---------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------

class _Dataset:
    name = ""
    modalities: tuple = ()
    label_values: tuple = ()

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @property
    def subjects(self) -> list:
        return sorted(self._files)

    def files(self, subject) -> dict:
        if subject not in self._files:
            raise DataError(f"unknown subject {subject!r} in {self.folder}; known: {self.subjects[:5]}...")
        return self._files[subject]

    def load(self, subject) -> dict:
        """Modality name -> float32 volume, plus ``label`` in the dataset's own values."""
        files = self.files(subject)
        out = {}
        for key, path in files.items():
            if key == "label":
                out[key] = _check_labels(load_volume(path), self.label_values, path)
            else:
                out[key] = load_volume(path).astype(np.float32)
        _check_shapes(out, f"{subject} in {self.folder}")
        return out

    def signature(self, subjects) -> str:
        """Hash of file names, sizes and times: a cache key that changes when data change."""
        h = hashlib.sha1(str(self.folder.resolve()).encode())
        for s in subjects:
            for p in sorted(self.files(s).values()):
                st = p.stat()
                h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def __repr__(self):
        return f"{type(self).__name__}({str(self.folder)!r}, {len(self.subjects)} subjects)"


def _find_folder(root: Path, dirname: str, probe) -> Path:
    root = Path(root)
    if not root.exists():
        raise DataError(f"data directory {root} does not exist; {HOW_TO_GET}")
    for cand in (root / dirname, root):
        if cand.is_dir() and probe(cand):
            return cand
    raise DataError(f"no {dirname} dataset found in {root}; {HOW_TO_GET}")


class ISeg2019(_Dataset):
    """iSeg-2019 training set: Analyze pairs ``subject-N-{T1,T2,label}.{hdr,img}`` (names
    matched case-insensitively); labels 0, 10 CSF, 150 GM, 250 WM."""

    name = "iseg2019"
    modalities = ("T1", "T2")
    label_values = ISEG_VALUES
    _pattern = re.compile(r"^subject-(\d+)-(t1|t2|label)\.hdr$", re.IGNORECASE)

    def __init__(self, root):
        super().__init__(_find_folder(root, ISEG_DIR, lambda d: any(self._pattern.match(p.name) for p in d.iterdir())))
        found: dict = {}
        for p in self.folder.iterdir():
            m = self._pattern.match(p.name)
            if m:
                key = m.group(2).upper() if m.group(2).lower() != "label" else "label"
                found.setdefault(int(m.group(1)), {})[key] = p
        self._files = {}
        for sid, files in found.items():
            missing = [k for k in (*self.modalities, "label") if k not in files]
            if missing:
                raise DataError(f"subject-{sid} in {self.folder} is missing its {', '.join(missing)} file(s) "
                                f"(expected subject-{sid}-{missing[0]}.hdr/.img); re-import the dataset")
            for p in files.values():
                if not p.with_suffix(".img").exists() and not p.with_suffix(".IMG").exists():
                    raise DataError(f"{p} has no .img beside it; Analyze volumes are .hdr/.img pairs, re-import them")
            self._files[sid] = files


class FeTS2021(_Dataset):
    """FeTS 2021 training set: ``FeTS21_Training_NNN/FeTS21_Training_NNN_{flair,t1,t1ce,t2,seg}.nii.gz``
    with ``partitioning_1.csv`` (institutions) and ``partitioning_2.csv`` (22 partitions)."""

    name = "fets2021"
    modalities = ("T1", "T1CE", "T2", "FLAIR")
    label_values = FETS_VALUES
    _pattern = re.compile(r"^FeTS21_Training_(\d+)$", re.IGNORECASE)

    def __init__(self, root, partitioning: int = 2):
        super().__init__(_find_folder(root, FETS_DIR, lambda d: any(self._pattern.match(p.name) for p in d.iterdir())))
        self._files = {}
        for d in self.folder.iterdir():
            if d.is_dir() and self._pattern.match(d.name):
                files = {}
                for mod in (*self.modalities, "label"):
                    suffix = "seg" if mod == "label" else mod.lower()
                    files[mod] = d / f"{d.name}_{suffix}.nii.gz"
                self._files[d.name] = files
        self.partitioning = int(partitioning)
        self.partition_of = self._read_partitions(self.partitioning)

    def _read_partitions(self, which: int) -> dict:
        path = self.folder / f"partitioning_{which}.csv"
        if not path.exists():
            raise DataError(f"missing {path}; it ships with the FeTS 2021 training data, re-import the dataset")
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
        header = [c.strip() for c in rows[0]] if rows else []
        if header[:2] != ["Subject_ID", "Partition_ID"]:
            raise DataError(f"{path} must start with the header Subject_ID,Partition_ID, found {header}")
        out = {}
        for row in rows[1:]:
            if len(row) >= 2 and row[0].strip():
                try:
                    out[row[0].strip()] = int(row[1].strip())
                except ValueError:
                    raise DataError(f"{path}: partition id {row[1]!r} of {row[0]!r} is not an integer") from None
        return out

    @property
    def partitions(self) -> list:
        return sorted(set(self.partition_of.values()))

    def subjects_in(self, partition: int) -> list:
        subs = sorted(s for s, p in self.partition_of.items() if p == int(partition) and s in self._files)
        if not subs:
            raise DataError(f"partition {partition} has no subjects in {self.folder}/partitioning_{self.partitioning}.csv "
                            f"(or their folders are missing); valid partitions: {self.partitions}")
        return subs


class MSDBrainTumour(_Dataset):
    """MSD Task01_BrainTumour: 4D images (channels last: FLAIR, T1w, T1gd, T2w) in ``imagesTr``,
    labels in ``labelsTr`` remapped to the FeTS convention (1 -> ED 2, 2 -> NCR 1, 3 -> ET 4)."""

    name = "msd"
    modalities = tuple(MSD_CHANNELS)
    label_values = FETS_VALUES

    def __init__(self, root):
        super().__init__(_find_folder(root, MSD_DIR, lambda d: (d / "imagesTr").is_dir()))
        if not (self.folder / "dataset.json").exists():
            raise DataError(f"missing {self.folder / 'dataset.json'}; re-extract Task01_BrainTumour.tar")
        self._files = {}
        for p in sorted((self.folder / "imagesTr").glob("*.nii.gz")):
            if p.name.startswith("."):
                continue
            self._files[p.name[: -len(".nii.gz")]] = {"image": p, "label": self.folder / "labelsTr" / p.name}

    def load(self, subject) -> dict:
        files = self.files(subject)
        img = load_volume(files["image"]).astype(np.float32)
        if img.ndim != 4 or img.shape[-1] != 4:
            raise DataError(f"{files['image']} has shape {img.shape}; MSD images are 4D with 4 channels last")
        lab = _check_labels(load_volume(files["label"]), tuple(MSD_TO_FETS), files["label"])
        remapped = np.zeros_like(lab)
        for src, dst in MSD_TO_FETS.items():
            remapped[lab == src] = dst
        out = {mod: img[..., c] for mod, c in MSD_CHANNELS.items()}
        out["label"] = remapped
        _check_shapes(out, f"{subject} in {self.folder}")
        return out


def open_dataset(name: str, root=None, **kwargs) -> _Dataset:
    """Open ``name`` (iseg2019, fets2021, msd) under ``root`` (default ``default_data_dir()``)."""
    root = Path(root) if root is not None else default_data_dir()
    classes = {"iseg2019": ISeg2019, "fets2021": FeTS2021, "msd": MSDBrainTumour}
    if name not in classes:
        raise DataError(f"unknown dataset {name!r}; choose one of {list(classes)}")
    return classes[name](root, **kwargs)


# ---------------------------------------------------------------------------------------
# tasks and slices
# ---------------------------------------------------------------------------------------

def parse_task(name: str, task: str, ds: Optional[_Dataset] = None):
    """Check a task name and return (kind, key, modality). Unknown names list the valid ones."""
    if name == "iseg2019":
        valid = [f"{t}-{m}" for t in ph.ISEG_LABELS for m in ISeg2019.modalities]
        if task.upper() in valid:
            tissue, mod = task.upper().split("-")
            return "tissue", tissue, mod
    elif name == "fets2021":
        parts = ds.partitions if ds is not None else sorted(ph.FETS_PARTITIONS)
        valid = [f"{p}-{m}" for p in parts for m in FeTS2021.modalities]
        m = re.match(r"^(\d+)-(T1|T1CE|T2|FLAIR)$", task.upper())
        if m and (ds is None or int(m.group(1)) in parts):
            return "tumour", int(m.group(1)), m.group(2)
    elif name == "msd":
        valid = [f"MSD-{m}" for m in MSD_CHANNELS]
        t = task.upper().replace("T1GD", "T1CE")
        if t in valid:
            return "tumour", None, t.split("-")[1]
    else:
        raise DataError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")
    raise DataError(f"unknown task {task!r} for {name}; valid tasks: {', '.join(valid)}")


def num_classes_of(name: str) -> int:
    return 2 if name == "iseg2019" else 4


def class_names(name: str) -> tuple:
    return ("background", "foreground") if name == "iseg2019" else TUMOUR_CLASSES


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


def _center_fit(arr: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop or zero-pad the first two axes to size x size."""
    out = arr
    for axis in (0, 1):
        n = out.shape[axis]
        if n > size:
            s = (n - size) // 2
            out = np.take(out, range(s, s + size), axis=axis)
        elif n < size:
            pad = [(0, 0)] * out.ndim
            pad[axis] = ((size - n) // 2, size - n - (size - n) // 2)
            out = np.pad(out, pad)
    return out


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
    slices without brain are skipped; slices are centre-cropped/padded to ``image_size``.
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
                                         partitioning, ds.signature(subjects), 1]).encode()).hexdigest()[:20]
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
    import io

    bio = io.BytesIO()
    np.savez_compressed(bio, **arrays)
    return bio.getvalue()


def _extract_slices(ds, subjects, kind, key, mod, image_size) -> dict:
    images, labels, subs, slices = [], [], [], []
    for s in subjects:
        vols = ds.load(s)
        if mod not in vols:
            raise DataError(f"subject {s} in {ds.folder} has no {mod} image; available: {sorted(k for k in vols if k != 'label')}")
        img = zscore_brain(vols[mod])
        lab = vols["label"]
        if kind == "tissue":
            lab = (lab == ph.ISEG_LABELS[key]).astype(np.int64)
        else:
            lab = np.vectorize(FETS_TO_CLASS.get, otypes=[np.int64])(lab) if lab.size else lab
        for z in range(img.shape[2]):
            if not (vols[mod][:, :, z] != 0).any():
                continue
            images.append(_center_fit(img[:, :, z], image_size))
            labels.append(_center_fit(lab[:, :, z], image_size))
            subs.append(str(s))
            slices.append(z)
    n = len(labels)
    return {
        "images": np.stack(images).astype(np.float32) if n else np.zeros((0, image_size, image_size), np.float32),
        "labels": np.stack(labels).astype(np.int64) if n else np.zeros((0, image_size, image_size), np.int64),
        "subjects": np.array(subs, dtype=str),
        "slices": np.array(slices, dtype=np.int64),
    }


# ---------------------------------------------------------------------------------------
# phantom writer
# ---------------------------------------------------------------------------------------

PRESETS = {
    # what a CPU affords: small volumes, enough subjects for a subject-level split
    "tutorial": {"shape": (64, 64, 20), "n_subjects": 10},
    # closer to the real sizes (still far smaller than 144x192x256 / 240x240x155)
    "paper": {"shape": (128, 128, 48), "n_subjects": 10},
    # tiny, for tests only
    "smoke": {"shape": (32, 32, 8), "n_subjects": 4},
}


def make_phantom(kind: str, root=None, seed: int = 0, preset: str = "tutorial", shape=None, n_subjects=None,
                 noise: float = 1.0, force: bool = False) -> Path:
    """Write the phantom of ``kind`` (iseg2019, fets2021, msd) under ``root`` in the real layout.

    Reuses a phantom already there when its recorded parameters match; a folder that is not
    a phantom (real data) is never touched. Written to a temporary folder and renamed.
    Returns the dataset folder.
    """
    if kind not in DATASETS:
        raise DataError(f"unknown phantom kind {kind!r}; choose one of {list(DATASETS)}")
    if preset not in PRESETS:
        raise DataError(f"unknown preset {preset!r}; choose one of {list(PRESETS)}")
    p = PRESETS[preset]
    cfg = ph.PhantomConfig(kind=kind, seed=int(seed), shape=tuple(shape or p["shape"]),
                           n_subjects=int(n_subjects or p["n_subjects"]), noise=float(noise))
    root = Path(root) if root is not None else default_data_dir() / "phantom"
    dest = root / {"iseg2019": ISEG_DIR, "fets2021": FETS_DIR, "msd": MSD_DIR}[kind]
    manifest = dest / PHANTOM_MANIFEST
    if dest.exists():
        if not manifest.exists():
            raise DataError(f"{dest} exists and is not a phantom (no {PHANTOM_MANIFEST}); "
                            "it is left untouched: choose another root for the phantom")
        if not force and json.loads(manifest.read_text()) == cfg.to_dict():
            return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=root))
    try:
        {"iseg2019": _write_iseg, "fets2021": _write_fets, "msd": _write_msd}[kind](cfg, tmp)
        atomic_write_json(tmp / PHANTOM_MANIFEST, cfg.to_dict())
        if dest.exists():  # an outdated phantom of ours: swap it out, then delete it
            old = root / f".{dest.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(dest, old)
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _write_iseg(cfg, folder: Path):
    aff = np.eye(4)
    for sid in range(1, cfg.n_subjects + 1):
        vols = ph.iseg_subject(cfg, sid)
        for key, arr in vols.items():
            name = "label" if key == "label" else key
            # the real volumes load with a trailing singleton axis; so do these
            nib.save(nib.AnalyzeImage(arr[..., None], aff), str(folder / f"subject-{sid}-{name}.hdr"))


def _fets_subjects(cfg):
    n = 0
    for part in cfg.partitions:
        for i in range(cfg.n_subjects):
            n += 1
            yield n, part, i


def _write_fets(cfg, folder: Path):
    aff = np.eye(4)
    rows1, rows2 = [], []
    for n, part, i in _fets_subjects(cfg):
        sid = f"FeTS21_Training_{n:03d}"
        d = folder / sid
        d.mkdir()
        for key, arr in ph.fets_subject(cfg, part, i).items():
            nib.save(nib.Nifti1Image(arr, aff), str(d / f"{sid}_{key}.nii.gz"))
        rows1.append(f"{sid},{ph.FETS_PARTITIONS.get(part, (part,))[0]}")
        rows2.append(f"{sid},{part}")
    for which, rows in ((1, rows1), (2, rows2)):
        # CRLF endings, as the real CSVs may have
        (folder / f"partitioning_{which}.csv").write_text("Subject_ID,Partition_ID\r\n" + "\r\n".join(rows) + "\r\n")


def _write_msd(cfg, folder: Path):
    """MSD layout from the tumour phantom: 4D channels-last images, MSD label values."""
    aff = np.eye(4)
    (folder / "imagesTr").mkdir()
    (folder / "labelsTr").mkdir()
    fets_to_msd = {v: k for k, v in MSD_TO_FETS.items()}
    training = []
    for n, part, i in _fets_subjects(cfg):
        vols = ph.fets_subject(cfg, part, i)
        img = np.stack([vols[m] for m in ("flair", "t1", "t1ce", "t2")], axis=-1)
        lab = np.zeros_like(vols["seg"])
        for f, m in fets_to_msd.items():
            lab[vols["seg"] == f] = m
        name = f"BRATS_{n:03d}.nii.gz"
        nib.save(nib.Nifti1Image(img, aff), str(folder / "imagesTr" / name))
        nib.save(nib.Nifti1Image(lab, aff), str(folder / "labelsTr" / name))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {"name": "BRATS", "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
            "numTraining": len(training), "training": training, "test": []}
    (folder / "dataset.json").write_text(json.dumps(meta, indent=1))


# ---------------------------------------------------------------------------------------
# verification (used by data_download.sh)
# ---------------------------------------------------------------------------------------

def verify(name: str, root) -> str:
    """Check a dataset's layout: subjects present, one subject loads, shapes and labels valid.

    Returns a one-line summary; raises DataError on the first problem.
    """
    ds = open_dataset(name, root)
    if not ds.subjects:
        raise DataError(f"no subjects found in {ds.folder}; {HOW_TO_GET}")
    vols = ds.load(ds.subjects[0])
    shape = next(iter(vols.values())).shape
    extra = f", partitions {ds.partitions}" if isinstance(ds, FeTS2021) else ""
    labels = sorted(np.unique(vols["label"]).tolist())
    return (f"{name}: {len(ds.subjects)} subjects in {ds.folder}; first subject {ds.subjects[0]} has volumes "
            f"{sorted(vols)} of shape {shape}, label values {labels}{extra}")


def main(argv=None) -> int:
    import argparse
    import sys

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
