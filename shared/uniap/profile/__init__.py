"""Measured profiles (versioned JSON), training logs, and the harness the adapters measure them with; fitting a
profile to measured training runs prices plans and lives above the planner (uniap.calibrate)."""

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
