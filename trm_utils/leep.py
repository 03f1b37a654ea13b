"""LEEP (eq. 2) and pixel-level LEEP (eq. 3): the scores. The maps (eq. 4, both readings) are in ``maps``.

Notation (DESIGN.md section 2): a source model with softmax output theta(x) over the C_s
source labels z; target labels y in {0..C_t-1}.

    P(y, z)  = (1/n) sum_{i: y_i = y} theta(x_i)_z         empirical joint
    P(y | z) = P(y, z) / P(z)                              empirical conditional
    LEEP     = (1/n) sum_i log sum_z P(y_i | z) theta(x_i)_z

Pixel-LEEP treats every pixel of every target image as one instance. Because the score needs
P(y|z) estimated over the *whole* target set before any pixel can be scored, a streaming
estimator makes two passes: ``update`` (pass 1) accumulates the joint, ``score_update``
(pass 2) accumulates the log-likelihood and returns the batch's per-pixel terms (the per-image
transferability maps of ``maps``). Its
state is a C_t x C_s matrix and two scalars, whatever the number of batches.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

#: log(0) is clamped here so an impossible label gives a large finite penalty, not -inf.
LOG_EPS = 1e-12
#: tolerance on "probabilities sum to 1" (float32 softmax sums are within ~1e-6).
SUM_TOL = 1e-3


def _to_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray) or isinstance(x, (list, tuple)):
        return torch.as_tensor(np.asarray(x))
    raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")


def _check_probs(probs: torch.Tensor, dim: int, name: str = "probs") -> torch.Tensor:
    """Finite, non-negative, summing to 1 along ``dim``; two reductions over the data."""
    if not torch.is_floating_point(probs):
        probs = probs.double()
    if not probs.numel():
        return probs
    # any NaN or Inf entry makes its pixel's sum non-finite, and NaN propagates through
    # aminmax, so one reduction over the sums checks finiteness and normalisation together
    lo, hi = (float(v) for v in torch.aminmax(probs.sum(dim=dim)))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} contains NaN or Inf; check the source model's output")
    if probs.min() < -SUM_TOL:
        raise ValueError(f"{name} has negative entries (min {probs.min().item():.3g}); pass softmax probabilities, not logits")
    dev = max(abs(lo - 1), abs(hi - 1))
    if dev > SUM_TOL:
        raise ValueError(
            f"{name} do not sum to 1 over the class axis (dim {dim}; max deviation {dev:.3g}); "
            "apply softmax to the logits first"
        )
    return probs


def _check_labels(labels: torch.Tensor, num_classes: Optional[int], name: str = "labels") -> torch.Tensor:
    if torch.is_floating_point(labels):
        if not torch.isfinite(labels).all():
            raise ValueError(f"{name} contains NaN or Inf")
        if (labels != labels.round()).any():
            raise ValueError(f"{name} must be integer class indices, got non-integer values")
    labels = labels.long()
    if labels.numel() and labels.min() < 0:
        raise ValueError(f"{name} has negative values (min {labels.min().item()}); expected class indices in [0, C_t)")
    if num_classes is not None and labels.numel() and labels.max() >= num_classes:
        raise ValueError(
            f"{name} has value {labels.max().item()} outside [0, {num_classes}); "
            "remap labels to 0..C_t-1 or raise num_target_classes"
        )
    return labels


def _conditional_from_joint(joint: torch.Tensor) -> torch.Tensor:
    """P(y|z) = P(y,z)/P(z); a source label that nothing predicts (P(z)=0) gets P(y|z)=0.

    Such a z carries theta_z = 0 for every instance, so its column never contributes to the
    expected empirical predictor; 0 (not NaN) keeps the sums finite.
    """
    pz = joint.sum(dim=0, keepdim=True)
    return torch.where(pz > 0, joint / pz.clamp_min(torch.finfo(joint.dtype).tiny), torch.zeros_like(joint))


def leep(source_probs, target_labels, num_target_classes: Optional[int] = None) -> float:
    """LEEP score, eq. (2) (Nguyen et al. 2020): mean log-likelihood of the target labels
    under the expected empirical predictor sum_z P(y|z) theta_z.

    Args:
        source_probs: N x C_s source-model probabilities (rows sum to 1).
        target_labels: N integer target labels in [0, C_t).
        num_target_classes: C_t; defaults to max(label) + 1.

    Returns:
        A float <= 0; higher means the source is expected to transfer better.
    """
    probs = _to_tensor(source_probs, "source_probs")
    labels = _to_tensor(target_labels, "target_labels")
    if probs.ndim != 2:
        raise ValueError(f"source_probs must be N x C_s, got shape {tuple(probs.shape)}")
    if labels.ndim != 1 or labels.shape[0] != probs.shape[0]:
        raise ValueError(
            f"target_labels shape {tuple(labels.shape)} does not match source_probs shape {tuple(probs.shape)}; "
            "expected N labels for N x C_s probabilities"
        )
    if probs.shape[0] == 0:
        raise ValueError("leep needs at least one instance, got 0")
    probs = _check_probs(probs, dim=1, name="source_probs").double()
    labels = _check_labels(labels, num_target_classes, "target_labels")
    c_t = int(num_target_classes) if num_target_classes is not None else int(labels.max()) + 1
    joint = torch.zeros(c_t, probs.shape[1], dtype=torch.float64, device=probs.device)
    joint.index_add_(0, labels, probs)
    joint /= probs.shape[0]
    cond = _conditional_from_joint(joint)
    eep = (probs @ cond.T).gather(1, labels[:, None]).squeeze(1)
    return float(torch.log(eep.clamp_min(LOG_EPS)).mean())


def _check_pixel_inputs(probs, labels, mask, num_source_classes=None, num_target_classes=None):
    probs = _to_tensor(probs, "probs")
    labels = _to_tensor(labels, "labels")
    if probs.ndim != 4:
        raise ValueError(f"probs must be B x C_s x H x W, got shape {tuple(probs.shape)}")
    if labels.ndim != 3 or labels.shape[0] != probs.shape[0] or labels.shape[1:] != probs.shape[2:]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match probs shape {tuple(probs.shape)}; "
            "expected labels B x H x W for probs B x C_s x H x W"
        )
    if num_source_classes is not None and probs.shape[1] != num_source_classes:
        raise ValueError(f"probs has {probs.shape[1]} source classes, the estimator was built for {num_source_classes}")
    probs = _check_probs(probs, dim=1)
    labels = _check_labels(labels, num_target_classes).to(probs.device)
    if mask is not None:
        mask = _to_tensor(mask, "mask")
        if mask.shape != labels.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match labels shape {tuple(labels.shape)}")
        mask = mask.to(device=probs.device, dtype=torch.bool)
    return probs, labels, mask


def _tmap(probs: torch.Tensor, labels: torch.Tensor, conditional: torch.Tensor) -> torch.Tensor:
    """The per-pixel terms of eq. (3) on already-checked inputs: log sum_z P(y_p|z) theta_{p,z} with one
    P(y|z) for the whole set (the per-image reading of eq. 4, ``maps.transferability_map``)."""
    cond = conditional.to(device=probs.device, dtype=probs.dtype)
    # expected empirical predictor for every target class, then pick each pixel's label
    eep = torch.einsum("yz,bzhw->byhw", cond, probs)
    picked = eep.gather(1, labels[:, None]).squeeze(1)
    return torch.log(picked.clamp_min(LOG_EPS))


class PixelLEEP:
    """Streaming pixel-level LEEP, eq. (3), in two passes over the target data.

    Pass 1: ``update(probs, labels, mask=None)`` for every batch accumulates the joint
    P(y, z). Pass 2: ``score_update(probs, labels, mask=None)`` for every batch accumulates
    sum_p log sum_z P(y_p|z) theta_{p,z} and returns that batch's transferability maps
    (eq. 4). ``score()`` is their mean over all counted pixels. State: one C_t x C_s float64
    matrix and two scalars on the tensors' device, whatever the number of batches.

    ``mask`` (B x H x W, bool) selects the pixels that count; unmasked pixels still get a
    value in the returned maps.
    """

    def __init__(self, num_source_classes: int, num_target_classes: int):
        if int(num_source_classes) < 1 or int(num_target_classes) < 1:
            raise ValueError(
                f"class counts must be >= 1, got C_s={num_source_classes}, C_t={num_target_classes}"
            )
        self.num_source_classes = int(num_source_classes)
        self.num_target_classes = int(num_target_classes)
        self.reset()

    def reset(self) -> None:
        self._joint: Optional[torch.Tensor] = None  # un-normalised sum of theta per (y, z)
        self._n = 0
        self._cond: Optional[torch.Tensor] = None
        self._log_sum = 0.0
        self._n_scored = 0

    @torch.no_grad()
    def update(self, probs, labels, mask=None) -> "PixelLEEP":
        """Pass 1: add a batch to the empirical joint P(y, z)."""
        probs, labels, mask = _check_pixel_inputs(probs, labels, mask, self.num_source_classes, self.num_target_classes)
        if self._cond is not None:
            raise RuntimeError("update() after conditional()/score_update(): call reset() to start a new estimate")
        b, c_s = probs.shape[:2]
        onehot = torch.zeros(*labels.shape, self.num_target_classes, dtype=probs.dtype, device=probs.device)
        onehot.scatter_(-1, labels[..., None], 1.0 if mask is None else mask[..., None].to(probs.dtype))  # B,H,W,C_t
        # sum over pixels of theta_z * [y = label]: one batched matmul, no loop over pixels
        joint = torch.einsum("bzn,bny->yz", probs.reshape(b, c_s, -1), onehot.reshape(b, -1, self.num_target_classes))
        if self._joint is None:
            self._joint = torch.zeros(self.num_target_classes, c_s, dtype=torch.float64, device=probs.device)
        self._joint += joint.to(device=self._joint.device, dtype=torch.float64)
        self._n += int(mask.sum()) if mask is not None else labels.numel()
        return self

    def joint(self) -> torch.Tensor:
        """Empirical joint P(y, z) (C_t x C_s, sums to 1)."""
        if self._joint is None or self._n == 0:
            raise RuntimeError("no pixels seen yet: call update() with at least one unmasked pixel first")
        return self._joint / self._n

    def conditional(self) -> torch.Tensor:
        """Empirical conditional P(y|z) (C_t x C_s); columns of never-predicted z are 0."""
        if self._cond is None:
            self._cond = _conditional_from_joint(self.joint())
        return self._cond

    @torch.no_grad()
    def score_update(self, probs, labels, mask=None) -> torch.Tensor:
        """Pass 2: accumulate the score over a batch; returns its B x H x W transferability maps."""
        probs, labels, mask = _check_pixel_inputs(probs, labels, mask, self.num_source_classes, self.num_target_classes)
        tmap = _tmap(probs, labels, self.conditional())
        if mask is not None:
            self._log_sum += float(tmap[mask].double().sum())
            self._n_scored += int(mask.sum())
        else:
            self._log_sum += float(tmap.double().sum())
            self._n_scored += tmap.numel()
        return tmap

    def score(self) -> float:
        """Pixel-LEEP, eq. (3): mean of the transferability map over all counted pixels."""
        if self._n_scored == 0:
            raise RuntimeError(
                "score() needs a second pass: after update() over all batches, call score_update() over them again "
                "(P(y|z) must come from the whole set before any pixel is scored)"
            )
        return self._log_sum / self._n_scored


def pixel_leep(probs, labels, mask=None, num_target_classes: Optional[int] = None) -> float:
    """One-call pixel-LEEP, eq. (3), on a whole B x C_s x H x W probability tensor.

    Equals ``PixelLEEP`` streamed over any split into batches, and ``leep`` on the
    flattened (unmasked) pixels.
    """
    probs_t, labels_t, _ = _check_pixel_inputs(probs, labels, mask)
    c_t = int(num_target_classes) if num_target_classes is not None else int(labels_t.max()) + 1
    est = PixelLEEP(probs_t.shape[1], c_t)
    est.update(probs_t, labels_t, mask)
    est.score_update(probs_t, labels_t, mask)
    return est.score()

