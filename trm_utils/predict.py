"""A model on a set of slices: the slices stacked into tensors, softmax predictions batch by batch,
and the held-out Dice the paper reports (per subject volume, then over subjects and classes).

The room below ``maps`` (which scores a source's predictions on the target set) and ``train``
(which reads the held-out Dice along a run); it knows nothing of losses or training.

``data`` everywhere is either a ``(images, labels)`` pair of tensors (N x 1 x H x W float,
N x H x W int) or a torch Dataset of such pairs (``slices.SliceDataset``); it is stacked once.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .metrics import dice_counts, dice_from_counts
from .utils import get_device


def stack_data(data):
    """``(images N x 1 x H x W float32, labels N x H x W int64)`` from a pair or a Dataset."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        images, labels = data
    elif hasattr(data, "images") and hasattr(data, "labels"):
        images, labels = data.images, data.labels
    else:
        if len(data) == 0:
            raise ValueError("the dataset is empty: no slices to train or evaluate on")
        items = [data[i] for i in range(len(data))]
        images = torch.stack([torch.as_tensor(x) for x, _ in items])
        labels = torch.stack([torch.as_tensor(y) for _, y in items])
    images, labels = torch.as_tensor(images).float(), torch.as_tensor(labels).long()
    if images.ndim != 4 or labels.ndim != 3 or images.shape[0] != labels.shape[0] or images.shape[2:] != labels.shape[1:]:
        raise ValueError(
            f"images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match; "
            "expected N x C x H x W images and N x H x W labels"
        )
    if images.shape[0] == 0:
        raise ValueError("the dataset is empty: no slices to train or evaluate on")
    return images, labels


def infer_num_classes(data, labels: torch.Tensor, given: Optional[int] = None) -> int:
    """The number of classes: ``given``, else ``data.num_classes``, else the largest label + 1."""
    if given is not None:
        return int(given)
    if hasattr(data, "num_classes"):
        return int(data.num_classes)
    return int(labels.max()) + 1


@torch.no_grad()
def predict_probs(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 32, device="auto"):
    """Yield ``(slice index range, softmax probabilities)`` batch by batch (model in eval mode)."""
    device = get_device(device)
    was_training = model.training
    model.eval()
    try:
        for s in range(0, images.shape[0], batch_size):
            x = images[s : s + batch_size].to(device)
            yield slice(s, s + x.shape[0]), torch.softmax(model(x).float(), dim=1)
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(model, data, num_classes: Optional[int] = None, batch_size: int = 32, device="auto") -> dict:
    """Dice per foreground class on ``data``, averaged over subjects, then over classes.

    When ``data`` has ``subject_ids`` (one per slice), each subject's slices form one volume
    and its Dice is computed on that volume (the usual 3D convention); otherwise all slices
    are pooled into one volume. Classes absent from both prediction and target are skipped
    (see ``metrics``).
    """
    images, labels = stack_data(data)
    c = infer_num_classes(data, labels, num_classes)
    preds = torch.empty_like(labels)
    for sl, probs in predict_probs(model, images, batch_size, device):
        preds[sl] = probs.argmax(1).cpu()
    return score_predictions(preds, labels, subjects_of(data, labels), c)


def subjects_of(data, labels) -> np.ndarray:
    """The subject of every slice of ``data`` (``data.subject_ids``), or one subject for all."""
    return np.asarray(getattr(data, "subject_ids", np.zeros(len(labels), dtype=int)))


def score_predictions(preds: torch.Tensor, labels: torch.Tensor, subjects, num_classes: int) -> dict:
    """``evaluate``'s Dice from predicted labels: per subject (one volume each), then the mean
    over subjects per class, then over the foreground classes."""
    subjects = np.asarray(subjects)
    per_subject = []
    for s in np.unique(subjects):
        idx = torch.as_tensor(np.nonzero(subjects == s)[0])
        per_subject.append(dice_from_counts(*dice_counts(preds[idx], labels[idx], num_classes)))
    d = torch.stack(per_subject)  # subjects x classes
    per_class = torch.nanmean(d, dim=0)[1:]
    return {"dice": float(torch.nanmean(per_class)), "dice_per_class": per_class.tolist(), "n_subjects": len(per_subject)}
