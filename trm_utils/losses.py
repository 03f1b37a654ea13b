"""Risk-map-weighted cross-entropy (eq. 7) and its baselines as one mechanism.

Every method is a pixel weight w and a normaliser (DESIGN.md section 2). T is a transferability
map (eq. 4), H its hardness (eq. 5); both come from ``maps`` in either reading (the dataset-level
map by default, ``@map=image`` for the per-image variant):

| method        | pixel weight w                  | normaliser                    |
|---------------|---------------------------------|-------------------------------|
| vanilla       | 1                               | all pixels (mean)             |
| class_weight  | inverse class frequency [29]    | sum of weights (PyTorch mean) |
| trs_map       | exp(-T), dataset-level map [22] | all pixels                    |
| trm (ours)    | base ** H  (eq. 6)              | foreground pixels (eq. 7)     |
| fg_only       | 1                               | foreground pixels (ablation)  |
| exp_only      | base ** H                       | all pixels (ablation)         |

Eq. (7):  L = sum_i sum_p R_i(p) CE(f(x_i)_p, y_{i,p}) / #{(i,p): y_{i,p} != 0}.
A batch with no foreground is normalised by its pixel count instead (finite, same scale as
the mean).

``trs_map`` is reference [22]'s map used as its code uses it: ``compute_pixel_transferability(...,
is_weight_map=True)`` in ``tanyang1231/SegmentationTransferability`` returns exp(-LEEP) of each
patch, with no normalisation. [22]'s repository has no fine-tuning or loss code, so the loss form
(the weight times the per-pixel cross-entropy, averaged over all pixels) is our reading. On a
dataset-level map T lies in [-log C_t, 0] (each entry is a LEEP, bounded below by minus the
label entropy), so the weight lies in [1, C_t]; a per-image map reaches log(1e-12), where
exp(-T) would be 1e12, so ``trs_map`` is defined on the dataset reading only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .maps import check_reading, risk_from_hardness

NORMALIZERS = ("pixels", "foreground", "weights")


def weighted_cross_entropy(logits, labels, pixel_weight=None, normalize: str = "pixels") -> torch.Tensor:
    """Pixel-weighted cross-entropy summed over the batch and divided by a normaliser.

    Args:
        logits: B x C x H x W raw scores.
        labels: B x H x W integer labels in [0, C).
        pixel_weight: B x H x W non-negative weights (None = 1).
        normalize: ``"pixels"`` (divide by B*H*W), ``"foreground"`` (divide by the number of
            pixels with label != 0, eq. 7; the pixel count if there are none) or ``"weights"``
            (divide by the sum of the weights, as PyTorch's class-weighted mean does).
    """
    if normalize not in NORMALIZERS:
        raise ValueError(f"normalize must be one of {NORMALIZERS}, got {normalize!r}")
    if logits.ndim != 4 or labels.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match logits shape {tuple(logits.shape)}; "
            "expected logits B x C x H x W and labels B x H x W"
        )
    ce = F.cross_entropy(logits, labels.long(), reduction="none")
    if pixel_weight is not None:
        if pixel_weight.shape != ce.shape:
            raise ValueError(f"pixel_weight shape {tuple(pixel_weight.shape)} does not match labels {tuple(ce.shape)}")
        ce = ce * pixel_weight.to(ce.dtype)
    total = ce.sum()
    if normalize == "pixels":
        denom = ce.new_tensor(float(ce.numel()))
    elif normalize == "foreground":
        n_fg = (labels != 0).sum()
        denom = (n_fg if n_fg > 0 else torch.tensor(labels.numel(), device=labels.device)).to(ce.dtype)
    else:
        denom = (pixel_weight.sum() if pixel_weight is not None else ce.new_tensor(float(ce.numel()))).to(ce.dtype)
        denom = denom.clamp_min(torch.finfo(ce.dtype).tiny)
    return total / denom


def soft_dice_loss(logits, labels, smooth: float = 1.0) -> torch.Tensor:
    """1 - the mean soft Dice over the foreground classes 1..C-1, pooled over the batch's pixels.

    Used only for pre-training the tumour sources (``source_loss(..., "ce_dice")``), never in the
    fine-tuning methods compared by the paper: with cross-entropy alone the tutorial's small U-Net
    learns only the oedema of a tumour source's four classes (a T2 source: mean Dice 0.17 after
    1500 iterations, NCR and ET at 0), with cross-entropy + Dice all three sub-regions.
    ``smooth`` keeps a class absent from the batch finite (its Dice is then about 1).
    """
    p = logits.float().softmax(1)
    onehot = F.one_hot(labels.long(), logits.shape[1]).permute(0, 3, 1, 2).to(p.dtype)
    inter = (p * onehot).sum((0, 2, 3))
    denom = p.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    dice = (2 * inter + smooth) / (denom + smooth)
    return 1 - dice[1:].mean()


#: Source pre-training losses (the paper does not state its own): ``ce``, plain cross-entropy;
#: ``ce_dice``, cross-entropy + ``soft_dice_loss`` (nnU-Net's default for multi-class tumour data).
SOURCE_LOSSES = ("ce", "ce_dice")


def check_source_loss(loss: str) -> str:
    """``loss`` if it is one of ``SOURCE_LOSSES``, else a one-line error naming the choices."""
    if loss not in SOURCE_LOSSES:
        raise ValueError(f"source loss must be one of {SOURCE_LOSSES}, got {loss!r}")
    return loss


def source_loss(logits, labels, loss: str = "ce") -> torch.Tensor:
    """The source pre-training loss ``loss`` (one of ``SOURCE_LOSSES``)."""
    check_source_loss(loss)
    ce = F.cross_entropy(logits, labels.long())
    return ce + soft_dice_loss(logits, labels) if loss == "ce_dice" else ce


def class_weights(label_counts) -> torch.Tensor:
    """Inverse-frequency class weights w_c = N / (C * n_c) from per-class pixel counts.

    C counts the classes present (n_c > 0), so balanced counts give 1 for every class. A
    class with no pixels in the training set gets weight 0 (it never appears in a label, so
    its weight is never used).
    """
    counts = torch.as_tensor(label_counts, dtype=torch.float64)
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(f"label_counts must be a 1-D sequence of per-class counts, got shape {tuple(counts.shape)}")
    if not torch.isfinite(counts).all() or (counts < 0).any():
        raise ValueError(f"label_counts must be finite and >= 0, got {counts.tolist()}")
    total = counts.sum()
    if total <= 0:
        raise ValueError("label_counts are all zero: no labelled pixels to weight")
    present = counts > 0
    w = torch.zeros_like(counts)
    w[present] = total / (int(present.sum()) * counts[present])
    return w.float()


@dataclass(frozen=True)
class LossMethod:
    """One row of the method table: how the pixel weight is formed, and the normaliser."""

    name: str
    weight: str  # "none" | "class" | "exp_neg_t" (exp(-T)) | "exp" (base ** H)
    normalize: str
    description: str

    @property
    def needs_map(self) -> bool:
        """Whether the weight is formed from a transferability map (eq. 4)."""
        return self.weight in ("exp_neg_t", "exp")

    #: the name the kit used before the maps held T as well as H
    needs_hardness = needs_map


METHODS = {
    m.name: m
    for m in (
        LossMethod("vanilla", "none", "pixels", "plain cross-entropy, mean over pixels"),
        LossMethod("class_weight", "class", "weights", "inverse class frequency weights [29]"),
        LossMethod("trs_map", "exp_neg_t", "pixels", "transferability-map weight exp(-T), dataset-level map ([22]'s code)"),
        LossMethod("trm", "exp", "foreground", "transfer risk map base**H, foreground-normalised (ours, eq. 7)"),
        LossMethod("fg_only", "none", "foreground", "ablation: foreground normalisation alone"),
        LossMethod("exp_only", "exp", "pixels", "ablation: risk map weight alone, mean over pixels"),
    )
}


def get_method(method: str) -> LossMethod:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    return METHODS[method]


def check_method_reading(method: str, reading: str) -> None:
    """Refuse a reading a method cannot use: ``trs_map``'s exp(-T) is defined on the dataset-level
    map only (module docstring); methods without a map accept either (it is not used)."""
    check_reading(reading)
    if get_method(method).weight == "exp_neg_t" and reading != "dataset":
        raise ValueError(f"method {method!r} weighs pixels by exp(-T) of the dataset-level map ([22]); a per-image "
                         f"map reaches T = log(1e-12), a weight of 1e12. Use {method!r} without map=image")


def method_loss(
    method: str,
    logits: torch.Tensor,
    labels: torch.Tensor,
    hardness: Optional[torch.Tensor] = None,
    class_weight: Optional[torch.Tensor] = None,
    base: float = 10.0,
    tmap: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The loss of ``method`` (a name in ``METHODS``) on one batch.

    ``hardness`` (B x H x W, eq. 5) is needed by ``trm`` and ``exp_only``; ``tmap`` (B x H x W,
    the transferability map itself, eq. 4) by ``trs_map``; ``class_weight`` (C) by ``class_weight``.
    """
    m = get_method(method)
    weight = None
    if m.weight == "class":
        if class_weight is None:
            raise ValueError("method 'class_weight' needs class_weight (see class_weights(label_counts))")
        weight = class_weight.to(logits.device, logits.dtype)[labels.long()]
    elif m.weight == "exp_neg_t":
        if tmap is None:
            raise ValueError(f"method {method!r} needs the transferability map T (eq. 4) of the batch")
        weight = torch.exp(-tmap)
    elif m.weight == "exp":
        if hardness is None:
            raise ValueError(f"method {method!r} needs the hardness maps H (eq. 5) of the batch")
        weight = risk_from_hardness(hardness, base)
    return weighted_cross_entropy(logits, labels, weight, m.normalize)
