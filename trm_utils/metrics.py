"""Dice per class and mean foreground Dice.

Convention for an empty class: a class absent from both the prediction and the target has
no defined Dice (0/0); it is NaN here and skipped by the mean (``nanmean``). A class present
in only one of them has Dice 0. If every foreground class is empty, the mean is NaN.
"""
from __future__ import annotations

import torch


def dice_counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int):
    """Per-class (intersection, |pred|, |target|) pixel counts over all pixels of the inputs."""
    pred = torch.as_tensor(pred).long().reshape(-1)
    target = torch.as_tensor(target).long().reshape(-1)
    if pred.shape != target.shape:
        raise ValueError(f"pred has {pred.numel()} pixels but target has {target.numel()}; they must match")
    for name, t in (("pred", pred), ("target", target)):
        if t.numel() and (t.min() < 0 or t.max() >= num_classes):
            raise ValueError(f"{name} has labels outside [0, {num_classes}): min {t.min().item()}, max {t.max().item()}")
    inter = torch.bincount(target[pred == target], minlength=num_classes)
    n_pred = torch.bincount(pred, minlength=num_classes)
    n_tgt = torch.bincount(target, minlength=num_classes)
    return inter, n_pred, n_tgt


def dice_from_counts(inter, n_pred, n_tgt) -> torch.Tensor:
    denom = (n_pred + n_tgt).double()
    return torch.where(denom > 0, 2 * inter.double() / denom.clamp_min(1), torch.full_like(denom, float("nan")))


def dice_per_class(pred, target, num_classes: int) -> torch.Tensor:
    """Dice of every class 0..num_classes-1 over all pixels of ``pred`` and ``target``
    (any shape; the pixels are pooled, e.g. one subject's slices form one volume).
    NaN for a class absent from both."""
    return dice_from_counts(*dice_counts(pred, target, num_classes))


def mean_foreground_dice(pred, target, num_classes: int) -> float:
    """Mean Dice over the foreground classes 1..C-1, skipping classes absent from both."""
    d = dice_per_class(pred, target, num_classes)[1:]
    return float(torch.nanmean(d)) if d.numel() else float("nan")
