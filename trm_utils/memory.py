"""How much memory a transfer cell takes, and how many of its runs train together.

``batched.finetune_cell`` trains a cell's runs in groups; ``cell_memory`` predicts the peak of a
group from the U-Net's shape, the image size, the batch and the group size, ``memory_budget`` says
what the device allows, and ``plan_group_size`` picks the group size (what fits; on the CPU, runs
with large steps one at a time, where grouping was measured to be slower). Checked against measured
peaks by ``benchmarks/memory_model.py`` and ``tests/test_batched.py``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .unet import UNet2D


def pad_amount(model: UNet2D, h: int, w: int):
    """Rows and columns of zeros ``UNet2D.forward`` adds so that H and W divide by 2**depth."""
    m = 2**model.depth
    return (-h) % m, (-w) % m


def encoder_bytes_per_slice(model: UNet2D, h: int, w: int, dtype=torch.float32) -> int:
    """Bytes of the encoder's outputs for one slice (what the cache holds per slice)."""
    ph, pw = pad_amount(model, h, w)
    hh, ww = h + ph, w + pw
    n = sum(model.base_channels * 2**i * (hh // 2**i) * (ww // 2**i) for i in range(model.depth + 1))
    return n * torch.tensor([], dtype=dtype).element_size()


def cache_fits(model: UNet2D, n_slices: int, h: int, w: int, budget_mb: Optional[float]) -> bool:
    """Whether ``n_slices`` slices' encoder outputs fit in ``budget_mb`` megabytes (None: no limit)."""
    if budget_mb is None:
        return True
    return n_slices * encoder_bytes_per_slice(model, h, w) <= float(budget_mb) * 2**20


#: Bytes the CUDA context, cuDNN workspaces and allocator fragmentation may take beyond what the
#: model below counts: the safety margin subtracted from a GPU's free memory (plus 10 % of it).
CUDA_MARGIN_MB = 768
#: ``finetune_cell``'s held-out pass: slices per forward pass, fewer when they would need more than
#: ``EVAL_MB`` megabytes (see ``eval_batch``).
EVAL_BATCH = 32
EVAL_MB = 512
#: On the CPU, ``plan_group_size`` groups runs only when one run's step keeps at most this much for
#: backward (the tutorial's U-Net: 12 MB; the paper's at 240 px: 1.3 GB).
CPU_GROUP_MAX_ACTIVATION_MB = 64


def _levels(model: UNet2D, h: int, w: int):
    """(channels, pixels per slice) of each U-Net level after padding, shallowest first."""
    ph, pw = pad_amount(model, h, w)
    hh, ww = h + ph, w + pw
    return [(model.base_channels * 2**i, (hh // 2**i) * (ww // 2**i)) for i in range(model.depth + 1)]


def param_bytes(model: torch.nn.Module, trainable: Optional[bool] = None) -> int:
    """Bytes of ``model``'s parameters and buffers (``trainable``: only those that do / do not
    get gradients once the encoder is frozen, i.e. the decoder and head / the encoder)."""
    enc = {id(p) for p in model.encoder.parameters()} if hasattr(model, "encoder") else set()
    n = 0
    for p in model.parameters():
        if trainable is None or trainable == (id(p) not in enc):
            n += p.numel() * p.element_size()
    if trainable in (None, False):
        n += sum(b.numel() * b.element_size() for b in model.buffers())
    return n


def step_activation_bytes(model: UNet2D, h: int, w: int, batch_size: int, num_classes: int) -> int:
    """What autograd keeps for one run's training step (float32), counted layer by layer.

    Per decoder level with ``c`` channels and ``p`` pixels per slice: the concatenation (2c, kept
    by the first convolution), each convolution's output (c, kept by its BatchNorm) and each
    BatchNorm/ReLU output (c, ReLU is in place; kept by the ReLU and the next convolution): 6 c p.
    The bottleneck (kept by the deepest transposed convolution), the head's logits and the loss's
    log-probabilities and weights (3 x classes x p at full size) complete it. The skip tensors
    themselves are not kept (concatenation does not save its inputs).
    """
    lv = _levels(model, h, w)
    n = sum(6 * c * p for c, p in lv[:-1]) + lv[-1][0] * lv[-1][1] + 3 * num_classes * lv[0][1]
    return 4 * batch_size * n


def backward_transient_bytes(model: UNet2D, h: int, w: int, batch_size: int) -> int:
    """The gradients alive beside the saved tensors when backward starts: the gradient of the top
    decoder level's last output and of its input (2c per full-size pixel); from there on, every
    step of backward frees the tensors it had saved."""
    c, p = _levels(model, h, w)[0]
    return 4 * batch_size * 2 * c * p


def eval_batch(model: UNet2D, h: int, w: int, num_classes: int) -> int:
    """Slices per held-out forward pass: ``EVAL_BATCH``, fewer when their no-grad forward pass
    would need more than ``EVAL_MB`` (32 slices of the paper's U-Net at 240 px would need about
    3.3 GB; the tutorial's need 31 MB)."""
    per_slice = eval_transient_bytes(model, h, w, 1, num_classes, 1)
    return int(max(1, min(EVAL_BATCH, EVAL_MB * 2**20 // per_slice)))


def eval_transient_bytes(model: UNet2D, h: int, w: int, n: int, num_classes: int, runs: int, n_eval: int = 0) -> int:
    """The held-out pass on ``n`` slices at a time (no gradients): the encoder outputs of the slices,
    the largest decoder level's live tensors (the skip, the concatenation and a convolution's
    output: 4c), every run's softmax (kept until all runs have seen the batch), and every run's
    predicted labels on all ``n_eval`` held-out slices (one byte a pixel)."""
    lv = _levels(model, h, w)
    c, p = lv[0]
    enc = sum(ci * pi for ci, pi in lv)
    return 4 * n * (enc + 4 * c * p + runs * 2 * num_classes * p) + runs * n_eval * h * w


def cell_memory(model: UNet2D, h: int, w: int, batch_size: int, group_size: int, n_cached: int = 0,
                num_classes: Optional[int] = None, n_eval: int = 0) -> dict:
    """Predicted peak memory (bytes) of ``finetune_cell`` training ``group_size`` runs together.

    * ``shared``: the encoder's copy (the caller's source model is not counted) and the cached
      encoder outputs of ``n_cached`` slices (0 when the encoder is recomputed per batch);
    * ``state_per_run``: each run's model copy (the whole U-Net), the decoder's gradients and Adam's
      two moments;
    * a training step: every run's saved tensors (``step_activation_bytes``) and the gradients
      alive when backward starts (``backward_transient_bytes``);
    * the held-out pass (``eval_transient_bytes`` on ``eval_batch`` slices), when ``n_eval`` > 0,
      which happens between steps (the step's tensors are gone by then);
    * ``peak`` = shared + group_size x state_per_run + the larger of a step and the held-out pass.

    ``per_run`` (state and a step's saved tensors) is what each further run adds to a training
    step. Checked against measured peaks (CPU: peak resident memory of a fresh process) by
    ``benchmarks/memory_model.py`` and ``tests/test_batched.py``: within 20 % at both presets.
    """
    c_t = int(num_classes or model.num_classes)
    g = int(group_size)
    full, dec = param_bytes(model), param_bytes(model, trainable=True)
    shared = full + int(n_cached) * encoder_bytes_per_slice(model, h, w)
    state = full + 3 * dec
    act = step_activation_bytes(model, h, w, batch_size, c_t)
    step = g * act + backward_transient_bytes(model, h, w, batch_size)
    ev = eval_transient_bytes(model, h, w, min(n_eval, eval_batch(model, h, w, c_t)), c_t, g, n_eval) if n_eval else 0
    return {"shared": shared, "state_per_run": state, "activations_per_run": act, "per_run": state + act,
            "step": step, "eval": ev, "group_size": g, "peak": shared + g * state + max(step, ev)}


def memory_budget(device: torch.device, budget_mb: Optional[float] = None) -> int:
    """Bytes a cell may use: ``budget_mb`` when given; on CUDA the device's free memory
    (``torch.cuda.mem_get_info``) less 10 % and ``CUDA_MARGIN_MB``; on the CPU half the memory
    the system reports available (``MemAvailable``), 8 GB where it cannot be read."""
    if budget_mb is not None:
        if float(budget_mb) <= 0:
            raise ValueError(f"memory_budget_mb must be > 0, got {budget_mb}")
        return int(float(budget_mb) * 2**20)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.9 * free - CUDA_MARGIN_MB * 2**20)
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        return avail // 2
    except (OSError, StopIteration, ValueError):
        return 8 * 2**30


def plan_group_size(n_runs: int, memory, budget: int, device: torch.device, group_size="auto") -> int:
    """How many of a cell's ``n_runs`` runs train together (``memory(g)`` = ``cell_memory``'s dict).

    ``"auto"``: the most runs that fit ``budget``; on the CPU only while one run's training step
    keeps at most ``CPU_GROUP_MAX_ACTIVATION_MB`` for backward, 1 past it. The rule is measured
    (``make bench``, 2 CPU cores): the tutorial's U-Net (12 MB a run) ran 12 runs together at
    1.35x the per-run loop, the paper's at 128 px (about 330 MB a run) ran 4 together at 0.84x:
    a small network leaves the cores idle between small operations, which a group fills; a large
    one already keeps them busy, and a group only enlarges the working set. An explicit
    ``group_size`` is used as given (capped at ``n_runs``). Raises ``MemoryError`` naming the budget
    and what to change when not even the chosen group fits.
    """
    if group_size == "auto":
        g = 1
        small = memory(1)["activations_per_run"] <= CPU_GROUP_MAX_ACTIVATION_MB * 2**20
        if small or device.type != "cpu":
            while g < n_runs and memory(g + 1)["peak"] <= budget:
                g += 1
    else:
        if not isinstance(group_size, (int, np.integer)) or int(group_size) < 1:
            raise ValueError(f"group_size must be 'auto' or a positive integer, got {group_size!r}")
        g = min(int(group_size), n_runs)
    need = memory(g)["peak"]
    if need > budget:
        raise MemoryError(
            f"a group of {g} run(s) needs about {need / 2**20:.0f} MB but the memory budget is {budget / 2**20:.0f} MB; "
            + ("lower group_size, " if group_size != "auto" and g > 1 else "")
            + "lower batch_size or the image size, lower cache_budget_mb, or raise memory_budget_mb")
    return g
