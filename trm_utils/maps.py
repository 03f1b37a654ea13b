"""Transferability maps (eq. 4) in both readings, hardness (eq. 5) and risk (eq. 6): every way
the kit computes a map from a source model over a target set.

The paper defines "T(h, w), the transferability score at a pixel coordinate (h, w)" (eq. 4) with
no image index; its equations were lost in the text we work from, so two readings exist and
the kit implements both (DESIGN.md section 2):

* **dataset** (the default): one map per (source, target) pair over the whole target training
  set. For every patch position (patch size k; k = 1 is one pixel coordinate) it is the LEEP
  (eq. 2) of the pixels of all N target images inside that patch, with P(y|z) estimated from
  those pixels alone::

      T(a, b) = 1 / (N k^2) sum_i sum_{p in patch(a, b)} log sum_z P_ab(y_{i,p} | z) theta(x_i)_{p,z}

  This is how the same group computes maps in the code it released for reference [22]
  (``tanyang1231/SegmentationTransferability``,
  ``compute_transferability_map/pixelwise_transferability.py``: non-overlapping 4 x 4 patches,
  a local P(y|z) per patch; it uses ``exp(-T)`` as a loss weight), and what eq. 4's notation
  says. A patch whose pixels all carry one label has T = 0. Every image's loss uses this one map,
  brought to pixel resolution by repeating each patch's value over its k x k pixels.
* **image** (the variant ``map=image``): a map per image,
  T_i(p) = log sum_z P(y_{i,p} | z) theta(x_i)_{p,z}, with one P(y|z) over the whole target set
  (the per-pixel terms of pixel-LEEP, eq. 3). One unofficial 3D re-implementation reads the
  paper this way. On the tutorial grid it is almost a function of the pair (target label,
  source prediction) (``variance_explained``), so its risk map behaves close to a class weight.

When H or W is not a multiple of ``patch`` the last row / column of patches is smaller (it
covers the remaining pixels), so every pixel gets a value; [22]'s code drops those pixels
(its map has floor(H / k) rows). Where H and W are multiples of k the two agree.

Both maps are computed in two streamed passes (P(y|z) must come from the whole set before any
pixel is scored): memory independent of the number of images.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from .leep import LOG_EPS, PixelLEEP, _check_pixel_inputs, _to_tensor, _tmap
from .predict import infer_num_classes, predict_probs, stack_data
from .utils import get_device

#: The two readings of eq. 4; the first is the default.
READINGS = ("dataset", "image")


def check_reading(reading: str) -> str:
    if reading not in READINGS:
        raise ValueError(f"unknown map reading {reading!r}; choose 'dataset' (one map per source-target pair, "
                         f"the default) or 'image' (a map per image)")
    return reading


def _check_patch(patch) -> int:
    if isinstance(patch, bool) or int(patch) != patch or int(patch) < 1:
        raise ValueError(f"patch must be a positive integer (1 = one pixel coordinate), got {patch!r}")
    return int(patch)


# ----------------------------------------------------------------------------- per-image reading

def transferability_map(probs, labels, conditional) -> torch.Tensor:
    """Per-image transferability, eq. (4) read per image (variant ``map=image``):
    T_i(p) = log sum_z P(y_{i,p} | z) theta(x_i)_{p,z}.

    Args:
        probs: B x C_s x H x W source probabilities.
        labels: B x H x W target labels.
        conditional: C_t x C_s matrix P(y|z), estimated over the whole target training set
            (``PixelLEEP.conditional()``).

    Returns:
        B x H x W tensor in [log(1e-12), 0]; higher = easier to transfer.
    """
    conditional = _to_tensor(conditional, "conditional")
    if conditional.ndim != 2:
        raise ValueError(f"conditional must be C_t x C_s, got shape {tuple(conditional.shape)}")
    probs, labels, _ = _check_pixel_inputs(probs, labels, None, conditional.shape[1], conditional.shape[0])
    return _tmap(probs, labels, conditional)


# ----------------------------------------------------------------------------- dataset reading

def _patches(x: torch.Tensor, k: int) -> torch.Tensor:
    """B x C x H x W -> B x C x A x k x B' x k (zero-padded to multiples of k)."""
    b, c, h, w = x.shape
    ph, pw = (-h) % k, (-w) % k
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    return x.reshape(b, c, (h + ph) // k, k, (w + pw) // k, k)


class PatchLEEP:
    """Streaming dataset-level transferability map (eq. 4, dataset reading) in two passes.

    Pass 1: ``update(probs, labels)`` for every batch accumulates, per patch, the joint
    P_ab(y, z) of the patch's pixels over all images. Pass 2: ``score_update(probs, labels)``
    accumulates, per patch, the sum of log sum_z P_ab(y|z) theta_z and the pixel count. ``map()``
    is their ratio: the LEEP of each patch (eq. 2), an ceil(H/k) x ceil(W/k) tensor. State: a
    patches x C_t x C_s float64 array and two per-patch sums, whatever the number of images.
    """

    def __init__(self, num_source_classes: int, num_target_classes: int, patch: int = 1):
        if int(num_source_classes) < 1 or int(num_target_classes) < 1:
            raise ValueError(f"class counts must be >= 1, got C_s={num_source_classes}, C_t={num_target_classes}")
        self.num_source_classes = int(num_source_classes)
        self.num_target_classes = int(num_target_classes)
        self.patch = _check_patch(patch)
        self.reset()

    def reset(self) -> None:
        self._joint: Optional[torch.Tensor] = None  # A x B x C_t x C_s, un-normalised
        self._cond: Optional[torch.Tensor] = None
        self._log_sum: Optional[torch.Tensor] = None
        self._count: Optional[torch.Tensor] = None
        self._size = None

    def _inputs(self, probs, labels, mask):
        probs, labels, mask = _check_pixel_inputs(probs, labels, mask, self.num_source_classes, self.num_target_classes)
        if self._size is None:
            self._size = tuple(labels.shape[1:])
        elif tuple(labels.shape[1:]) != self._size:
            raise ValueError(f"images of size {tuple(labels.shape[1:])} after images of size {self._size}; "
                             "a dataset-level map needs every image at one size")
        k = self.patch
        onehot = F.one_hot(labels, self.num_target_classes).permute(0, 3, 1, 2).to(probs.dtype)
        valid = torch.ones_like(labels[:, None], dtype=probs.dtype) if mask is None else mask[:, None].to(probs.dtype)
        return _patches(probs, k), _patches(onehot, k), _patches(valid, k), labels

    @torch.no_grad()
    def update(self, probs, labels, mask=None) -> "PatchLEEP":
        """Pass 1: add a batch to every patch's joint P_ab(y, z) (``mask``: B x H x W, the pixels that count)."""
        if self._cond is not None:
            raise RuntimeError("update() after conditional()/score_update(): call reset() to start a new map")
        p, onehot, valid, _ = self._inputs(probs, labels, mask)
        # padded pixels have an all-zero one-hot, so they add nothing
        joint = torch.einsum("nzaubv,nyaubv->abyz", p, onehot * valid).to(torch.float64)
        self._joint = joint if self._joint is None else self._joint + joint.to(self._joint.device)
        return self

    def conditional(self) -> torch.Tensor:
        """P_ab(y | z) per patch (A x B x C_t x C_s); a source label z that no pixel of the patch
        predicts (P_ab(z) = 0) gets 0, as in [22]'s code (its column never contributes)."""
        if self._joint is None:
            raise RuntimeError("no pixels seen yet: call update() over the target set first")
        if self._cond is None:
            pz = self._joint.sum(dim=2, keepdim=True)
            self._cond = torch.where(pz > 0, self._joint / pz.clamp_min(torch.finfo(pz.dtype).tiny),
                                     torch.zeros_like(self._joint))
        return self._cond

    @torch.no_grad()
    def score_update(self, probs, labels, mask=None) -> "PatchLEEP":
        """Pass 2: add a batch's log-likelihoods under each patch's own P_ab(y|z)."""
        p, _, valid, labels = self._inputs(probs, labels, mask)
        cond = self.conditional().to(device=p.device, dtype=p.dtype)
        eep = torch.einsum("abyz,nzaubv->nyaubv", cond, p)  # expected empirical predictor, every y
        lab = _patches(labels[:, None].to(torch.long), self.patch)  # padded pixels get label 0 and weight 0
        picked = eep.gather(1, lab).squeeze(1)
        logs = torch.log(picked.clamp_min(LOG_EPS)) * valid[:, 0]
        s = logs.sum(dim=(0, 2, 4)).to(torch.float64)
        n = valid[:, 0].sum(dim=(0, 2, 4)).to(torch.float64)
        self._log_sum = s if self._log_sum is None else self._log_sum + s.to(self._log_sum.device)
        self._count = n if self._count is None else self._count + n.to(self._count.device)
        return self

    def map(self) -> torch.Tensor:
        """The dataset-level map T (ceil(H/k) x ceil(W/k), float32): each patch's LEEP, <= 0 (0 for a
        patch whose pixels are all masked out: nothing is known to be hard there)."""
        if self._count is None:
            raise RuntimeError("map() needs a second pass: after update() over every batch, call score_update() "
                               "over them again (each patch's P(y|z) must come from the whole set first)")
        return (self._log_sum / self._count.clamp_min(1)).float()

    def score(self) -> float:
        """Mean log-likelihood over all pixels under the patches' own conditionals (the dataset map's
        global score; equals the mean of ``map()`` when every patch holds N k^2 pixels)."""
        self.map()
        return float(self._log_sum.sum() / self._count.sum())


def dataset_transferability_map(probs, labels, patch: int = 1, num_target_classes: Optional[int] = None) -> torch.Tensor:
    """The dataset-level transferability map of eq. (4), in one call.

    Args:
        probs: N x C_s x H x W source probabilities (softmax), every target training image.
        labels: N x H x W target labels.
        patch: the patch size k (1: one entry per pixel coordinate; [22]'s code uses 4).
        num_target_classes: C_t; defaults to max(label) + 1.

    Returns:
        ceil(H/k) x ceil(W/k) tensor whose every entry is the LEEP (eq. 2) of all pixels of all N
        images inside that patch, with that patch's own P(y|z); <= 0, and 0 where every pixel of
        the patch carries one label. The last row / column of patches is smaller when H or W is
        not a multiple of k (module docstring). Equals ``PatchLEEP`` streamed over any split into
        batches (tested).
    """
    probs_t, labels_t, _ = _check_pixel_inputs(probs, labels, None)
    c_t = int(num_target_classes) if num_target_classes is not None else int(labels_t.max()) + 1
    est = PatchLEEP(probs_t.shape[1], c_t, patch)
    est.update(probs_t, labels_t)
    est.score_update(probs_t, labels_t)
    return est.map()


def to_pixels(tmap: torch.Tensor, patch: int, size) -> torch.Tensor:
    """A patch-level map (A x B) at pixel resolution (H x W): each patch's value repeated over its
    k x k pixels (nearest neighbour), cropped to ``size`` = (H, W)."""
    k = _check_patch(patch)
    h, w = int(size[0]), int(size[1])
    if tmap.shape[0] * k < h or tmap.shape[1] * k < w:
        raise ValueError(f"a {tuple(tmap.shape)} map with patch {k} does not cover {h} x {w} pixels")
    return tmap.repeat_interleave(k, 0).repeat_interleave(k, 1)[:h, :w]


# ----------------------------------------------------------------------------- hardness and risk

def _check_map(tmap, name: str) -> torch.Tensor:
    tmap = torch.as_tensor(tmap)
    if tmap.ndim not in (2, 3):
        raise ValueError(f"{name} must be H x W (a dataset-level map) or B x H x W (per-image maps), "
                         f"got shape {tuple(tmap.shape)}")
    if not torch.is_floating_point(tmap):
        tmap = tmap.float()
    if not torch.isfinite(tmap).all():
        raise ValueError(f"{name} contains NaN or Inf; transferability maps are finite (log is clamped at 1e-12)")
    return tmap


def hardness(tmap) -> torch.Tensor:
    """Transfer hardness, eq. (5): min-max normalisation, inverted so 1 = hardest.

        H(p) = (max T - T(p)) / (max T - min T)

    A dataset-level map (H x W, or its A x B patches) is normalised over its entries; per-image
    maps (B x H x W) each over their own pixels. The least transferable entry gets 1, the most
    transferable 0. A constant map (nothing is harder than anything else) gives H = 0 everywhere.
    """
    tmap = _check_map(tmap, "tmap")
    t3 = tmap[None] if tmap.ndim == 2 else tmap
    flat = t3.reshape(t3.shape[0], -1)
    tmax = flat.max(dim=1).values[:, None, None]
    tmin = flat.min(dim=1).values[:, None, None]
    span = tmax - tmin
    h = torch.where(span > 0, (tmax - t3) / span.clamp_min(torch.finfo(t3.dtype).tiny), torch.zeros_like(t3))
    return h[0] if tmap.ndim == 2 else h


def risk_from_hardness(hard, base: float = 10.0) -> torch.Tensor:
    """Exponential scaling, eq. (6): R = base ** H, so R lies in [1, base]."""
    base = float(base)
    if not base >= 1.0:
        raise ValueError(f"base must be >= 1 so that harder pixels weigh more, got {base}")
    hard = torch.as_tensor(hard)
    return torch.pow(torch.as_tensor(base, dtype=hard.dtype, device=hard.device), hard)


def risk_map(tmap, base: float = 10.0) -> torch.Tensor:
    """Transfer risk map, eq. (6): R = base ** H with H from eq. (5); in [1, base].

    ``base`` = 10 is our reading of the paper's "exponential scaling with a base of 10".
    """
    return risk_from_hardness(hardness(tmap), base)


def risk_share(hard, above: float = 5.0, base: float = 10.0) -> float:
    """How concentrated a risk map is: the share of its entries whose transfer risk (eq. 6,
    R = base ** H with H from eq. 5) exceeds ``above`` (5 of the range [1, 10]: H > log10 5 = 0.70).
    For the dataset-level map (H x W) each pixel position counts once. The sweep report asks whether
    it predicts TRM's gain over vanilla."""
    return float((risk_from_hardness(torch.as_tensor(hard), base) > float(above)).float().mean())


# ----------------------------------------------------------------------------- from a model

class LossMaps:
    """The per-pixel maps a loss reads for one reading: T (eq. 4) and H (eq. 5) of every
    training slice. The dataset reading holds one H x W map shared by every slice (never copied
    N times); the image reading one map per slice (N x H x W)."""

    def __init__(self, reading: str, tmap: torch.Tensor, hard: torch.Tensor, n: int):
        self.reading = check_reading(reading)
        self.tmap, self.hardness, self.n = tmap, hard, int(n)
        want = 2 if reading == "dataset" else 3
        if tmap.ndim != want or hard.shape != tmap.shape or (want == 3 and tmap.shape[0] != n):
            raise ValueError(f"{reading} maps of shape {tuple(tmap.shape)} / {tuple(hard.shape)} do not fit {n} slices")

    @property
    def size(self) -> tuple:
        return tuple(self.tmap.shape[-2:])

    def to(self, device) -> "LossMaps":
        return LossMaps(self.reading, self.tmap.to(device), self.hardness.to(device), self.n)

    def batch(self, idx: torch.Tensor) -> tuple:
        """(T, H) of the slices ``idx``, each len(idx) x H x W."""
        if self.reading == "dataset":
            b = len(idx)
            return self.tmap.expand(b, *self.size), self.hardness.expand(b, *self.size)
        idx = idx.to(self.tmap.device)
        return self.tmap.index_select(0, idx), self.hardness.index_select(0, idx)


@torch.no_grad()
def transferability_maps(model, data, readings: Iterable[str] = READINGS, patch: int = 1,
                         num_target_classes: Optional[int] = None, batch_size: int = 32, device="auto",
                         mask=None) -> dict:
    """The source ``model``'s transferability maps on the target ``data``, in every reading asked.

    Two streamed passes of the model over the slices, whatever the readings: pass 1 accumulates
    the global P(y|z) (pixel-LEEP, eq. 3) and each patch's P_ab(y|z); pass 2 scores every pixel.
    ``mask`` (N x H x W bool, optional) restricts the pixels that count towards every P(y|z) and
    score (the maps still give every pixel a value).

    Returns:
        ``{"score": pixel-LEEP (eq. 3, float), "patch": k, "n": N, "size": (H, W), "conditional":
        C_t x C_s}`` and, per reading asked, ``"dataset"``: ``{"map": ceil(H/k) x ceil(W/k),
        "tmap": H x W (pixel resolution), "hardness": H x W, "score": float}`` and ``"image"``:
        ``{"tmap": N x H x W, "hardness": N x H x W (each image normalised on its own)}``, all on
        the CPU. ``loss_maps(result, reading)`` turns one reading into what a loss reads.
    """
    readings = tuple(dict.fromkeys(check_reading(r) for r in readings))
    k = _check_patch(patch)
    device = get_device(device)
    images, labels = stack_data(data)
    c_t = infer_num_classes(data, labels, num_target_classes)
    model = model.to(device)
    glob = patches = None
    for sl, probs in predict_probs(model, images, batch_size, device):
        y, mk = labels[sl].to(device), None if mask is None else mask[sl].to(device)
        glob = glob or PixelLEEP(probs.shape[1], c_t)
        glob.update(probs, y, mk)
        if "dataset" in readings:
            patches = patches or PatchLEEP(probs.shape[1], c_t, k)
            patches.update(probs, y, mk)
    tmaps = torch.empty(labels.shape, dtype=torch.float32)
    for sl, probs in predict_probs(model, images, batch_size, device):
        y, mk = labels[sl].to(device), None if mask is None else mask[sl].to(device)
        tmaps[sl] = glob.score_update(probs, y, mk).cpu()
        if patches is not None:
            patches.score_update(probs, y, mk)
    size = tuple(labels.shape[1:])
    out = {"score": glob.score(), "patch": k, "n": int(labels.shape[0]), "size": size,
           "conditional": glob.conditional().cpu()}
    if "image" in readings:
        out["image"] = {"tmap": tmaps, "hardness": hardness(tmaps)}
    if patches is not None:
        m = patches.map().cpu()
        pix = to_pixels(m, k, size)
        out["dataset"] = {"map": m, "tmap": pix, "hardness": hardness(pix), "score": patches.score()}
    return out


def loss_maps(maps: dict, reading: str) -> LossMaps:
    """One reading of ``transferability_maps``'s result, as the losses read it."""
    check_reading(reading)
    if reading not in maps:
        raise ValueError(f"the maps were computed for {[r for r in READINGS if r in maps]}, not {reading!r}; "
                         f"compute them with readings=({reading!r},)")
    r = maps[reading]
    return LossMaps(reading, r["tmap"], r["hardness"], maps["n"])


def prepare_loss_maps(maps, model, images, labels, c_t, reading, patch, device) -> LossMaps:
    """``maps`` as a ``LossMaps`` of ``reading`` on the device: given (a ``LossMaps`` or
    ``maps.transferability_maps``'s result) or, when None, computed with ``model`` as the source."""
    if maps is None:
        maps = transferability_maps(model, (images, labels), (reading,), patch, c_t, device=device)
    if not isinstance(maps, LossMaps):
        maps = loss_maps(maps, reading)
    if maps.reading != reading:
        raise ValueError(f"maps of the {maps.reading!r} reading given for a run that reads {reading!r}")
    want = tuple(labels.shape[1:]) if reading == "dataset" else tuple(labels.shape)
    if tuple(maps.tmap.shape) != want:
        raise ValueError(f"{reading} maps have shape {tuple(maps.tmap.shape)} but the training labels "
                         f"{tuple(labels.shape)}; compute them on the same slices")
    return maps.to(device)


# ----------------------------------------------------------------------------- analysis

def variance_explained(values, *factors, mask=None) -> float:
    """Share of the variance of ``values`` explained by the groups the ``factors`` form (eta^2):
    1 - (within-group sum of squares) / (total sum of squares), over the pixels of ``mask``.

    ``values`` and each factor (integer codes) have one shape; e.g. a map's values over the brain
    pixels of every training slice, with the factors (target label, source prediction). 1: the
    map is a function of the factors; 0: the factors say nothing about it.
    """
    v = torch.as_tensor(values, dtype=torch.float64)
    if not factors:
        raise ValueError("give at least one factor (integer codes of the same shape as values)")
    code = torch.zeros(v.shape, dtype=torch.long)
    for f in factors:
        f = torch.as_tensor(f).long()
        if f.shape != v.shape:
            raise ValueError(f"factor of shape {tuple(f.shape)} does not match values {tuple(v.shape)}")
        if f.numel() and f.min() < 0:
            raise ValueError("factors must be non-negative integer codes")
        code = code * (int(f.max()) + 1 if f.numel() else 1) + f
    if mask is not None:
        mask = torch.as_tensor(mask, dtype=torch.bool)
        v, code = v[mask], code[mask]
    v, code = v.reshape(-1), code.reshape(-1)
    if v.numel() < 2:
        raise ValueError("variance_explained needs at least 2 values")
    total = float(((v - v.mean()) ** 2).sum())
    if total == 0:
        return float("nan")
    _, inv = torch.unique(code, return_inverse=True)
    sums = torch.zeros(int(inv.max()) + 1, dtype=torch.float64).index_add_(0, inv, v)
    counts = torch.bincount(inv).double()
    within = float(((v - (sums / counts)[inv]) ** 2).sum())
    return 1.0 - within / total
