"""trm_utils: shared code of the Transfer Risk Map tutorial.

LEEP and pixel-LEEP (eqs. 2-3), transferability maps (eq. 4; the dataset-level map, the default,
and the per-image variant), hardness and transfer risk maps (eqs. 5-6), the risk-map-weighted loss
and its baselines (eq. 7), the 2D U-Net with a frozen encoder, Dice, and the fine-tuning protocol.
Notebooks import from here; tests cover it. The modules, from the bottom floor up, are listed in
README.md ("The library"); ``tests/test_house.py`` keeps their imports pointing down.
"""
import torch as _torch

# Trained weights and their gradients drift into subnormal floats, which CPU kernels process
# 3-10x slower; flushing them to zero changes nothing measurable and keeps runs fast.
_torch.set_flush_denormal(True)

from .batched import finetune_cell
from .leep import PixelLEEP, leep, pixel_leep
from .losses import METHODS, class_weights, get_method, method_loss, weighted_cross_entropy
from .maps import (READINGS, PatchLEEP, dataset_transferability_map, hardness, risk_from_hardness, risk_map,
                   transferability_map, transferability_maps, variance_explained)
from .metrics import dice_per_class, mean_foreground_dice
from .predict import evaluate, predict_probs, stack_data
from .train import finetune, train_source
from .unet import UNet2D, freeze_encoder, reset_head
from .utils import REPO_ROOT, get_device, resolve_path, seed_everything

__version__ = "0.1.0"

__all__ = [
    "PixelLEEP", "leep", "pixel_leep",
    "READINGS", "PatchLEEP", "dataset_transferability_map", "transferability_map", "transferability_maps",
    "variance_explained", "hardness", "risk_from_hardness", "risk_map",
    "METHODS", "class_weights", "get_method", "method_loss", "weighted_cross_entropy",
    "dice_per_class", "mean_foreground_dice",
    "evaluate", "predict_probs", "stack_data",
    "finetune", "train_source", "finetune_cell",
    "UNet2D", "freeze_encoder", "reset_head",
    "REPO_ROOT", "get_device", "resolve_path", "seed_everything",
]
