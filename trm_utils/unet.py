"""The classic 2D U-Net (Ronneberger et al. 2015) with a freezable encoder.

Double 3x3 convolutions per level, 2x2 max-pool down, 2x2 transposed convolution up, skip
concatenation, 1x1 head. One deviation from the 2015 paper, as in most modern
re-implementations: padded ("same") convolutions and BatchNorm after each convolution, so the
output has the input's size and training is stable at small batch sizes. Inputs whose size is
not a multiple of 2**depth are zero-padded and the output cropped back.

``encoder`` = the down path and the bottleneck; ``decoder`` = the up path; ``head`` = the
1x1 classifier. ``freeze_encoder`` freezes the encoder's weights and its BatchNorm statistics.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _Up(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        self.conv = _double_conv(2 * cout, cout)

    def forward(self, x, skip):
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet2D(nn.Module):
    """2D U-Net. ``base_channels=64, depth=4`` is the paper's classic configuration.

    Args:
        in_channels: image channels (1 for one MR modality).
        num_classes: output classes (2 for a binary tissue task, 4 for a tumour task).
        base_channels: channels at the first level; doubled at each level down.
        depth: number of 2x2 poolings (the bottleneck is at 1/2**depth resolution).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, base_channels: int = 64, depth: int = 4):
        super().__init__()
        if depth < 1 or base_channels < 1 or num_classes < 1 or in_channels < 1:
            raise ValueError(
                f"UNet2D needs positive sizes, got in_channels={in_channels}, num_classes={num_classes}, "
                f"base_channels={base_channels}, depth={depth}"
            )
        self.in_channels, self.num_classes = in_channels, num_classes
        self.base_channels, self.depth = base_channels, depth
        chans = [base_channels * 2**i for i in range(depth + 1)]
        self.encoder = nn.ModuleList([_double_conv(in_channels, chans[0])] + [
            _double_conv(chans[i], chans[i + 1]) for i in range(depth)
        ])
        self.decoder = nn.ModuleList([_Up(chans[i + 1], chans[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(chans[0], num_classes, 1)
        self.encoder_frozen = False

    def train(self, mode: bool = True):
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()  # frozen BatchNorm statistics stay fixed in training mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet2D expects B x {self.in_channels} x H x W input, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        m = 2**self.depth
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up in self.decoder:
            x = up(x, skips.pop())
        out = self.head(x)
        return out[..., :h, :w] if (ph or pw) else out


def freeze_encoder(model: UNet2D) -> UNet2D:
    """Freeze the encoder: no gradients for its parameters and fixed BatchNorm statistics.

    The model stays frozen across later ``model.train()`` calls (the paper's fine-tuning:
    only the decoder, and the head, are updated).
    """
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    model.encoder_frozen = True
    model.train(model.training)
    return model


def reset_head(model: UNet2D, num_classes: int) -> UNet2D:
    """Replace the 1x1 head with a freshly initialised one for ``num_classes`` outputs."""
    old = model.head
    model.head = nn.Conv2d(old.in_channels, int(num_classes), 1).to(old.weight.device, old.weight.dtype)
    model.num_classes = int(num_classes)
    return model

