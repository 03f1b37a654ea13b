"""The machinery behind ``train.finetune_cell``: a transfer cell's runs fine-tuned as one network.

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
``channels_last``, one backward and one fused Adam step (and bfloat16 autocast where the
processor has native BF16; see ``train.finetune_cell``'s ``precision``).

``tests/test_batched.py`` checks the fast path against per-run ``train.finetune``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .unet import UNet2D


def _pad_amount(model: UNet2D, h: int, w: int):
    m = 2**model.depth
    return (-h) % m, (-w) % m


@torch.no_grad()
def encode(model: UNet2D, x: torch.Tensor) -> list:
    """The frozen encoder's outputs on ``x`` (B x C x H x W), shallowest first, deepest (the
    bottleneck) last, exactly as ``UNet2D.forward`` computes them in eval mode."""
    h, w = x.shape[-2:]
    ph, pw = _pad_amount(model, h, w)
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    outs = []
    for i, block in enumerate(model.encoder):
        x = block(x if i == 0 else F.max_pool2d(x, 2))
        outs.append(x)
    return outs


def encoder_bytes_per_slice(model: UNet2D, h: int, w: int, dtype=torch.float32) -> int:
    """Bytes of the encoder's outputs for one slice (what the cache holds per slice)."""
    ph, pw = _pad_amount(model, h, w)
    hh, ww = h + ph, w + pw
    n = sum(model.base_channels * 2**i * (hh // 2**i) * (ww // 2**i) for i in range(model.depth + 1))
    return n * torch.tensor([], dtype=dtype).element_size()


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


def cache_fits(model: UNet2D, n_slices: int, h: int, w: int, budget_mb: Optional[float]) -> bool:
    """Whether ``n_slices`` slices' encoder outputs fit in ``budget_mb`` megabytes (None: no limit)."""
    if budget_mb is None:
        return True
    return n_slices * encoder_bytes_per_slice(model, h, w) <= float(budget_mb) * 2**20
