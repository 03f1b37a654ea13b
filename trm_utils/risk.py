"""From transferability map to transfer risk map: hardness (eq. 5) and risk (eq. 6)."""
from __future__ import annotations

import torch


def _check_map(tmap: torch.Tensor, name: str) -> torch.Tensor:
    tmap = torch.as_tensor(tmap)
    if tmap.ndim != 3:
        raise ValueError(f"{name} must be B x H x W, got shape {tuple(tmap.shape)}")
    if not torch.is_floating_point(tmap):
        tmap = tmap.float()
    if not torch.isfinite(tmap).all():
        raise ValueError(f"{name} contains NaN or Inf; transferability maps are finite (log is clamped at 1e-12)")
    return tmap


def hardness(tmap) -> torch.Tensor:
    """Transfer hardness, eq. (5): per-image min-max normalisation, inverted so 1 = hardest.

        H_i(p) = (max_p T_i - T_i(p)) / (max_p T_i - min_p T_i)

    The least transferable pixel of each image gets 1, the most transferable 0. A constant
    map (nothing is harder than anything else) gives H = 0 everywhere.
    """
    tmap = _check_map(tmap, "tmap")
    flat = tmap.reshape(tmap.shape[0], -1)
    tmax = flat.max(dim=1).values[:, None, None]
    tmin = flat.min(dim=1).values[:, None, None]
    span = tmax - tmin
    return torch.where(span > 0, (tmax - tmap) / span.clamp_min(torch.finfo(tmap.dtype).tiny), torch.zeros_like(tmap))


def risk_from_hardness(hard, base: float = 10.0) -> torch.Tensor:
    """Exponential scaling, eq. (6): R = base ** H, so R lies in [1, base]."""
    base = float(base)
    if not base >= 1.0:
        raise ValueError(f"base must be >= 1 so that harder pixels weigh more, got {base}")
    hard = torch.as_tensor(hard)
    return torch.pow(torch.as_tensor(base, dtype=hard.dtype, device=hard.device), hard)


def risk_map(tmap, base: float = 10.0) -> torch.Tensor:
    """Transfer risk map, eq. (6): R_i(p) = base ** H_i(p) with H from eq. (5); in [1, base].

    ``base`` = 10 is our reading of the paper's "exponential scaling with a base of 10".
    """
    return risk_from_hardness(hardness(tmap), base)
