"""Source pre-training, risk-map computation and weighted fine-tuning (paper, section III-B).

Protocol: pre-train a 2D U-Net on the source task; fine-tune it on the target task with Adam
(lr 1e-4, 5k iterations in the paper), the encoder frozen (weights and BatchNorm statistics),
decoder and head trained. The head is kept when the source and target class counts match and
re-initialised otherwise. The hardness / risk maps are computed with the source model on the
target training set before fine-tuning (static); ``refresh_every=k`` recomputes them every k
iterations with the current model.

``data`` everywhere is either a ``(images, labels)`` pair of tensors (N x 1 x H x W float,
N x H x W int) or a torch Dataset of such pairs; it is stacked once into memory so the loop
never decodes files.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch

from .leep import PixelLEEP
from .losses import class_weights, get_method, method_loss
from .metrics import dice_counts, dice_from_counts
from .risk import hardness as hardness_fn
from .unet import UNet2D, freeze_encoder, reset_head
from .utils import atomic_torch_save, get_device, seed_everything


def _progress(iterable, show: bool, desc: str):
    if not show:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


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


def _num_classes(data, labels: torch.Tensor, given: Optional[int]) -> int:
    if given is not None:
        return int(given)
    if hasattr(data, "num_classes"):
        return int(data.num_classes)
    return int(labels.max()) + 1


class _Batches:
    """Seeded epoch-wise shuffling; same seed, same batch sequence."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.bs = n, min(batch_size, n)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.perm, self.pos = torch.randperm(n, generator=self.gen), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.bs > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
        idx = self.perm[self.pos : self.pos + self.bs]
        self.pos += self.bs
        return idx


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
def transferability(model, data, num_target_classes: Optional[int] = None, batch_size: int = 32, device="auto", mask=None):
    """Pixel-LEEP of ``model`` (as the source) on the target ``data`` and its maps.

    Two streamed passes (eq. 3 needs P(y|z) over the whole set first). ``mask`` (N x H x W
    bool, optional) restricts the pixels that count towards P(y|z) and the score.

    Returns:
        dict with ``score`` (float, eq. 3), ``tmap`` (N x H x W, eq. 4, on the CPU),
        ``hardness`` (N x H x W, eq. 5) and ``conditional`` (C_t x C_s).
    """
    device = get_device(device)
    images, labels = stack_data(data)
    c_t = _num_classes(data, labels, num_target_classes)
    model = model.to(device)
    est = None
    for sl, probs in predict_probs(model, images, batch_size, device):
        est = est or PixelLEEP(probs.shape[1], c_t)
        est.update(probs, labels[sl].to(device), None if mask is None else mask[sl].to(device))
    tmaps = torch.empty(labels.shape, dtype=torch.float32)
    for sl, probs in predict_probs(model, images, batch_size, device):
        tmaps[sl] = est.score_update(probs, labels[sl].to(device), None if mask is None else mask[sl].to(device)).cpu()
    return {"score": est.score(), "tmap": tmaps, "hardness": hardness_fn(tmaps), "conditional": est.conditional().cpu()}


@torch.no_grad()
def evaluate(model, data, num_classes: Optional[int] = None, batch_size: int = 32, device="auto") -> dict:
    """Dice per foreground class on ``data``, averaged over subjects, then over classes.

    When ``data`` has ``subject_ids`` (one per slice), each subject's slices form one volume
    and its Dice is computed on that volume (the usual 3D convention); otherwise all slices
    are pooled into one volume. Classes absent from both prediction and target are skipped
    (see ``metrics``).
    """
    images, labels = stack_data(data)
    c = _num_classes(data, labels, num_classes)
    subjects = np.asarray(getattr(data, "subject_ids", np.zeros(len(labels), dtype=int)))
    preds = torch.empty_like(labels)
    for sl, probs in predict_probs(model, images, batch_size, device):
        preds[sl] = probs.argmax(1).cpu()
    per_subject = []
    for s in np.unique(subjects):
        idx = torch.as_tensor(np.nonzero(subjects == s)[0])
        per_subject.append(dice_from_counts(*dice_counts(preds[idx], labels[idx], c)))
    d = torch.stack(per_subject)  # subjects x classes
    per_class = torch.nanmean(d, dim=0)[1:]
    return {"dice": float(torch.nanmean(per_class)), "dice_per_class": per_class.tolist(), "n_subjects": len(per_subject)}


def train_source(
    model: UNet2D,
    data,
    iterations: int = 1000,
    lr: float = 1e-3,
    batch_size: int = 8,
    *,
    device="auto",
    seed: int = 0,
    show_progress: bool = True,
    checkpoint_path=None,
) -> dict:
    """Pre-train ``model`` (all layers, plain cross-entropy, Adam) on the source task, in place.

    The paper does not state its source learning rate; 1e-3 is our choice. Returns a
    history ``{"loss": [...], "seconds": float}``; saves ``{"state_dict", "history"}``
    atomically to ``checkpoint_path`` when given.
    """
    return _fit(model, data, "vanilla", iterations, lr, batch_size, device=device, seed=seed,
                show_progress=show_progress, checkpoint_path=checkpoint_path, desc="source")


def finetune(
    model: UNet2D,
    data,
    method: str,
    risk: Optional[torch.Tensor] = None,
    iterations: int = 5000,
    lr: float = 1e-4,
    batch_size: int = 8,
    *,
    num_classes: Optional[int] = None,
    base: float = 10.0,
    refresh_every: Optional[int] = None,
    eval_data=None,
    eval_every: Optional[int] = None,
    device="auto",
    seed: int = 0,
    show_progress: bool = True,
    checkpoint_path=None,
) -> dict:
    """Fine-tune a source ``model`` on the target ``data`` with ``method``'s loss, in place.

    Encoder frozen (weights and BatchNorm statistics), decoder and head trained with Adam.

    Args:
        method: a name in ``losses.METHODS`` (vanilla, class_weight, trs_map, trm, fg_only,
            exp_only).
        risk: the hardness maps H (eq. 5) of the training slices, N x H x W, aligned with
            ``data``. Each method forms its pixel weight from it (trm: base**H, the risk map of
            eq. 6; trs_map: 1 + H). When None and the method needs it, it is computed here
            with ``model`` as the source, before fine-tuning.
        refresh_every: recompute the maps every k iterations with the current model (off by
            default; the paper's maps are static).
        eval_data, eval_every: held-out Dice every k iterations, recorded for analysis only
            (never used to pick a model).

    Returns:
        history dict: ``loss`` (per iteration), ``eval`` (list of {iteration, dice}),
        ``refresh_seconds`` (time of each refresh), ``seconds``.
    """
    images, labels = stack_data(data)
    c_t = _num_classes(data, labels, num_classes)
    m = get_method(method)
    device_t = get_device(device)
    model.to(device_t)
    if m.needs_hardness and risk is None:
        risk = transferability(model, (images, labels), c_t, device=device_t)["hardness"]
    if risk is not None:
        risk = torch.as_tensor(risk, dtype=torch.float32)
        if risk.shape != labels.shape:
            raise ValueError(f"risk maps have shape {tuple(risk.shape)} but the training labels {tuple(labels.shape)}; "
                             "compute them on the same slices")
    seed_everything(seed)  # the head re-initialisation is seeded too
    if model.num_classes != c_t:
        reset_head(model, c_t)
    freeze_encoder(model)
    cw = class_weights(torch.bincount(labels.reshape(-1), minlength=c_t)) if m.weight == "class" else None
    return _fit(model, (images, labels), method, iterations, lr, batch_size, device=device_t, seed=seed,
                show_progress=show_progress, checkpoint_path=checkpoint_path, desc=method, hardness=risk,
                class_weight=cw, base=base, refresh_every=refresh_every, eval_data=eval_data,
                eval_every=eval_every, num_classes=c_t)


def _fit(model, data, method, iterations, lr, batch_size, *, device, seed, show_progress, checkpoint_path, desc,
         hardness=None, class_weight=None, base=10.0, refresh_every=None, eval_data=None, eval_every=None,
         num_classes=None) -> dict:
    if int(iterations) < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if lr <= 0 or batch_size < 1:
        raise ValueError(f"lr must be > 0 and batch_size >= 1, got lr={lr}, batch_size={batch_size}")
    device = get_device(device)
    images, labels = stack_data(data)
    seed_everything(seed)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    batches = _Batches(images.shape[0], batch_size, seed)
    if class_weight is not None:
        class_weight = class_weight.to(device)
    history = {"method": method, "loss": [], "eval": [], "refresh_seconds": []}
    t0 = time.perf_counter()
    for it in _progress(range(1, int(iterations) + 1), show_progress, desc):
        idx = batches.next()
        x, y = images[idx].to(device), labels[idx].to(device)
        h = hardness[idx].to(device) if hardness is not None else None
        loss = method_loss(method, model(x), y, hardness=h, class_weight=class_weight, base=base)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history["loss"].append(float(loss.detach()))
        if refresh_every and hardness is not None and it % int(refresh_every) == 0 and it < iterations:
            tr = time.perf_counter()
            hardness = transferability(model, (images, labels), num_classes, device=device)["hardness"]
            model.train()
            history["refresh_seconds"].append(time.perf_counter() - tr)
        if eval_data is not None and eval_every and (it % int(eval_every) == 0 or it == iterations):
            history["eval"].append({"iteration": it, **evaluate(model, eval_data, num_classes, device=device)})
            model.train()
    history["seconds"] = time.perf_counter() - t0
    if checkpoint_path is not None:
        atomic_torch_save({"state_dict": model.state_dict(), "history": history}, checkpoint_path)
    return history
