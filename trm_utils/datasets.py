"""Readers for the real datasets' on-disk layouts (DESIGN.md section 3): iSeg-2019 (Analyze
pairs), FeTS 2021 (NIfTI + partition CSVs) and MSD Task01_BrainTumour (4D NIfTI).

``open_dataset(name, root)`` lists subjects and loads one subject's volumes; ``root`` is the
directory the dataset was extracted into or the dataset's own folder. ``parse_task`` checks a
task name (``GM-T2``, ``14-FLAIR``, ``MSD-FLAIR``). Every problem with the data on disk raises
``DataError`` (a ``ValueError``) with one line that names the file or value and what to do.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import re
import zlib
from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np

from .utils import REPO_ROOT, atomic_write_json, cache_root

DATASETS = ("iseg2019", "fets2021", "msd")
ISEG_DIR = "iSeg-2019-Training"
FETS_DIR = "MICCAI_FeTS2021_TrainingData"
MSD_DIR = "Task01_BrainTumour"
#: iSeg-2019 label values
ISEG_LABELS = {"CSF": 10, "GM": 150, "WM": 250}
ISEG_VALUES = (0, 10, 150, 250)
FETS_VALUES = (0, 1, 2, 4)
#: FeTS label value -> class index (background, NCR, ED, ET)
FETS_TO_CLASS = {0: 0, 1: 1, 2: 2, 4: 3}
#: MSD label -> FeTS convention (1 edema -> ED 2, 2 non-enhancing -> NCR 1, 3 enhancing -> ET 4)
MSD_TO_FETS = {0: 0, 1: 2, 2: 1, 3: 4}
MSD_CHANNELS = {"FLAIR": 0, "T1": 1, "T1CE": 2, "T2": 3}
#: The FeTS 2021 partitions the paper uses: ``partitioning_2.csv`` id -> ``partitioning_1.csv``
#: institution, as in the real files (13 and 14 both from institution 1, 17 and 18 from 6; the real
#: files hold 64 / 65 / 17 / 17 subjects in them). The phantom writes these; the task parser lists
#: them when no data are open.
FETS_PARTITIONS = {13: 1, 14: 1, 17: 6, 18: 6}
TUMOUR_CLASSES = ("background", "NCR", "ED", "ET")
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

def load_volume(path: Path, labels: bool = False) -> np.ndarray:
    """Load a NIfTI or Analyze volume as float32 or integer array, trailing singletons dropped.

    ``labels=True`` refuses a file whose header carries an intensity scale factor (``scl_slope``
    other than 1, or an offset): nibabel would apply it and the label values would change.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"missing file {path}; re-extract the dataset or re-run ./data_download.sh")
    try:
        img = nib.load(str(path))
        if labels:
            _check_unscaled(img, path)
        arr = np.asarray(img.dataobj)
    except DataError:
        raise
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




def _check_unscaled(img, path) -> None:
    slope = getattr(img.dataobj, "slope", 1.0)
    inter = getattr(img.dataobj, "inter", 0.0)
    slope = 1.0 if slope is None or not np.isfinite(slope) else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    if slope != 1.0 or inter != 0.0:
        raise DataError(
            f"{path} is a label file with scale factor {slope:g} and offset {inter:g} in its header, which would change "
            f"its label values; rewrite it unscaled, e.g. img = nibabel.load(path); nibabel.save("
            f"type(img)(numpy.asarray(img.dataobj.get_unscaled()), img.affine), path)")


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
                out[key] = _check_labels(load_volume(path, labels=True), self.label_values, path)
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
        # columns by name: FeTS 2021 writes Subject_ID,Partition_ID, FeTS 2022 the other way round
        header = [c.strip().lower() for c in rows[0]] if rows else []
        if "subject_id" not in header or "partition_id" not in header:
            raise DataError(f"{path} must have a header naming Subject_ID and Partition_ID, found {rows[0] if rows else 'an empty file'}")
        i_s, i_p = header.index("subject_id"), header.index("partition_id")
        out = {}
        for row in rows[1:]:
            if len(row) > max(i_s, i_p) and row[i_s].strip():
                try:
                    out[row[i_s].strip()] = int(row[i_p].strip())  # zero-padded ids ("01") are read as 1
                except ValueError:
                    raise DataError(f"{path}: partition id {row[i_p]!r} of {row[i_s]!r} is not an integer") from None
        return out

    @property
    def listed_partitions(self) -> list:
        """Every partition the CSV names, with or without subject folders on disk."""
        return sorted(set(self.partition_of.values()))

    @property
    def partitions(self) -> list:
        """The partitions with at least one subject folder on disk."""
        return sorted({p for s, p in self.partition_of.items() if s in self._files})

    def subjects_in(self, partition: int) -> list:
        subs = sorted(s for s, p in self.partition_of.items() if p == int(partition) and s in self._files)
        if not subs:
            raise DataError(self._no_data(partition))
        return subs

    def _no_data(self, partition: int) -> str:
        csvp = f"{self.folder}/partitioning_{self.partitioning}.csv"
        if int(partition) in self.listed_partitions:
            n = sum(1 for p in self.partition_of.values() if p == int(partition))
            return (f"partition {partition} is listed in {csvp} but none of its {n} subject folders are in {self.folder}; "
                    f"partitions with data: {self.partitions} (re-import the missing subjects or pick one of those)")
        return f"partition {partition} is not in {csvp}; partitions with data: {self.partitions}"


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
            if p.name.startswith("."):  # macOS AppleDouble files (._BRATS_001.nii.gz) beside the real ones
                continue
            self._files[p.name[: -len(".nii.gz")]] = {"image": p, "label": self.folder / "labelsTr" / p.name}

    def load(self, subject) -> dict:
        files = self.files(subject)
        img = load_volume(files["image"]).astype(np.float32)
        if img.ndim != 4 or img.shape[-1] != 4:
            raise DataError(f"{files['image']} has shape {img.shape}; MSD images are 4D with 4 channels last")
        lab = _check_labels(load_volume(files["label"], labels=True), tuple(MSD_TO_FETS), files["label"])
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
        valid = [f"{t}-{m}" for t in ISEG_LABELS for m in ISeg2019.modalities]
        if task.upper() in valid:
            tissue, mod = task.upper().split("-")
            return "tissue", tissue, mod
    elif name == "fets2021":
        parts = ds.partitions if ds is not None else sorted(FETS_PARTITIONS)
        valid = [f"{p}-{m}" for p in parts for m in FeTS2021.modalities]
        m = re.match(r"^(\d+)-(T1|T1CE|T2|FLAIR)$", task.upper())
        if m and (ds is None or int(m.group(1)) in parts):
            return "tumour", int(m.group(1)), m.group(2)
        if m and int(m.group(1)) in ds.listed_partitions:
            raise DataError(f"task {task}: {ds._no_data(int(m.group(1)))}")
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


# ----------------------------------------------------------------------------- content signature

def _file_sha1(path: Path, memo: dict) -> str:
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    if key not in memo:
        h = hashlib.sha1()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        memo[key] = h.hexdigest()
    return memo[key]


def dataset_files(ds) -> list:
    """The files a dataset's runs read: every subject's files (an Analyze image with its header)
    and the files at the top of the dataset's folder (FeTS's partition CSVs), sorted."""
    files = set()
    for s in ds.subjects:
        for p in ds.files(s).values():
            p = Path(p)
            files.add(p)
            for sib in (p.with_suffix(".hdr"), p.with_suffix(".img")) if p.suffix in (".hdr", ".img") else ():
                if sib.exists():
                    files.add(sib)
    files.update(p for p in Path(ds.folder).iterdir() if p.is_file() and not p.name.startswith("."))
    return sorted(files)


def content_signature(name: str, root, memo_dir=None) -> str:
    """A hash of dataset ``name``'s content under ``root``: each file of ``dataset_files`` named
    relative to the dataset's folder, with the SHA-1 of its bytes. The same data give the same
    signature wherever they lie and whenever they were written (a phantom regenerated in a new
    checkout, a copy on a cluster's scratch disk); a changed byte or an added subject changes it.
    It names the data of a sweep's units and of a carried source model (``sources.py``).

    Files are read once: their SHA-1s are kept in ``<memo_dir>/file_hashes.json`` (default
    ``cache_root()``), keyed by path, size and modification time."""
    memo_file = Path(memo_dir if memo_dir is not None else cache_root()) / "file_hashes.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    n_before = len(memo)
    ds = open_dataset(name, root)
    folder = Path(ds.folder)
    h = hashlib.sha1()
    for p in dataset_files(ds):
        h.update(f"{p.relative_to(folder).as_posix()}:{_file_sha1(p, memo)}\n".encode())
    if len(memo) != n_before:
        try:
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(memo_file, memo)
        except OSError:  # a read-only cache only costs the next look a re-read
            pass
    return h.hexdigest()[:16]
