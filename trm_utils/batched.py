"""The batched engine: every run of a transfer cell fine-tuned at once (``finetune_cell``, the fast path;
``train.finetune`` is the readable reference it is tested against).

The paper's protocol freezes the encoder (weights and BatchNorm statistics) and uses no
augmentation, so the encoder's outputs on the target slices never change during fine-tuning.
Every method and seed of a cell fine-tunes a copy of the same source decoder on the same slices.
Two exact consequences, used here:

* ``EncoderCache``: the encoder runs once per slice and its outputs (every skip tensor) are kept;
  past a memory budget the encoder is recomputed per batch instead (same numbers, slower).
* one step for all runs: each run's decoder (``decode``) runs on its own batch of cached
  features, the runs' losses are summed and one backward pass and one Adam step update every
  run. Each run's parameters get the gradient of its own loss only, and Adam is elementwise,
  so one Adam over all the runs' parameters is M independent Adams.

Measured on 2 CPU cores (tutorial U-Net, 12 runs, one step): the M decoders as one
grouped-convolution network (``groups=M``) ran 2.2x faster than per-run steps in float32 but
was slower than M separate decoders in ``channels_last`` (oneDNN's grouped convolution backward
is slow on CPU), so the decoders stay separate modules and the speed comes from the cache,
``channels_last`` for narrow U-Nets on the CPU (``use_channels_last``), one backward and one fused Adam step (and bfloat16 autocast where the
processor has native BF16; see ``finetune_cell``'s ``precision``).

The engine in three parts: ``plan_cell`` prepares what every run shares (the slices, the maps,
the encoder caches, the memory plan of ``memory.py``: a cell's runs need not all fit in memory at
once, so they train in groups); a ``RunGroup`` trains its runs from start to end, one ``step``
(every run's loss, one backward, one Adam step) and one ``held_out_pass`` at a time;
``finetune_cell`` runs the groups one after another. Every run gets the same numbers whatever
the grouping.

``tests/test_batched.py`` checks the fast path against per-run ``train.finetune``, the grouping,
and the memory model against measured peaks.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .losses import check_method_reading, class_weights, get_method, method_loss
from .maps import prepare_loss_maps, transferability_maps
from .memory import cache_fits, cell_memory, eval_batch, memory_budget, pad_amount, plan_group_size
from .predict import infer_num_classes, score_predictions, stack_data, subjects_of
from .train import Batches, check_schedule, lr_at, refreshed_maps
from .unet import UNet2D, freeze_encoder, reset_head
from .utils import get_device, progress_bar, seed_everything


@torch.no_grad()
def encode(model: UNet2D, x: torch.Tensor) -> list:
    """The frozen encoder's outputs on ``x`` (B x C x H x W), shallowest first, deepest (the
    bottleneck) last, exactly as ``UNet2D.forward`` computes them in eval mode."""
    h, w = x.shape[-2:]
    ph, pw = pad_amount(model, h, w)
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    outs = []
    for i, block in enumerate(model.encoder):
        x = block(x if i == 0 else F.max_pool2d(x, 2))
        outs.append(x)
    return outs


class EncoderCache:
    """The encoder's outputs on a fixed set of images: computed once, or on demand.

    ``cached=True`` keeps every level's output for every slice (on ``device``);
    ``cached=False`` keeps only the images and runs the encoder on each requested batch (the
    fallback past the memory budget: the same numbers, at the cost of the encoder's forward pass).
    """

    def __init__(self, model: UNet2D, images: torch.Tensor, device, cached: bool, batch_size: int = 32,
                 channels_last: bool = False):
        self.model, self.device, self.cached = model, device, bool(cached)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.n = images.shape[0]
        if self.cached:
            levels = None
            for s in range(0, self.n, batch_size):
                outs = encode(model, images[s:s + batch_size].to(device))
                if levels is None:
                    levels = [torch.empty((self.n, *o.shape[1:]), dtype=o.dtype, device=device)
                              .contiguous(memory_format=self.memory_format) for o in outs]
                for lv, o in zip(levels, outs):
                    lv[s:s + o.shape[0]] = o
            self.levels = levels
        else:
            self.images = images

    def get(self, idx: torch.Tensor) -> list:
        """Every level's outputs for the slices ``idx`` (a 1-D index tensor, repeats allowed)."""
        if self.cached:
            idx = idx.to(self.device)
            outs = [lv.index_select(0, idx) for lv in self.levels]
        else:
            outs = encode(self.model, self.images[idx.cpu()].to(self.device))
        return [o.contiguous(memory_format=self.memory_format) for o in outs]


def decode(model: UNet2D, levels: list) -> torch.Tensor:
    """The decoder and head of ``model`` on encoder ``levels`` (as ``encode`` returns them):
    the second half of ``UNet2D.forward``, before the crop back to the input size."""
    levels = list(levels)
    x = levels.pop()
    for up in model.decoder:
        x = up(x, levels.pop())
    return model.head(x)


#: On the CPU the decoders run in ``channels_last`` only for U-Nets this narrow or narrower
#: (``use_channels_last``). Measured on 2 AVX2 cores (AMD EPYC), one decoder step (forward and
#: backward, batch 8): the tutorial's U-Net (base 8, 64 px) 27.6 ms channels-last against 34.9 ms
#: contiguous; the paper's (base 64, 128 px) 6.40 s against 4.99 s (the full U-Net contiguous,
#: as the per-run loop runs it: 6.08 s, so channels-last made the cached path slower than no cache).
CPU_CHANNELS_LAST_MAX_BASE = 16


def use_channels_last(model: UNet2D, device) -> bool:
    """``finetune_cell``'s ``channels_last="auto"``: the channels-last memory layout on the CPU for
    narrow U-Nets (``base_channels`` <= ``CPU_CHANNELS_LAST_MAX_BASE``), where oneDNN's channels-last
    kernels were measured faster; contiguous otherwise (the paper's U-Net on the CPU, measured slower
    in channels-last; on CUDA PyTorch's default layout, until ``benchmarks/gpu_check.py``, which
    times both, says otherwise). Either layout gives the same numbers up to float rounding."""
    return torch.device(device).type == "cpu" and int(model.base_channels) <= CPU_CHANNELS_LAST_MAX_BASE


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


@dataclass
class CellPlan:
    """What every run group of a cell shares (``plan_cell``): the stacked training slices, the maps
    of each reading the runs use, the encoder caches of the training and held-out slices, the class
    weights, the numeric settings and the group size."""

    specs: list
    images: torch.Tensor
    labels: torch.Tensor
    labels_d: torch.Tensor  # the labels on the device
    num_classes: int
    device: torch.device
    amp: Optional[torch.dtype]
    channels_last: bool
    maps: dict  # reading -> LossMaps on the device
    train_cache: "EncoderCache"
    eval_cache: Optional["EncoderCache"]
    ev_labels: Optional[torch.Tensor]
    ev_subjects: Optional[np.ndarray]
    ev_batch: int
    class_weight: Optional[torch.Tensor]
    cached: bool
    group_size: int
    iterations: int
    lr: float
    lr_decay: Optional[float]
    batch_size: int
    patch: int
    eval_every: Optional[int]

    @property
    def size(self) -> tuple:
        return tuple(self.images.shape[-2:])


def _cell_maps(model, images, labels, specs, maps, c_t, patch, device) -> dict:
    """The maps of every reading the runs use (computed with ``model`` as the source when ``maps``
    is None), as ``LossMaps`` on the device, shared by every group."""
    need = tuple(dict.fromkeys(s["reading"] for s in specs if get_method(s["method"]).needs_map))
    if maps is None and need:
        maps = transferability_maps(model, (images, labels), need, patch, c_t, device=device)
    return {r: prepare_loss_maps(maps, model, images, labels, c_t, r, patch, device) for r in need}


def _cell_memory(enc, n_train, n_ev, h, w, batch_size, c_t, n_runs, device, cache_budget_mb, memory_budget_mb,
                 group_size) -> tuple:
    """``(cached, group size)``: whether the encoder outputs are cached (they fit ``cache_budget_mb``
    and leave room for one run within the memory budget) and how many runs train together
    (``memory.plan_group_size``)."""
    budget = memory_budget(device, memory_budget_mb)
    n = n_train + n_ev
    cached = cache_fits(enc, n, h, w, cache_budget_mb)
    if cached and cell_memory(enc, h, w, batch_size, 1, n, c_t, n_ev)["peak"] > budget:
        cached = False  # the cache itself would not leave room for one run: recompute instead
    memory = lambda g: cell_memory(enc, h, w, batch_size, g, n if cached else 0, c_t, n_ev)  # noqa: E731
    return cached, plan_group_size(n_runs, memory, budget, device, group_size)


def plan_cell(model, data, specs, maps, *, iterations, lr, batch_size, patch, num_classes, eval_data, eval_every,
              device, cache_budget_mb, precision, channels_last, lr_decay, group_size, memory_budget_mb,
              cache_held_out=True) -> CellPlan:
    """Everything ``finetune_cell``'s run groups share, prepared once: the slices, the maps, the
    memory plan (``_cell_memory``), the encoder caches and the class weights (``finetune_cell``'s
    arguments, its ``runs`` already checked into ``specs``)."""
    images, labels = stack_data(data)
    c_t = infer_num_classes(data, labels, num_classes)
    device = get_device(device)
    amp = _autocast_dtype(precision, device)
    model.to(device)
    shared = _cell_maps(model, images, labels, specs, maps, c_t, patch, device)
    if channels_last == "auto":
        channels_last = use_channels_last(model, device)
    channels_last = bool(channels_last)
    H, W = images.shape[-2:]
    ev_images = ev_labels = ev_subjects = None
    if eval_data is not None and eval_every:
        ev_images, ev_labels = stack_data(eval_data)
        ev_subjects = subjects_of(eval_data, ev_labels)
    n_ev = ev_images.shape[0] if ev_images is not None else 0
    enc = copy.deepcopy(model).eval()
    cached, G = _cell_memory(enc, images.shape[0], n_ev, H, W, batch_size, c_t, len(specs), device, cache_budget_mb,
                             memory_budget_mb, group_size)
    ev_batch = eval_batch(enc, H, W, c_t)
    train_cache = EncoderCache(enc, images, device, cached, channels_last=channels_last)
    eval_cache = EncoderCache(enc, ev_images, device, cached and bool(cache_held_out),
                              channels_last=channels_last) if n_ev else None
    cw = class_weights(torch.bincount(labels.reshape(-1), minlength=c_t)).to(device) \
        if any(get_method(s["method"]).weight == "class" for s in specs) else None
    return CellPlan(specs, images, labels, labels.to(device), c_t, device, amp, channels_last, shared, train_cache, eval_cache,
                    ev_labels, ev_subjects, ev_batch, cw, cached, G, int(iterations), lr, lr_decay, batch_size, patch,
                    int(eval_every) if eval_every else None)


class RunGroup:
    """The runs ``group`` (indices into ``plan.specs``) of a cell, trained together from start to end:
    each its own copy of the source (head seeded as ``finetune`` seeds it, encoder frozen), batch
    sequence and maps; one Adam over all their decoders (``step``); one held-out pass for all
    (``held_out_pass``). ``hist`` is the cell's list of histories; this group fills its runs' entries."""

    def __init__(self, plan: CellPlan, model: UNet2D, group: list, hist: list):
        self.plan, self.group = plan, group
        self.specs = [plan.specs[i] for i in group]
        self.hist = [hist[i] for i in group]
        fmt = torch.channels_last if plan.channels_last else torch.contiguous_format
        self.models = []
        for s in self.specs:
            m = copy.deepcopy(model)
            seed_everything(s["seed"])
            if m.num_classes != plan.num_classes:
                reset_head(m, plan.num_classes)
            self.models.append(freeze_encoder(m).to(plan.device, memory_format=fmt).train())
        params = [p for m in self.models for p in m.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(params, lr=plan.lr, foreach=True)  # one multi-tensor step for the group's runs
        n = plan.images.shape[0]
        self.batches = [Batches(n, plan.batch_size, s["seed"]) for s in self.specs]
        self.maps = [plan.maps[s["reading"]] if get_method(s["method"]).needs_map else None for s in self.specs]

    def forward(self, m: int, levels: list) -> torch.Tensor:
        """Run ``m``'s decoder and head on encoder ``levels``: float32 logits cropped to the slices' size."""
        H, W = self.plan.size
        with torch.autocast(self.plan.device.type, dtype=self.plan.amp, enabled=self.plan.amp is not None):
            out = decode(self.models[m], levels)
        return out[..., :H, :W].float()

    def step(self, it: int) -> None:
        """Iteration ``it``: every run's loss on its own batch, one backward pass and one Adam step
        for all, the losses recorded, then the maps of runs whose ``refresh_every`` is due."""
        p = self.plan
        losses = []
        for m, s in enumerate(self.specs):  # each run its own batch sequence, loss and weights
            idx = self.batches[m].next().to(p.device)
            t, h = self.maps[m].batch(idx) if self.maps[m] is not None else (None, None)
            losses.append(method_loss(s["method"], self.forward(m, p.train_cache.get(idx)), p.labels_d[idx],
                                      hardness=h, class_weight=p.class_weight, base=s["base"], tmap=t))
        losses = torch.stack(losses)
        for g in self.opt.param_groups:
            g["lr"] = lr_at(it, p.iterations, p.lr, p.lr_decay)
        self.opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        self.opt.step()
        for h, v in zip(self.hist, losses.detach().cpu().tolist()):
            h["loss"].append(v)
        due = [m for m, s in enumerate(self.specs)
               if s["refresh_every"] and self.maps[m] is not None and it % int(s["refresh_every"]) == 0
               and it < p.iterations]
        for m in due:  # each run's maps from its own current model, as finetune recomputes them
            self.maps[m] = refreshed_maps(self.models[m], p.images, p.labels, self.specs[m]["reading"], p.patch,
                                          p.num_classes, p.device, self.hist[m])

    @torch.no_grad()
    def held_out_pass(self, it: int) -> None:
        """Every run's held-out Dice at iteration ``it`` (``predict.score_predictions``): one pass over
        the held-out slices' encoder outputs (cached once per cell when they fit, ``plan_cell``; else
        the encoder runs again, once per batch for all the group's runs), each run's decoder on them,
        its predicted labels kept at one byte a pixel. A label is the argmax of the logits: the
        softmax ``predict.evaluate`` takes first is monotonic, so it would pick the same class
        (``tests/test_batched.py`` checks the Dice against ``evaluate`` of the fine-tuned models)."""
        p, G = self.plan, len(self.models)
        n = p.ev_labels.shape[0]
        preds = torch.empty((G, *p.ev_labels.shape), dtype=torch.uint8 if p.num_classes <= 256 else torch.long)
        for m in self.models:
            m.eval()
        try:
            for s0 in range(0, n, p.ev_batch):
                sl = slice(s0, min(n, s0 + p.ev_batch))
                lv = p.eval_cache.get(torch.arange(sl.start, sl.stop))
                for m in range(G):
                    preds[m, sl] = self.forward(m, lv).argmax(1).cpu()
        finally:
            for m in self.models:
                m.train()
        for m in range(G):
            self.hist[m]["eval"].append({"iteration": it, **score_predictions(preds[m], p.ev_labels, p.ev_subjects,
                                                                               p.num_classes)})

    def train(self, show_progress: bool) -> None:
        """Every iteration of the group's runs, the held-out pass every ``eval_every`` and at the end."""
        p, M = self.plan, len(self.plan.specs)
        desc = f"cell ({M} runs)" if len(self.group) == M else f"cell runs {self.group[0] + 1}-{self.group[-1] + 1} of {M}"
        for it in progress_bar(range(1, p.iterations + 1), show_progress, desc):
            self.step(it)
            if p.eval_cache is not None and (it % p.eval_every == 0 or it == p.iterations):
                self.held_out_pass(it)


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
    cache_held_out: bool = True,
):
    """Fine-tune every run of one transfer cell (one source ``model``, one target ``data``) at once.

    Gives each run what ``finetune(copy.deepcopy(model), data, method, maps, ..., seed=seed)``
    gives it: the same head initialisation, batch sequence, loss (eq. 7 for ``trm``), Adam
    state and BatchNorm statistics (tested to float tolerance in float32), but computed
    together: the frozen encoder's outputs on the slices are computed once
    (``EncoderCache``), every run's decoder runs on its own batch of them, and one
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
            or not (False); ``"auto"`` (default): ``use_channels_last``'s measured rule
            (on the CPU for narrow U-Nets like the tutorial's, where it is faster; contiguous for the
            paper's, where it was slower). The same numbers up to float rounding.
        return_models: also return the M fine-tuned models (copies of ``model``).
        lr_decay: as in ``finetune`` (the same schedule for every run).
        group_size: how many runs train together (``"auto"``, the default, or a number). The
            runs are split into groups trained one after another, each from start to end; the
            encoder cache and the maps are shared by all groups. Every run gets the same numbers
            whatever the grouping (tested). ``"auto"``: the most runs whose predicted peak
            (``memory.cell_memory``) fits ``memory_budget_mb``; on the CPU 1 when a run's step is
            large (the measured rule: ``memory.plan_group_size``).
        memory_budget_mb: the memory the cell may use; default: the GPU's free memory less a
            margin, or half the memory the system reports available (``memory.memory_budget``).
            A group that does not fit raises ``MemoryError`` naming the budget and what to change.
        cache_held_out: keep the held-out slices' encoder outputs beside the training slices' (the
            default, within ``cache_budget_mb``), or run the encoder again at every held-out pass
            (False: the plain pass, which ``benchmarks/held_out_pass.py`` times against the cached
            one). The same numbers either way.

    Returns:
        one history per run, in ``finetune``'s format (``method``, ``loss`` per iteration,
        ``eval`` [{iteration, dice, dice_per_class, n_subjects}], ``refresh_seconds``,
        ``seconds``: the cell's time divided by the number of runs), plus ``seed``, ``base``,
        ``cell_seconds``, ``encoder_cached``, ``precision``, ``group_size`` and ``channels_last``; with
        ``return_models``,
        ``(histories, models)``.
    """
    check_schedule(iterations, lr, batch_size)
    specs = [_run_spec(r) for r in runs]
    if not specs:
        raise ValueError("runs is empty; give at least one (method, seed)")
    plan = plan_cell(model, data, specs, maps, iterations=iterations, lr=lr, batch_size=batch_size, patch=patch,
                     num_classes=num_classes, eval_data=eval_data, eval_every=eval_every, device=device,
                     cache_budget_mb=cache_budget_mb, precision=precision, channels_last=channels_last,
                     lr_decay=lr_decay, group_size=group_size, memory_budget_mb=memory_budget_mb,
                     cache_held_out=cache_held_out)
    hist = [{"method": s["method"], "seed": s["seed"], "base": s["base"], "reading": s["reading"], "loss": [], "eval": [],
             "refresh_seconds": []}
            for s in specs]
    out_models = []
    M, G = len(specs), plan.group_size
    t0 = time.perf_counter()
    for g0 in range(0, M, G):
        group = RunGroup(plan, model, list(range(g0, min(M, g0 + G))), hist)
        group.train(show_progress)
        if return_models:
            out_models.extend(m.to(memory_format=torch.contiguous_format).eval() for m in group.models)
    seconds = time.perf_counter() - t0
    for h in hist:
        h.update(seconds=seconds / M, cell_seconds=seconds, encoder_cached=plan.cached,
                 precision="bf16" if plan.amp is not None else "fp32", group_size=G, channels_last=plan.channels_last)
    if not return_models:
        return hist
    return hist, out_models
