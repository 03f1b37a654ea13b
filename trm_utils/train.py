"""Source pre-training, risk-map computation and weighted fine-tuning (paper, section III-B).

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

import copy
import time
from typing import Optional

import numpy as np
import torch

from .losses import check_method_reading, check_source_loss, class_weights, get_method, method_loss, source_loss
from .maps import LossMaps, loss_maps, transferability, transferability_maps  # noqa: F401 (transferability: kept importable here)
from .metrics import dice_counts, dice_from_counts
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


def lr_at(it: int, iterations: int, lr: float, decay: Optional[float]) -> float:
    """The learning rate of iteration ``it`` (1-based): ``lr`` throughout, or with ``decay`` = f,
    constant for the first (1 - f) of the run and then falling linearly to ``lr / (f T)`` at the
    last iteration T (a decay over the final part of a run steadies a noisy curve's end; the
    preset says when it is used)."""
    if not decay:
        return lr
    span = max(1.0, float(decay) * iterations)
    return lr * min(1.0, (iterations - it + 1) / span)


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
    c = _num_classes(data, labels, num_classes)
    preds = torch.empty_like(labels)
    for sl, probs in predict_probs(model, images, batch_size, device):
        preds[sl] = probs.argmax(1).cpu()
    return score_predictions(preds, labels, _subjects_of(data, labels), c)


def _subjects_of(data, labels) -> np.ndarray:
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


def _prepare_maps(maps, model, images, labels, c_t, reading, patch, device) -> LossMaps:
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
    c_t = _num_classes(data, labels, num_classes)
    m = get_method(method)
    check_method_reading(method, reading)
    device_t = get_device(device)
    model.to(device_t)
    lmaps = _prepare_maps(maps, model, images, labels, c_t, reading, patch, device_t) if m.needs_map else None
    seed_everything(seed)  # the head re-initialisation is seeded too
    if model.num_classes != c_t:
        reset_head(model, c_t)
    freeze_encoder(model)
    cw = class_weights(torch.bincount(labels.reshape(-1), minlength=c_t)) if m.weight == "class" else None
    return _fit(model, (images, labels), method, iterations, lr, batch_size, device=device_t, seed=seed,
                show_progress=show_progress, checkpoint_path=checkpoint_path, desc=method, maps=lmaps,
                class_weight=cw, base=base, refresh_every=refresh_every, eval_data=eval_data,
                eval_every=eval_every, num_classes=c_t, lr_decay=lr_decay, patch=patch)


def _fit(model, data, method, iterations, lr, batch_size, *, device, seed, show_progress, checkpoint_path, desc,
         maps=None, class_weight=None, base=10.0, refresh_every=None, eval_data=None, eval_every=None,
         num_classes=None, lr_decay=None, patch=1, source_loss_name=None, augment=False) -> dict:
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
    aug_gen = torch.Generator().manual_seed(int(seed) + 7919) if augment else None
    if class_weight is not None:
        class_weight = class_weight.to(device)
    history = {"method": method, "loss": [], "eval": [], "refresh_seconds": []}
    t0 = time.perf_counter()
    for it in _progress(range(1, int(iterations) + 1), show_progress, desc):
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
            tr = time.perf_counter()
            maps = loss_maps(transferability_maps(model, (images, labels), (maps.reading,), patch, num_classes,
                                                  device=device), maps.reading).to(device)
            model.train()
            history["refresh_seconds"].append(time.perf_counter() - tr)
        if eval_data is not None and eval_every and (it % int(eval_every) == 0 or it == iterations):
            history["eval"].append({"iteration": it, **evaluate(model, eval_data, num_classes, device=device)})
            model.train()
    history["seconds"] = time.perf_counter() - t0
    if checkpoint_path is not None:
        atomic_torch_save({"state_dict": model.state_dict(), "history": history}, checkpoint_path)
    return history


# ---------------------------------------------------------------------------------------
# every run of a transfer cell at once (the fast path; ``finetune`` is the reference)
# ---------------------------------------------------------------------------------------

#: Default memory budget (MB) for the cached encoder outputs of one cell (train + held-out
#: slices). The tutorial preset needs about 0.25 MB per slice, the paper preset about 28 MB
#: (240 px): past the budget the encoder is recomputed per batch instead, with the same results.
CACHE_BUDGET_MB = 2048


def _run_spec(run) -> dict:
    """A run of ``finetune_cell``: ``(method, seed)``, ``(method, seed, {options})`` or a dict
    with ``method``, ``seed`` and optionally ``base``, ``refresh_every`` and ``reading``."""
    if isinstance(run, dict):
        spec = dict(run)
    elif isinstance(run, (tuple, list)) and len(run) in (2, 3):
        spec = {"method": run[0], "seed": run[1], **(run[2] if len(run) == 3 else {})}
    else:
        raise ValueError(f"a run is (method, seed), (method, seed, options) or a dict, got {run!r}")
    unknown = set(spec) - {"method", "seed", "base", "refresh_every", "reading"}
    if unknown:
        raise ValueError(f"unknown run options {sorted(unknown)}; a run takes method, seed, base, refresh_every, reading")
    get_method(spec["method"])
    spec["reading"] = spec.get("reading") or "dataset"
    check_method_reading(spec["method"], spec["reading"])
    if not isinstance(spec.get("seed"), (int, np.integer)) or spec["seed"] < 0:
        raise ValueError(f"run {spec}: seed must be a non-negative integer")
    spec["seed"] = int(spec["seed"])
    spec["base"] = float(spec.get("base", 10.0))
    spec["refresh_every"] = spec.get("refresh_every") or None
    return spec


def bf16_native() -> bool:
    """Whether bfloat16 autocast pays on this machine's default device: a CUDA GPU that
    supports it, or a CPU with native BF16 instructions (AVX-512 BF16 or AMX)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def _autocast_dtype(precision: str, device: torch.device):
    if precision not in ("fp32", "bf16", "auto"):
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'auto', got {precision!r}")
    if precision == "fp32" or (precision == "auto" and not bf16_native()):
        return None
    return torch.bfloat16


def finetune_cell(
    model: UNet2D,
    data,
    runs,
    maps=None,
    iterations: int = 5000,
    lr: float = 1e-4,
    batch_size: int = 8,
    *,
    patch: int = 1,
    num_classes: Optional[int] = None,
    eval_data=None,
    eval_every: Optional[int] = None,
    device="auto",
    show_progress: bool = True,
    cache_budget_mb: Optional[float] = CACHE_BUDGET_MB,
    precision: str = "fp32",
    channels_last="auto",
    return_models: bool = False,
    lr_decay: Optional[float] = None,
    group_size="auto",
    memory_budget_mb: Optional[float] = None,
):
    """Fine-tune every run of one transfer cell (one source ``model``, one target ``data``) at once.

    Gives each run what ``finetune(copy.deepcopy(model), data, method, maps, ..., seed=seed)``
    gives it: the same head initialisation, batch sequence, loss (eq. 7 for ``trm``), Adam
    state and BatchNorm statistics (tested to float tolerance in float32), but computed
    together: the frozen encoder's outputs on the slices are computed once
    (``batched.EncoderCache``), every run's decoder runs on its own batch of them, and one
    backward pass and one Adam step over all runs' parameters update every run (each run's
    parameters see only its own loss; Adam is elementwise: M independent Adams).

    Args:
        model: the source U-Net (left unchanged).
        runs: a list of ``(method, seed)``, ``(method, seed, {"base": b, "refresh_every": k,
            "reading": "image"})`` or dicts with those keys. ``refresh_every`` recomputes that run's
            maps with its own current model every k iterations; ``reading`` picks the reading of
            eq. 4 its weight uses (``"dataset"``, the default, or ``"image"``).
        maps: the source's transferability maps on ``data`` (``maps.transferability_maps``'s
            result holding every reading the runs use); computed here, in the readings the runs
            need, when None.
        patch: the dataset-level map's patch size (the preset's ``map_patch``).
        eval_data, eval_every: held-out Dice of every run every k iterations (and at the end),
            from one shared pass of the encoder; for analysis only, never used to pick a model.
        cache_budget_mb: the memory allowed for the cached encoder outputs of the training and
            held-out slices (``encoder_bytes_per_slice`` per slice, float32); past it (or with 0)
            the encoder is recomputed for every batch: the same numbers, slower. ``None``: no limit.
        precision: ``"fp32"`` (default; exact), ``"bf16"`` (bfloat16 autocast of the decoder's
            forward pass; the loss, Adam and the weights stay float32) or ``"auto"`` (bf16 only
            where the hardware does it natively, see ``bf16_native``). ``make bench`` measures
            what bf16 buys (where it is emulated, what it costs); ``benchmarks/gpu_check.py`` how
            much it moves the held-out Dice against the spread over seeds.
        channels_last: keep decoders and features in the channels-last memory layout (True),
            or not (False); ``"auto"`` (default): ``batched.use_channels_last``'s measured rule
            (on the CPU for narrow U-Nets like the tutorial's, where it is faster; contiguous for the
            paper's, where it was slower). The same numbers up to float rounding.
        return_models: also return the M fine-tuned models (copies of ``model``).
        lr_decay: as in ``finetune`` (the same schedule for every run).
        group_size: how many runs train together (``"auto"``, the default, or a number). The
            runs are split into groups trained one after another, each from start to end; the
            encoder cache and the maps are shared by all groups. Every run gets the same numbers
            whatever the grouping (tested). ``"auto"``: the most runs whose predicted peak
            (``batched.cell_memory``) fits ``memory_budget_mb``; on the CPU 1 when a run's step is
            large (the measured rule: ``batched.plan_group_size``).
        memory_budget_mb: the memory the cell may use; default: the GPU's free memory less a
            margin, or half the memory the system reports available (``batched.memory_budget``).
            A group that does not fit raises ``MemoryError`` naming the budget and what to change.

    Returns:
        one history per run, in ``finetune``'s format (``method``, ``loss`` per iteration,
        ``eval`` [{iteration, dice, dice_per_class, n_subjects}], ``refresh_seconds``,
        ``seconds``: the cell's time divided by the number of runs), plus ``seed``, ``base``,
        ``cell_seconds``, ``encoder_cached``, ``precision``, ``group_size`` and ``channels_last``; with
        ``return_models``,
        ``(histories, models)``.
    """
    from .batched import (EncoderCache, cache_fits, cell_memory, decode, eval_batch, memory_budget, plan_group_size,
                          use_channels_last)

    if int(iterations) < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if lr <= 0 or batch_size < 1:
        raise ValueError(f"lr must be > 0 and batch_size >= 1, got lr={lr}, batch_size={batch_size}")
    specs = [_run_spec(r) for r in runs]
    if not specs:
        raise ValueError("runs is empty; give at least one (method, seed)")
    images, labels = stack_data(data)
    c_t = _num_classes(data, labels, num_classes)
    device = get_device(device)
    amp = _autocast_dtype(precision, device)
    model.to(device)
    need = tuple(dict.fromkeys(s["reading"] for s in specs if get_method(s["method"]).needs_map))
    if maps is None and need:
        maps = transferability_maps(model, (images, labels), need, patch, c_t, device=device)
    shared = {r: _prepare_maps(maps, model, images, labels, c_t, r, patch, device) for r in need}
    if channels_last == "auto":
        channels_last = use_channels_last(model, device)
    channels_last = bool(channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    M, N = len(specs), images.shape[0]
    H, W = images.shape[-2:]
    if eval_data is None or not eval_every:
        eval_data = None
    else:
        ev_images, ev_labels = stack_data(eval_data)
        ev_subjects = _subjects_of(eval_data, ev_labels)
    n_ev = ev_images.shape[0] if eval_data is not None else 0
    enc = copy.deepcopy(model).eval()
    budget = memory_budget(device, memory_budget_mb)
    cached = cache_fits(enc, N + n_ev, H, W, cache_budget_mb)
    if cached and cell_memory(enc, H, W, batch_size, 1, N + n_ev, c_t, n_ev)["peak"] > budget:
        cached = False  # the cache itself would not leave room for one run: recompute instead
    memory = lambda g: cell_memory(enc, H, W, batch_size, g, (N + n_ev) if cached else 0, c_t, n_ev)  # noqa: E731
    G = plan_group_size(M, memory, budget, device, group_size)
    ev_batch = eval_batch(enc, H, W, c_t)
    train_cache = EncoderCache(enc, images, device, cached, channels_last=channels_last)
    eval_cache = EncoderCache(enc, ev_images, device, cached, channels_last=channels_last) if eval_data is not None else None
    labels_d = labels.to(device)
    cw = class_weights(torch.bincount(labels.reshape(-1), minlength=c_t)).to(device) \
        if any(get_method(s["method"]).weight == "class" for s in specs) else None
    hist = [{"method": s["method"], "seed": s["seed"], "base": s["base"], "reading": s["reading"], "loss": [], "eval": [],
             "refresh_seconds": []}
            for s in specs]
    out_models = []

    def train_group(group):  # the runs ``group`` (indices into specs) trained together from start to end
        gspecs = [specs[i] for i in group]
        ghist = [hist[i] for i in group]
        models = []
        for s in gspecs:  # each run's copy, its head seeded as finetune seeds it
            m = copy.deepcopy(model)
            seed_everything(s["seed"])
            if m.num_classes != c_t:
                reset_head(m, c_t)
            models.append(freeze_encoder(m).to(device, memory_format=fmt).train())
        params = [p for m in models for p in m.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr, foreach=True)  # one multi-tensor step for the group's runs
        batches = [_Batches(N, batch_size, s["seed"]) for s in gspecs]
        lmaps = [shared[s["reading"]] if get_method(s["method"]).needs_map else None for s in gspecs]
        G_ = len(gspecs)

        def forward(m, levels):
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                out = decode(models[m], levels)
            return out[..., :H, :W].float()

        @torch.no_grad()
        def probs_all(cache, n):  # softmax of every run of the group on every slice of ``cache``
            for m in models:
                m.eval()
            try:
                for s0 in range(0, n, ev_batch):
                    sl = slice(s0, min(n, s0 + ev_batch))
                    lv = cache.get(torch.arange(sl.start, sl.stop))
                    yield sl, {m: torch.softmax(forward(m, lv), dim=1) for m in range(G_)}
            finally:
                for m in models:
                    m.train()

        def refresh(which):  # each run's maps from its own current model, as finetune recomputes them
            for m in which:
                t0 = time.perf_counter()
                r = gspecs[m]["reading"]
                lmaps[m] = loss_maps(transferability_maps(models[m], (images, labels), (r,), patch, c_t, device=device),
                                     r).to(device)
                models[m].train()
                ghist[m]["refresh_seconds"].append(time.perf_counter() - t0)

        def evaluate_all(it):
            preds = torch.empty((G_, *ev_labels.shape), dtype=torch.uint8 if c_t <= 256 else torch.long)  # 1 byte a pixel
            for sl, p in probs_all(eval_cache, n_ev):
                for m in range(G_):
                    preds[m, sl] = p[m].argmax(1).cpu()
            for m in range(G_):
                ghist[m]["eval"].append({"iteration": it, **score_predictions(preds[m], ev_labels, ev_subjects, c_t)})

        desc = f"cell ({M} runs)" if G_ == M else f"cell runs {group[0] + 1}-{group[-1] + 1} of {M}"
        for it in _progress(range(1, int(iterations) + 1), show_progress, desc):
            losses = []
            for m, s in enumerate(gspecs):  # each run its own batch sequence, loss and weights
                idx = batches[m].next().to(device)
                t, h = lmaps[m].batch(idx) if lmaps[m] is not None else (None, None)
                losses.append(method_loss(s["method"], forward(m, train_cache.get(idx)), labels_d[idx],
                                          hardness=h, class_weight=cw, base=s["base"], tmap=t))
            losses = torch.stack(losses)
            for g in opt.param_groups:
                g["lr"] = lr_at(it, int(iterations), lr, lr_decay)
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            opt.step()
            for h, v in zip(ghist, losses.detach().cpu().tolist()):
                h["loss"].append(v)
            due = [m for m, s in enumerate(gspecs)
                   if s["refresh_every"] and lmaps[m] is not None and it % int(s["refresh_every"]) == 0 and it < iterations]
            if due:
                refresh(due)
            if eval_cache is not None and (it % int(eval_every) == 0 or it == iterations):
                evaluate_all(it)
        if return_models:
            out_models.extend(m.to(memory_format=torch.contiguous_format).eval() for m in models)

    t0 = time.perf_counter()
    for g0 in range(0, M, G):
        train_group(list(range(g0, min(M, g0 + G))))
    seconds = time.perf_counter() - t0
    for h in hist:
        h.update(seconds=seconds / M, cell_seconds=seconds, encoder_cached=cached,
                 precision="bf16" if amp is not None else "fp32", group_size=G, channels_last=channels_last)
    if not return_models:
        return hist
    return hist, out_models
