"""Measured profiles (versioned JSON), training logs and the calibration fitted to them."""

from .schema import (
    PROFILE_VERSION,
    Calibration,
    CalibrationRun,
    CollectiveBandwidth,
    LayerTiming,
    OptimizerTiming,
    Profile,
)

__all__ = [
    "PROFILE_VERSION",
    "Calibration",
    "CalibrationRun",
    "CollectiveBandwidth",
    "LayerTiming",
    "OptimizerTiming",
    "Profile",
]
