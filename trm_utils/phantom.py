"""Procedural brain phantom written in the real datasets' on-disk layouts (DESIGN.md section 3).

The real iSeg-2019 and FeTS 2021 data cannot be shipped or downloaded here, so every tutorial
and test runs on this phantom, written to disk exactly as the real data lie and read back by
the same loaders (``trm_utils.data``). It is built for the phenomenon the paper studies:

* shared anatomy across domains (ellipsoidal brain, CSF rim, folded cortical ribbon, WM core,
  ventricles, deep grey nuclei) and domain-specific structure (an infant myelination pattern
  inside WM whose contrast differs between T1 and T2; tumours only in the FeTS-like set);
* modality contrasts that differ and partly invert (T1: WM > GM > CSF; T2: CSF > GM > WM;
  FLAIR: CSF dark, oedema bright) and infant-like low GM/WM contrast for the tissue set;
* per-centre (partition) bias field, noise, blur and intensity scaling;
* tumours with nested sub-regions (NCR inside ET inside ED), small satellites, and tumour size
  differing between partitions of one institution (13 large / 14 small, 17 large / 18 small,
  as the real partitioning_2 splits by tumour size).

Everything is drawn from ``numpy.random.default_rng(seed)`` streams, so the same seed and
parameters give the same volumes. Smoothing uses ``scipy.ndimage``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

#: iSeg-2019 label values
ISEG_LABELS = {"CSF": 10, "GM": 150, "WM": 250}
#: FeTS label values
FETS_LABELS = {"NCR": 1, "ED": 2, "ET": 4}

# tissue intensities (before per-centre scaling); infant iso-intense-like T1/T2
ISEG_CONTRAST = {
    "T1": {"CSF": 0.30, "GM": 0.55, "WM": 0.72, "myelin": 0.95},
    "T2": {"CSF": 1.00, "GM": 0.70, "WM": 0.52, "myelin": 0.38},
}
# adult contrast for the tumour set; tumour sub-regions last
FETS_CONTRAST = {
    "t1": {"CSF": 0.20, "GM": 0.60, "WM": 0.85, "ED": 0.52, "ET": 0.68, "NCR": 0.12},
    "t1ce": {"CSF": 0.22, "GM": 0.62, "WM": 0.84, "ED": 0.55, "ET": 1.45, "NCR": 0.15},
    "t2": {"CSF": 1.00, "GM": 0.66, "WM": 0.45, "ED": 0.90, "ET": 0.60, "NCR": 1.35},
    "flair": {"CSF": 0.10, "GM": 0.58, "WM": 0.48, "ED": 1.05, "ET": 0.72, "NCR": 0.25},
}
FETS_MODALITIES = ("t1", "t1ce", "t2", "flair")

#: partitions of the FeTS-like set: partitioning_2 id -> (partitioning_1 institution, tumour size)
FETS_PARTITIONS = {13: (13, "large"), 14: (13, "small"), 17: (16, "large"), 18: (16, "small"), 5: (5, "medium"),
                   9: (9, "medium")}
TUMOUR_RADIUS = {"large": (13.0, 16.0), "medium": (10.0, 13.0), "small": (7.0, 10.0)}


@dataclass(frozen=True)
class PhantomConfig:
    """What a phantom set is made of; recorded beside it and compared on reuse."""

    kind: str = "iseg2019"
    seed: int = 0
    shape: tuple = (64, 64, 20)
    n_subjects: int = 10  # iseg2019: subjects 1..n; fets2021: per partition
    partitions: tuple = tuple(sorted(FETS_PARTITIONS))
    noise: float = 1.0  # scales every centre's noise level (difficulty knob)
    version: int = 5
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"], d["partitions"] = list(self.shape), list(self.partitions)
        return d


def _smooth_noise(rng, shape, sigma):
    n = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return n / (n.std() + 1e-8)


def _ellipsoid(grid, centre, axes):
    return sum(((g - c) / a) ** 2 for g, c, a in zip(grid, centre, axes)) < 1.0


def brain_anatomy(rng, shape) -> dict:
    """Boolean masks of one subject's tissues: CSF, GM, WM, myelin (a WM sub-region), brain."""
    X, Y, Z = shape
    grid = np.meshgrid(np.linspace(-1, 1, X), np.linspace(-1, 1, Y), np.linspace(-1, 1, Z), indexing="ij")
    ax = np.array([0.80, 0.90, 1.05]) * (1 + 0.05 * rng.standard_normal(3))
    r = np.sqrt(sum((g / a) ** 2 for g, a in zip(grid, ax)))
    r = r + 0.035 * _smooth_noise(rng, shape, 4)  # subject-specific shape
    brain = r < 1.0
    fold = _smooth_noise(rng, shape, 1.3)  # gyral folding of the cortical ribbon
    gm_inner = 0.70 + 0.07 * fold
    csf = brain & (r >= 0.90 + 0.02 * fold)
    gm = brain & ~csf & (r >= gm_inner)
    wm = brain & ~csf & ~gm
    vs = 1 + 0.25 * rng.standard_normal()  # ventricle size varies by subject
    for side in (-1, 1):
        vent = _ellipsoid(grid, (0.13 * side, 0.05, 0.05), (0.07 * vs, 0.28 * vs, 0.35))
        nucleus = _ellipsoid(grid, (0.30 * side, -0.05, 0.0), (0.12, 0.14, 0.18))
        gm |= nucleus & wm
        wm &= ~nucleus
        csf |= vent & brain
        gm &= ~vent
        wm &= ~vent
    # infant myelination: a smooth central WM sub-region, bright in T1 and dark in T2
    myelin = wm & ((np.sqrt(grid[0] ** 2 + grid[1] ** 2) + 0.15 * _smooth_noise(rng, shape, 3)) < 0.38)
    return {"CSF": csf, "GM": gm, "WM": wm, "myelin": myelin, "brain": brain, "grid": grid}


def tumour_masks(rng, anatomy, size: str) -> dict:
    """Nested tumour sub-regions NCR inside ET inside ED, plus small satellite lesions."""
    shape = anatomy["brain"].shape
    wm_idx = np.argwhere(anatomy["WM"] | anatomy["GM"])
    centre = wm_idx[rng.integers(len(wm_idx))]
    idx = np.indices(shape).astype(float)
    lo, hi = TUMOUR_RADIUS[size]
    r_ed = rng.uniform(lo, hi)
    zscale = 1.6  # fewer axial slices than in-plane pixels: slices are thicker

    def blob(c, radius, rough):
        d = np.sqrt((idx[0] - c[0]) ** 2 + (idx[1] - c[1]) ** 2 + ((idx[2] - c[2]) * zscale) ** 2)
        return d < radius * (1 + rough * _smooth_noise(rng, shape, 2.0))

    ed = blob(centre, r_ed, 0.25) & anatomy["brain"]
    # strict nesting: each sub-region stays at least one voxel inside the one around it
    et_region = blob(centre, 0.72 * r_ed, 0.2) & ndimage.binary_erosion(ed)
    ncr = blob(centre, 0.45 * r_ed, 0.25) & ndimage.binary_erosion(et_region)
    for _ in range(rng.integers(0, 3)):  # discontinuous satellites near the main lesion
        off = rng.normal(0, r_ed * 0.9, 3) * np.array([1, 1, 1 / zscale])
        c = np.clip(centre + off, 0, np.array(shape) - 1)
        sat = blob(c, rng.uniform(1.5, 3.0), 0.2) & anatomy["brain"]
        ed |= sat
        if rng.random() < 0.5:
            et_region |= blob(c, 1.5, 0.1) & ndimage.binary_erosion(sat)
    return {"ED": ed & ~et_region, "ET": et_region & ~ncr, "NCR": ncr}


def centre_params(rng) -> dict:
    """Acquisition differences between centres (partitions)."""
    return {
        "scale": float(rng.uniform(0.75, 1.35)),
        "bias": float(rng.uniform(0.08, 0.35)),
        "noise": float(rng.uniform(0.03, 0.07)),
        "blur": float(rng.uniform(0.4, 1.1)),
        "gamma": float(rng.uniform(0.85, 1.2)),
    }


def render(rng, regions: dict, contrast: dict, centre: dict, brain: np.ndarray, noise_scale: float) -> np.ndarray:
    """Piecewise-constant contrast -> partial-volume blur -> bias field -> gamma -> Rician-like noise.

    Zero outside the brain (the real data are skull-stripped).
    """
    img = np.zeros(brain.shape, np.float64)
    for name, value in contrast.items():  # later regions overwrite earlier ones
        if name in regions:
            img[regions[name]] = value * (1 + 0.03 * rng.standard_normal())
    img = ndimage.gaussian_filter(img, centre["blur"])
    img *= np.exp(centre["bias"] * _smooth_noise(rng, brain.shape, 10))
    img = np.clip(img, 0, None) ** centre["gamma"]
    sigma = centre["noise"] * noise_scale
    img = np.sqrt((img + sigma * rng.standard_normal(img.shape)) ** 2 + (sigma * rng.standard_normal(img.shape)) ** 2)
    img = img * centre["scale"] * 1000.0
    img[~brain] = 0.0
    return img.astype(np.float32)


def iseg_subject(cfg: PhantomConfig, subject: int) -> dict:
    """One infant-like subject: T1, T2 and the label volume (0/10/150/250)."""
    rng = np.random.default_rng([cfg.seed, 2019, subject])
    anat = brain_anatomy(rng, cfg.shape)
    label = np.zeros(cfg.shape, np.uint8)
    for tissue, value in ISEG_LABELS.items():
        label[anat[tissue]] = value
    centre = centre_params(np.random.default_rng([cfg.seed, 2019, 0]))  # one site for iSeg
    centre["scale"] *= 1 + 0.1 * rng.standard_normal()
    out = {"label": label}
    for mod, contrast in ISEG_CONTRAST.items():
        out[mod] = render(rng, anat, contrast, centre, anat["brain"], cfg.noise)
    return out


def fets_subject(cfg: PhantomConfig, partition: int, index: int) -> dict:
    """One tumour subject of a partition: t1, t1ce, t2, flair and seg (0/1/2/4)."""
    rng = np.random.default_rng([cfg.seed, 2021, partition, index])
    anat = brain_anatomy(rng, cfg.shape)
    anat.pop("myelin")  # adult brains: no infant myelination pattern
    tum = tumour_masks(rng, anat, FETS_PARTITIONS.get(partition, (partition, "medium"))[1])
    for t in ("ED", "ET", "NCR"):
        for tissue in ("CSF", "GM", "WM"):
            anat[tissue] = anat[tissue] & ~tum[t]
    regions = {**anat, **tum}
    seg = np.zeros(cfg.shape, np.uint8)
    for t, value in FETS_LABELS.items():
        seg[tum[t]] = value
    centre = centre_params(np.random.default_rng([cfg.seed, 2021, partition]))
    out = {"seg": seg}
    for mod in FETS_MODALITIES:
        out[mod] = render(rng, regions, FETS_CONTRAST[mod], centre, anat["brain"], cfg.noise)
    return out
