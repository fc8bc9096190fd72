"""Schedules shared by the methods (Laine & Aila ramp-up, as SSL4MIS's utils/ramps.py)."""
from __future__ import annotations

import math


def sigmoid_rampup(current: float, rampup_length: float) -> float:
    """exp(-5 (1 - t)^2) with t = clip(current / length, 0, 1); 1 for a zero length."""
    if rampup_length == 0:
        return 1.0
    t = min(max(current, 0.0), rampup_length) / rampup_length
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def linear_rampup(current: float, rampup_length: float) -> float:
    if rampup_length == 0:
        return 1.0
    return float(min(max(current, 0.0), rampup_length) / rampup_length)
