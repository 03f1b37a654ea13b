"""Source pre-training and weighted fine-tuning, one run at a time (paper, section III-B): the
readable reference loop. ``batched.finetune_cell`` trains every run of a transfer cell at once (the
fast path, tested against this one); ``predict`` holds prediction and the held-out Dice.

Protocol: pre-train a 2D U-Net on the source task; fine-tune it on the target task with Adam
(lr 1e-4, 5k iterations in the paper), the encoder frozen (weights and BatchNorm statistics),
decoder and head trained. The head is kept when the source and target class counts match and
re-initialised otherwise. The transferability maps (``maps``: the dataset-level map by default,
a map per image with ``reading="image"``) are computed with the source model on the target
training set before fine-tuning (static); ``refresh_every=k`` recomputes them every k iterations
with the current model.

``data`` everywhere is either a ``(images, labels)`` pair of tensors (N x 1 x H x W float,
N x H x W int) or a torch Dataset of such pairs; it is stacked once into memory so the loop
never decodes files.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from .losses import check_method_reading, check_source_loss, class_weights, get_method, method_loss, source_loss
from .maps import loss_maps, prepare_loss_maps, transferability_maps
from .predict import evaluate, infer_num_classes, stack_data
from .unet import UNet2D, freeze_encoder, reset_head
from .utils import atomic_torch_save, get_device, progress_bar, seed_everything


def check_schedule(iterations: int, lr: float, batch_size: int) -> None:
    """A one-line ``ValueError`` for a run length, learning rate or batch size no run can have."""
    if int(iterations) < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if lr <= 0 or batch_size < 1:
        raise ValueError(f"lr must be > 0 and batch_size >= 1, got lr={lr}, batch_size={batch_size}")


def lr_at(it: int, iterations: int, lr: float, decay: Optional[float]) -> float:
    """The learning rate of iteration ``it`` (1-based): ``lr`` throughout, or with ``decay`` = f,
    constant for the first (1 - f) of the run and then falling linearly to ``lr / (f T)`` at the
    last iteration T (a decay over the final part of a run steadies a noisy curve's end; the
    preset says when it is used)."""
    if not decay:
        return lr
    span = max(1.0, float(decay) * iterations)
    return lr * min(1.0, (iterations - it + 1) / span)


class Batches:
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


#: What ``augment_batch`` draws from, per slice (source pre-training only, ``source_augment``).
AUGMENT = {"flip_lr": 0.5, "flip_ap": 0.5, "scale": 0.1, "shift": 0.1}


def augment_batch(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
    """A randomly flipped and intensity-jittered copy of a batch (images N x 1 x H x W z-scored,
    labels N x H x W): per slice, a left-right flip and an anterior-posterior flip each with
    probability 0.5, then ``x * a + b`` with ``a`` ~ U(0.9, 1.1) and ``b`` ~ U(-0.1, 0.1) (z-score
    units). Labels follow the flips. Draws come from ``gen`` (a seeded CPU generator), so the same
    seed gives the same batches on any device.

    The regulariser of source pre-training (a subset of nnU-Net's standard augmentations that keeps
    an axial slice a plausible slice); fine-tuning never augments (the paper does not say it does,
    and the methods compared should differ only in their loss).
    """
    n = x.shape[0]
    r = torch.rand(n, 4, generator=gen)
    a = 1.0 + AUGMENT["scale"] * (2 * r[:, 2] - 1)
    b = AUGMENT["shift"] * (2 * r[:, 3] - 1)
    x, y = x.clone(), y.clone()
    for mask, dim in ((r[:, 0] < AUGMENT["flip_lr"], -1), (r[:, 1] < AUGMENT["flip_ap"], -2)):
        if mask.any():
            i = torch.nonzero(mask).flatten().to(x.device)
            x[i] = x[i].flip(dim)
            y[i] = y[i].flip(dim)
    return x * a.to(x).view(n, 1, 1, 1) + b.to(x).view(n, 1, 1, 1), y


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
    eval_data=None,
    eval_every: Optional[int] = None,
    lr_decay: Optional[float] = None,
    loss: str = "ce",
    augment: bool = False,
) -> dict:
    """Pre-train ``model`` (all layers, Adam) on the source task, in place.

    The paper states neither its source learning rate nor its source loss; 1e-3 and ``loss``
    are our choices: ``"ce"`` (cross-entropy) or ``"ce_dice"`` (cross-entropy + soft Dice,
    ``losses.soft_dice_loss``; the tutorial preset's choice for the tumour sources). ``eval_data`` /
    ``eval_every``: the source task's held-out Dice every k iterations (the curve that shows the
    source finished learning; never used to pick a model). ``lr_decay``: see ``finetune``.
    ``augment``: flips and intensity jitter per batch (``augment_batch``; the tutorial preset's
    tumour sources use it, ``source_augment``).
    Returns a history ``{"loss": [...], "eval": [...], "seconds": float}``; saves
    ``{"state_dict", "history"}`` atomically to ``checkpoint_path`` when given.
    """
    check_source_loss(loss)  # before any training, not at the first step
    return _fit(model, data, "vanilla", iterations, lr, batch_size, device=device, seed=seed,
                show_progress=show_progress, checkpoint_path=checkpoint_path, desc="source",
                eval_data=eval_data, eval_every=eval_every, lr_decay=lr_decay, source_loss_name=loss,
                augment=augment)


def finetune(
    model: UNet2D,
    data,
    method: str,
    maps=None,
    iterations: int = 5000,
    lr: float = 1e-4,
    batch_size: int = 8,
    *,
    reading: str = "dataset",
    patch: int = 1,
    num_classes: Optional[int] = None,
    base: float = 10.0,
    refresh_every: Optional[int] = None,
    eval_data=None,
    eval_every: Optional[int] = None,
    device="auto",
    seed: int = 0,
    show_progress: bool = True,
    checkpoint_path=None,
    lr_decay: Optional[float] = None,
) -> dict:
    """Fine-tune a source ``model`` on the target ``data`` with ``method``'s loss, in place.

    Encoder frozen (weights and BatchNorm statistics), decoder and head trained with Adam.

    Args:
        method: a name in ``losses.METHODS`` (vanilla, class_weight, trs_map, trm, fg_only,
            exp_only).
        maps: the source's transferability maps on ``data`` (``maps.transferability_maps``'s
            result, or a ``maps.LossMaps``). Each method forms its pixel weight from them (trm:
            base**H, the risk map of eq. 6; trs_map: exp(-T), [22]). When None and the method needs
            them, they are computed here with ``model`` as the source, before fine-tuning.
        reading: which reading of eq. 4 the method uses: ``"dataset"`` (one map per source-target
            pair, the default) or ``"image"`` (a map per image; not for trs_map).
        patch: the dataset-level map's patch size (the preset's ``map_patch``).
        refresh_every: recompute the maps every k iterations with the current model (off by
            default; the paper's maps are static).
        eval_data, eval_every: held-out Dice every k iterations, recorded for analysis only
            (never used to pick a model).
        lr_decay: the final fraction of the run over which the learning rate falls linearly
            (``lr_at``); None keeps it constant, as the paper does.

    Returns:
        history dict: ``loss`` (per iteration), ``eval`` (list of {iteration, dice}),
        ``refresh_seconds`` (time of each refresh), ``seconds``.
    """
    images, labels = stack_data(data)
    c_t = infer_num_classes(data, labels, num_classes)
    m = get_method(method)
    check_method_reading(method, reading)
    device_t = get_device(device)
    model.to(device_t)
    lmaps = prepare_loss_maps(maps, model, images, labels, c_t, reading, patch, device_t) if m.needs_map else None
    seed_everything(seed)  # the head re-initialisation is seeded too
    if model.num_classes != c_t:
        reset_head(model, c_t)
    freeze_encoder(model)
    cw = class_weights(torch.bincount(labels.reshape(-1), minlength=c_t)) if m.weight == "class" else None
    return _fit(model, (images, labels), method, iterations, lr, batch_size, device=device_t, seed=seed,
                show_progress=show_progress, checkpoint_path=checkpoint_path, desc=method, maps=lmaps,
                class_weight=cw, base=base, refresh_every=refresh_every, eval_data=eval_data,
                eval_every=eval_every, num_classes=c_t, lr_decay=lr_decay, patch=patch)


def refreshed_maps(model, images, labels, reading, patch, num_classes, device, history):
    """The maps of ``reading`` recomputed with ``model``'s current weights (``refresh_every``), the
    time it took appended to ``history["refresh_seconds"]``; ``model`` is left in training mode."""
    t0 = time.perf_counter()
    maps = loss_maps(transferability_maps(model, (images, labels), (reading,), patch, num_classes, device=device),
                     reading).to(device)
    model.train()
    history["refresh_seconds"].append(time.perf_counter() - t0)
    return maps


def _fit(model, data, method, iterations, lr, batch_size, *, device, seed, show_progress, checkpoint_path, desc,
         maps=None, class_weight=None, base=10.0, refresh_every=None, eval_data=None, eval_every=None,
         num_classes=None, lr_decay=None, patch=1, source_loss_name=None, augment=False) -> dict:
    """The training loop behind ``train_source`` and ``finetune``: Adam on the parameters that get
    gradients, ``Batches`` with ``seed``, ``method``'s loss (or ``source_loss_name``'s), the
    learning rate of ``lr_at``, the maps refreshed and the held-out Dice read as asked."""
    check_schedule(iterations, lr, batch_size)
    device = get_device(device)
    images, labels = stack_data(data)
    seed_everything(seed)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    batches = Batches(images.shape[0], batch_size, seed)
    aug_gen = torch.Generator().manual_seed(int(seed) + 7919) if augment else None
    if class_weight is not None:
        class_weight = class_weight.to(device)
    history = {"method": method, "loss": [], "eval": [], "refresh_seconds": []}
    t0 = time.perf_counter()
    for it in progress_bar(range(1, int(iterations) + 1), show_progress, desc):
        idx = batches.next()
        x, y = images[idx].to(device), labels[idx].to(device)
        t, h = maps.batch(idx) if maps is not None else (None, None)
        if aug_gen is not None:
            x, y = augment_batch(x, y, aug_gen)
        if source_loss_name is not None:  # source pre-training
            loss = source_loss(model(x), y, source_loss_name)
        else:
            loss = method_loss(method, model(x), y, hardness=h, class_weight=class_weight, base=base, tmap=t)
        for g in opt.param_groups:
            g["lr"] = lr_at(it, int(iterations), lr, lr_decay)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history["loss"].append(float(loss.detach()))
        if refresh_every and maps is not None and it % int(refresh_every) == 0 and it < iterations:
            maps = refreshed_maps(model, images, labels, maps.reading, patch, num_classes, device, history)
        if eval_data is not None and eval_every and (it % int(eval_every) == 0 or it == iterations):
            history["eval"].append({"iteration": it, **evaluate(model, eval_data, num_classes, device=device)})
            model.train()
    history["seconds"] = time.perf_counter() - t0
    if checkpoint_path is not None:
        atomic_torch_save({"state_dict": model.state_dict(), "history": history}, checkpoint_path)
    return history
