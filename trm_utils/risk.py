"""From transferability map to transfer risk map: hardness (eq. 5) and risk (eq. 6).

They live in ``maps`` with every other map computation; this module keeps the names importable.
"""
from .maps import hardness, risk_from_hardness, risk_map

__all__ = ["hardness", "risk_from_hardness", "risk_map"]
