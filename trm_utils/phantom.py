"""The embedded brain phantom, on real anatomy, written in the real datasets' layouts (DESIGN.md §3).

The real iSeg-2019 and FeTS 2021 data cannot be shipped or downloaded here, so every tutorial
and test runs on this phantom, written to disk exactly as the real data lie and read back by
the same loaders (``trm_utils.datasets``).

**What is real and what is synthetic.**

* Real: the anatomy. Every subject is a deformation of the ICBM 2009a nonlinear symmetric
  template (T1 and grey/white-matter probability maps at 1 mm, skull-stripped), the average of
  152 adult brains that nilearn ships inside its package (read offline; see
  ``reference/ICBM152_2009_NOTICE.txt`` for its copyright notice). Its cortical folding,
  ventricles and deep grey nuclei are those of a real (average) brain.
* Synthetic: everything else. The subjects' variation (a smooth random elastic field, a small
  affine with a left-right flip, and a ventricle enlargement or shrinkage, all drawn from the
  seed), the modality contrasts (synthesised from the fuzzy tissue maps with partial volume
  kept: infant-like low grey/white contrast with a T1/T2 inversion and a myelination pattern for
  the iSeg-like set; adult T1, T1ce, T2 and FLAIR for the FeTS-like set, whose T1 blends in the
  template's own T1 texture), the acquisition differences between centres (bias field, noise,
  blur, gamma, intensity scale), and the tumours (grown inside the anatomy: NCR inside ET inside
  ED, small satellites). The template is an adult brain: the infant contrast is painted on adult
  anatomy.

The tumour contrasts follow real scans (DESIGN.md section 3): T2 shows the oedema and the tumour
core bright (CSF brightest), FLAIR the oedema bright and CSF dark, T1 the core dark, T1ce the
enhancing rim bright (``tests/test_data.py`` measures each on a rendered subject).

The FeTS-like partitions mirror the real ``partitioning_2.csv``: partitions 13 and 14 both come
from institution 1 of ``partitioning_1.csv`` and 17 and 18 both from institution 6, in the real
files' proportions (64 / 65 / 17 / 17 subjects; the tutorial preset writes 32 / 32 / 9 / 9, so
every tumour target has at least 3 test subjects); ids are zero-padded, rows end in CRLF and the
file has no final newline.
Partitions of one institution share its acquisition settings. The real files do not say how an
institution was split, so the phantom draws every subject's tumour size from one distribution.

Everything is drawn from ``numpy.random.default_rng`` streams keyed by the seed, so the same
seed and configuration give the same volumes.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from .datasets import FETS_DIR, FETS_PARTITIONS, ISEG_DIR, ISEG_LABELS, MSD_DIR, MSD_TO_FETS, DataError
from .utils import REPO_ROOT, atomic_write_json

#: FeTS label values
FETS_LABELS = {"NCR": 1, "ED": 2, "ET": 4}

# tissue intensities (before per-centre effects); infant iso-intense-like T1/T2: low GM/WM
# contrast, inverted between T1 and T2, and a myelinated central WM region that stands out
ISEG_CONTRAST = {
    "T1": {"CSF": 0.30, "GM": 0.55, "WM": 0.68, "myelin": 0.95},
    "T2": {"CSF": 1.00, "GM": 0.70, "WM": 0.56, "myelin": 0.36},
}
# adult contrast for the tumour set; tumour sub-regions replace the tissue they grow in
FETS_CONTRAST = {
    "t1": {"CSF": 0.20, "GM": 0.60, "WM": 0.85, "ED": 0.52, "ET": 0.68, "NCR": 0.12},
    "t1ce": {"CSF": 0.22, "GM": 0.62, "WM": 0.84, "ED": 0.55, "ET": 1.45, "NCR": 0.15},
    # T2: oedema and the tumour core bright (as on real T2), CSF brightest, the enhancing rim between
    "t2": {"CSF": 1.40, "GM": 0.66, "WM": 0.45, "ED": 1.00, "ET": 0.75, "NCR": 1.65},
    "flair": {"CSF": 0.10, "GM": 0.58, "WM": 0.48, "ED": 1.05, "ET": 0.72, "NCR": 0.25},
}
FETS_MODALITIES = ("t1", "t1ce", "t2", "flair")

#: the oedema radius range (mm) of a main lesion, the same for every partition (see above); a
#: 20-34 mm radius is a 34-165 cm3 lesion, around the whole-tumour volumes of BraTS-like data
TUMOUR_RADIUS_MM = (20.0, 34.0)

PHANTOM_MANIFEST = ".phantom.json"
NOTICE = REPO_ROOT / "reference" / "ICBM152_2009_NOTICE.txt"

#: Phantom sizes. ``voxel_mm``: the template is block-averaged to this resolution;
#: ``n_subjects``: iSeg-like subjects; ``fets_subjects``: subjects per partition (13/14 much
#: larger than 17/18, as in the real files, scaled down); ``min_brain_fraction``: axial slices
#: whose brain area is below this fraction of the largest are dropped (the skull's cap and the
#: cerebellum's tip, a few pixels of brain that teach nothing).
PRESETS = {
    # what 2 CPU cores afford: 3 mm voxels, about 45 slices with brain per subject
    "tutorial": {"voxel_mm": 3, "n_subjects": 10, "fets_subjects": {13: 32, 14: 32, 17: 9, 18: 9},
                 "min_brain_fraction": 0.25},
    # for a GPU: 1.5 mm voxels (resized to the paper preset's 192/240 px slices)
    "paper": {"voxel_mm": 1.5, "n_subjects": 10, "fets_subjects": {13: 32, 14: 33, 17: 9, 18: 9},
              "min_brain_fraction": 0.1},
    # tiny, for tests only
    "smoke": {"voxel_mm": 7, "n_subjects": 4, "fets_subjects": {13: 3, 14: 3, 17: 2, 18: 2},
              "min_brain_fraction": 0.25},
}


class PhantomError(DataError):
    """A problem with a phantom request, in one line that names the value and the fix."""


@dataclass(frozen=True)
class PhantomConfig:
    """What a phantom set is made of; recorded beside it (``.phantom.json``) and compared on reuse.

    ``voxel_mm`` is the working resolution (the 1 mm template block-averaged by an integer
    factor when it is one, else resampled linearly); ``elastic_mm`` / ``elastic_smooth_mm`` the
    amplitude and smoothness of the random elastic field; ``rotation_deg``, ``scale`` and
    ``flip`` the affine (rotation about each axis up to that many degrees, a scale per axis in
    1 +- scale, a left-right flip with probability ``flip``); ``ventricle`` the relative change
    of ventricle size (up to +-).
    """

    kind: str = "iseg2019"
    seed: int = 0
    voxel_mm: float = 3.0
    n_subjects: int = 10
    fets_subjects: tuple = ((13, 32), (14, 32), (17, 9), (18, 9))
    min_brain_fraction: float = 0.25
    noise: float = 1.0  # scales every centre's noise level (difficulty knob)
    elastic_mm: float = 3.0
    elastic_smooth_mm: float = 12.0
    rotation_deg: float = 6.0
    scale: float = 0.06
    flip: float = 0.5
    ventricle: float = 0.35
    tumour_radius_mm: tuple = TUMOUR_RADIUS_MM
    tumour_variation: float = 0.0  # log-sd of each subject's tumour intensities, and of a texture inside them
    version: int = 7
    extra: dict = field(default_factory=dict)

    @property
    def partitions(self) -> tuple:
        return tuple(p for p, _ in self.fets_subjects)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fets_subjects"] = [list(p) for p in self.fets_subjects]
        d["tumour_radius_mm"] = list(self.tumour_radius_mm)
        # the contrast tables too: a phantom written with other contrasts is rewritten, not reused
        d["contrast"] = {"iseg": ISEG_CONTRAST, "fets": FETS_CONTRAST}
        return d


# ---------------------------------------------------------------------------------------
# the template
# ---------------------------------------------------------------------------------------

def _template_files() -> dict:
    try:
        import nilearn  # here, not at the top: a missing nilearn is one clear PhantomError, not an ImportError
    except ImportError as exc:  # pragma: no cover - a dependency
        raise PhantomError("the phantom needs nilearn (it ships the MNI152 template): pip install nilearn") from exc
    d = Path(nilearn.__file__).parent / "datasets" / "data"
    files = {k: d / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise PhantomError(f"nilearn {nilearn.__version__} does not ship {missing[0]}; reinstall nilearn (>= 0.9)")
    return files


@functools.lru_cache(maxsize=4)
def template(voxel_mm: float = 3.0) -> dict:
    """The ICBM152 2009 template at ``voxel_mm``: ``t1`` (0-1), ``gm``, ``wm``, ``csf``
    probabilities and the ``brain`` probability (the T1 above 0.2, as nilearn's brain mask, with
    the enclosed ventricles filled in),
    cropped to the brain's bounding box with a 2-voxel margin. Read from nilearn's package."""
    files = _template_files()
    vols = {k: np.asarray(nib.load(str(p)).dataobj, dtype=np.float32) / 255.0 for k, p in files.items()}
    # nilearn's brain mask (T1 above 0.2) with its holes filled: the ventricles are brain (CSF)
    vols["brain"] = ndimage.binary_fill_holes(vols["t1"] > 0.2).astype(np.float32)
    f = float(voxel_mm)
    if f <= 0:
        raise PhantomError(f"voxel_mm must be > 0, got {voxel_mm}")
    out = {}
    for k, v in vols.items():
        if abs(f - round(f)) < 1e-9 and round(f) >= 1:  # block average: the area-correct downsampling
            n = int(round(f))
            s = [(d // n) * n for d in v.shape]
            v = v[: s[0], : s[1], : s[2]].reshape(s[0] // n, n, s[1] // n, n, s[2] // n, n).mean(axis=(1, 3, 5))
        else:
            v = ndimage.zoom(ndimage.gaussian_filter(v, max(0.0, (f - 1) / 2)), 1 / f, order=1)
        out[k] = v.astype(np.float32)
    brain = out["brain"]
    out["gm"], out["wm"] = out["gm"] * (brain > 0), out["wm"] * (brain > 0)
    out["csf"] = np.clip(brain - out["gm"] - out["wm"], 0, 1)
    idx = np.argwhere(brain > 0.5)
    lo, hi = np.maximum(idx.min(0) - 2, 0), np.minimum(idx.max(0) + 3, brain.shape)
    return {k: v[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].copy() for k, v in out.items()}


# ---------------------------------------------------------------------------------------
# one subject's anatomy
# ---------------------------------------------------------------------------------------

def _smooth_noise(rng, shape, sigma):
    n = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return n / (n.std() + 1e-8)


def _rotation(rng, max_deg):
    a = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    cx, cy, cz = np.cos(a)
    sx, sy, sz = np.sin(a)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def subject_anatomy(cfg: PhantomConfig, rng) -> dict:
    """One subject: the template deformed by a random affine, elastic field and ventricle change.

    Returns float maps ``t1``, ``gm``, ``wm``, ``csf``, ``brain`` (probabilities, partial volume
    kept), the boolean ``mask`` (brain > 0.5) and ``tissue``: the argmax label inside the mask
    (0 background, 1 CSF, 2 GM, 3 WM). Every map goes through the same deformation.
    """
    tpl = template(cfg.voxel_mm)
    shape = tpl["brain"].shape
    centre = (np.array(shape) - 1) / 2.0
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1).T - centre  # output voxel offsets
    # affine: output -> template coordinates (inverse mapping, as map_coordinates wants it)
    rot = _rotation(rng, cfg.rotation_deg)
    scale = 1 + rng.uniform(-cfg.scale, cfg.scale, 3)
    flip = np.diag([-1.0 if rng.random() < cfg.flip else 1.0, 1.0, 1.0])  # axis 0 is left-right
    A = flip @ rot @ np.diag(1 / scale)
    src = grid @ A.T
    # elastic field, smooth at ``elastic_smooth_mm``
    sig = cfg.elastic_smooth_mm / cfg.voxel_mm
    amp = cfg.elastic_mm / cfg.voxel_mm
    for ax in range(3):
        src[:, ax] += amp * _smooth_noise(rng, shape, sig).reshape(-1)
    # ventricles: a radial push around the lateral ventricles' centre (CSF-rich deep region)
    deep = tpl["csf"] * ndimage.binary_erosion(tpl["brain"] > 0.5, iterations=max(1, int(20 / cfg.voxel_mm)))
    vc = (np.argwhere(deep > 0.5).mean(0) if (deep > 0.5).any() else centre) - centre
    k = rng.uniform(-cfg.ventricle, cfg.ventricle)
    r0 = 18.0 / cfg.voxel_mm
    d = src - vc
    src -= k * d * np.exp(-(d**2).sum(1, keepdims=True) / (2 * r0**2))  # k > 0 samples nearer the centre: larger
    coords = (src + centre).T.reshape(3, *shape)
    out = {k_: ndimage.map_coordinates(tpl[k_], coords, order=1, mode="constant", cval=0.0).astype(np.float32)
           for k_ in ("t1", "gm", "wm", "csf", "brain")}
    mask = out["brain"] > 0.5
    probs = np.stack([out["csf"], out["gm"], out["wm"]])
    tissue = np.where(mask, probs.argmax(0) + 1, 0).astype(np.uint8)
    for k_ in ("t1", "gm", "wm", "csf"):
        out[k_] = out[k_] * mask
    out["mask"], out["tissue"] = mask, tissue
    return out


def keep_slices(cfg: PhantomConfig, mask: np.ndarray) -> slice:
    """The axial slab whose slices hold at least ``min_brain_fraction`` of the largest brain area."""
    area = mask.sum(axis=(0, 1))
    keep = np.nonzero(area >= cfg.min_brain_fraction * area.max())[0]
    return slice(int(keep[0]), int(keep[-1]) + 1)


def tumour_masks(rng, anat: dict, voxel_mm: float, radius_mm: tuple = TUMOUR_RADIUS_MM) -> dict:
    """Nested tumour sub-regions NCR inside ET inside ED, plus small satellite lesions, grown
    inside the brain from a centre in grey or white matter away from the brain's edge."""
    mask = anat["mask"]
    shape = mask.shape
    inner = ndimage.binary_erosion(mask, iterations=max(1, int(10 / voxel_mm))) & (anat["tissue"] >= 2)
    cand = np.argwhere(inner if inner.any() else mask)
    centre = cand[rng.integers(len(cand))]
    idx = np.indices(shape).astype(np.float32)
    r_ed = rng.uniform(*radius_mm) / voxel_mm
    rough_sigma = max(1.0, 4.0 / voxel_mm)

    def blob(c, radius, rough):
        d = np.sqrt(sum((idx[a] - c[a]) ** 2 for a in range(3)))
        return d < radius * (1 + rough * _smooth_noise(rng, shape, rough_sigma))

    ed = blob(centre, r_ed, 0.25) & mask
    # strict nesting: each sub-region stays at least one voxel inside the one around it
    et_region = blob(centre, 0.62 * r_ed, 0.2) & ndimage.binary_erosion(ed)
    ncr = blob(centre, 0.38 * r_ed, 0.25) & ndimage.binary_erosion(et_region)
    for _ in range(rng.integers(0, 3)):  # discontinuous satellites near the main lesion
        c = np.clip(centre + rng.normal(0, r_ed * 0.9, 3), 0, np.array(shape) - 1)
        sat = blob(c, rng.uniform(1.5, 3.0) * 3.0 / voxel_mm, 0.2) & mask
        ed |= sat
        if rng.random() < 0.5:
            et_region |= blob(c, 1.5 * 3.0 / voxel_mm, 0.1) & ndimage.binary_erosion(sat)
    return {"ED": ed & ~et_region, "ET": et_region & ~ncr, "NCR": ncr}


def myelin_map(rng, anat: dict, voxel_mm: float) -> np.ndarray:
    """Infant myelination: a smooth central white-matter region (bright in T1, dark in T2)."""
    shape = anat["mask"].shape
    idx = np.indices(shape).astype(np.float32)
    c = np.argwhere(anat["mask"]).mean(0)
    r = np.sqrt(((idx[0] - c[0]) / 0.8) ** 2 + (idx[1] - c[1]) ** 2 + ((idx[2] - c[2]) * 1.3) ** 2) * voxel_mm
    r = r + 6.0 * _smooth_noise(rng, shape, 6.0 / voxel_mm)
    return anat["wm"] * (1 / (1 + np.exp((r - 30.0) / 4.0)))


# ---------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------

def centre_params(rng) -> dict:
    """Acquisition differences between centres (institutions)."""
    return {
        "scale": float(rng.uniform(0.75, 1.35)),
        "bias": float(rng.uniform(0.08, 0.30)),
        "noise": float(rng.uniform(0.025, 0.06)),
        "blur": float(rng.uniform(0.3, 0.9)),
        "gamma": float(rng.uniform(0.85, 1.2)),
    }


def render(rng, fuzzy: dict, contrast: dict, centre: dict, mask: np.ndarray, noise_scale: float, base=None) -> np.ndarray:
    """Partial-volume mixture of tissue intensities -> blur -> bias field -> gamma -> Rician noise.

    ``fuzzy`` maps region name -> fraction of each voxel (summing to about 1 in the brain); a
    voxel's intensity is the fraction-weighted mean of the regions' values. ``base`` (optional)
    is added as is (a texture, e.g. the template's T1). Zero outside the brain (the real data
    are skull-stripped).
    """
    img = np.zeros(mask.shape, np.float64) if base is None else base.astype(np.float64)
    for name, value in contrast.items():
        if name in fuzzy:
            img += fuzzy[name] * value * (1 + 0.03 * rng.standard_normal())
    img = ndimage.gaussian_filter(img, centre["blur"])
    img *= np.exp(centre["bias"] * _smooth_noise(rng, mask.shape, max(2.0, mask.shape[0] / 6)))
    img = np.clip(img, 0, None) ** centre["gamma"]
    sigma = centre["noise"] * noise_scale
    img = np.sqrt((img + sigma * rng.standard_normal(img.shape)) ** 2 + (sigma * rng.standard_normal(img.shape)) ** 2)
    img = img * centre["scale"] * 1000.0
    img[~mask] = 0.0
    return img.astype(np.float32)


def _crop_z(cfg, vols: dict, mask) -> dict:
    sl = keep_slices(cfg, mask)
    return {k: v[:, :, sl] for k, v in vols.items()}


def iseg_subject(cfg: PhantomConfig, subject: int) -> dict:
    """One infant-like subject: T1, T2 and the label volume (0/10/150/250)."""
    rng = np.random.default_rng([cfg.seed, 2019, subject])
    anat = subject_anatomy(cfg, rng)
    label = np.zeros(anat["tissue"].shape, np.uint8)
    for i, (tissue, value) in enumerate(ISEG_LABELS.items(), start=1):
        label[anat["tissue"] == i] = value
    my = myelin_map(rng, anat, cfg.voxel_mm)
    fuzzy = {"CSF": anat["csf"], "GM": anat["gm"], "WM": anat["wm"] - my, "myelin": my}
    centre = centre_params(np.random.default_rng([cfg.seed, 2019, 0]))  # one site for iSeg
    centre["scale"] *= 1 + 0.1 * rng.standard_normal()
    out = {"label": label}
    for mod, contrast in ISEG_CONTRAST.items():
        out[mod] = render(rng, fuzzy, contrast, centre, anat["mask"], cfg.noise)
    return _crop_z(cfg, out, anat["mask"])


def fets_subject(cfg: PhantomConfig, partition: int, index: int) -> dict:
    """One tumour subject of a partition: t1, t1ce, t2, flair and seg (0/1/2/4)."""
    rng = np.random.default_rng([cfg.seed, 2021, partition, index])
    anat = subject_anatomy(cfg, rng)
    tum = tumour_masks(rng, anat, cfg.voxel_mm, tuple(cfg.tumour_radius_mm))
    lesion = (tum["ED"] | tum["ET"] | tum["NCR"]).astype(np.float32)
    keep = 1 - lesion
    fuzzy = {"CSF": anat["csf"] * keep, "GM": anat["gm"] * keep, "WM": anat["wm"] * keep,
             **{t: ndimage.gaussian_filter(tum[t].astype(np.float32), 0.5) * anat["mask"] for t in tum}}
    seg = np.zeros(anat["tissue"].shape, np.uint8)
    for t, value in FETS_LABELS.items():
        seg[tum[t]] = value
    institution = FETS_PARTITIONS.get(partition, partition)
    centre = centre_params(np.random.default_rng([cfg.seed, 2021, institution]))  # shared by an institution's partitions
    centre["scale"] *= 1 + 0.08 * rng.standard_normal()
    out = {"seg": seg}
    jitter = {mod: {t: 1.0 for t in tum} for mod in FETS_MODALITIES}
    if cfg.tumour_variation:
        # real tumours differ from patient to patient and are heterogeneous inside: each subject's sub-region
        # intensities vary (log-normal, per modality), and a smooth texture modulates them (a stream of its
        # own, so the rest of the subject is the same whatever the variation)
        vr = np.random.default_rng([cfg.seed, 2021, partition, index, 7])
        v = float(cfg.tumour_variation)
        jitter = {mod: {t: float(np.exp(v * vr.standard_normal())) for t in tum} for mod in FETS_MODALITIES}
        texture = np.exp(v * _smooth_noise(vr, seg.shape, max(1.0, 4.0 / cfg.voxel_mm)))
        for t in tum:
            fuzzy[t] = fuzzy[t] * texture
    for mod in FETS_MODALITIES:
        # the adult T1 takes half its tissue contrast from the template's own T1 texture
        base = 0.5 * anat["t1"] * keep if mod == "t1" else None
        contrast = {k: (0.5 * v if mod == "t1" and k in ("CSF", "GM", "WM") else v * jitter[mod].get(k, 1.0))
                    for k, v in FETS_CONTRAST[mod].items()}
        out[mod] = render(rng, fuzzy, contrast, centre, anat["mask"], cfg.noise, base=base)
    return _crop_z(cfg, out, anat["mask"])


# ---------------------------------------------------------------------------------------
# writing the phantom in the real layouts
# ---------------------------------------------------------------------------------------

def make_config(kind: str, seed: int = 0, preset: str = "tutorial", noise: float = 1.0, **overrides) -> PhantomConfig:
    if preset not in PRESETS:
        raise PhantomError(f"unknown phantom preset {preset!r}; choose one of {list(PRESETS)}")
    p = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    fs = p["fets_subjects"]
    fs = tuple(sorted((int(k), int(v)) for k, v in (fs.items() if isinstance(fs, dict) else fs)))
    return PhantomConfig(kind=kind, seed=int(seed), voxel_mm=float(p["voxel_mm"]), n_subjects=int(p["n_subjects"]),
                         fets_subjects=fs, min_brain_fraction=float(p["min_brain_fraction"]), noise=float(noise),
                         tumour_variation=float(p.get("tumour_variation", 0.0)))


def make_phantom(kind: str, root, seed: int = 0, preset: str = "tutorial", noise: float = 1.0, force: bool = False,
                 **overrides) -> Path:
    """Write the phantom of ``kind`` (iseg2019, fets2021, msd) under ``root`` in the real layout.

    ``overrides`` replace the preset's ``voxel_mm``, ``n_subjects``, ``fets_subjects`` or
    ``min_brain_fraction``. Reuses a phantom already there when its recorded configuration
    matches; a folder that is not a phantom (real data) is never touched. Written to a
    temporary folder and renamed. Returns the dataset folder.
    """
    writers = {"iseg2019": (ISEG_DIR, _write_iseg), "fets2021": (FETS_DIR, _write_fets), "msd": (MSD_DIR, _write_msd)}
    if kind not in writers:
        raise PhantomError(f"unknown phantom kind {kind!r}; choose one of {list(writers)}")
    cfg = make_config(kind, seed, preset, noise, **overrides)
    root = Path(root)
    dirname, writer = writers[kind]
    dest = root / dirname
    manifest = dest / PHANTOM_MANIFEST
    if dest.exists():
        if not manifest.exists():
            raise PhantomError(f"{dest} exists and is not a phantom (no {PHANTOM_MANIFEST}); "
                               "it is left untouched: choose another root for the phantom")
        if not force and json.loads(manifest.read_text()) == cfg.to_dict():
            return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=root))
    try:
        writer(cfg, tmp)
        if NOTICE.exists():  # the template's licence asks for its notice in every copy
            shutil.copyfile(NOTICE, tmp / "ICBM152_2009_NOTICE.txt")
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


def _affine(cfg) -> np.ndarray:
    return np.diag([cfg.voxel_mm, cfg.voxel_mm, cfg.voxel_mm, 1.0])


def _write_iseg(cfg, folder: Path):
    aff = _affine(cfg)
    for sid in range(1, cfg.n_subjects + 1):
        for key, arr in iseg_subject(cfg, sid).items():
            # the real volumes load with a trailing singleton axis; so do these
            nib.save(nib.AnalyzeImage(arr[..., None], aff), str(folder / f"subject-{sid}-{key}.hdr"))


def fets_subject_ids(cfg) -> list:
    """(number, partition, index within partition); numbers skip some values, as the real ids do."""
    rng = np.random.default_rng([cfg.seed, 2021, 0, 0])
    out, n = [], 0
    for part, count in cfg.fets_subjects:
        for i in range(count):
            n += 1 + int(rng.random() < 0.15)  # gaps in the numbering
            out.append((n, part, i))
    return out


def _csv(rows) -> str:
    # the real files: CRLF endings, no final newline
    return "\r\n".join(["Subject_ID,Partition_ID", *rows])


def _write_fets(cfg, folder: Path):
    aff = _affine(cfg)
    rows1, rows2 = [], []
    for n, part, i in fets_subject_ids(cfg):
        sid = f"FeTS21_Training_{n:03d}"
        d = folder / sid
        d.mkdir()
        for key, arr in fets_subject(cfg, part, i).items():
            nib.save(nib.Nifti1Image(arr, aff), str(d / f"{sid}_{key}.nii.gz"))
        rows1.append(f"{sid},{FETS_PARTITIONS.get(part, part):02d}")
        rows2.append(f"{sid},{part:02d}")
    (folder / "partitioning_1.csv").write_bytes(_csv(rows1).encode())
    (folder / "partitioning_2.csv").write_bytes(_csv(rows2).encode())


def _write_msd(cfg, folder: Path):
    """MSD layout from the tumour phantom: 4D channels-last images, MSD label values."""
    aff = _affine(cfg)
    (folder / "imagesTr").mkdir()
    (folder / "labelsTr").mkdir()
    fets_to_msd = {v: k for k, v in MSD_TO_FETS.items()}
    training = []
    for n, part, i in fets_subject_ids(cfg):
        vols = fets_subject(cfg, part, i)
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
