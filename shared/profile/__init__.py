"""Measured profiles (versioned JSON) and the analytic estimate used where nothing was measured."""
from .schema import PROFILE_VERSION, CollectiveBandwidth, LayerTiming, Profile

__all__ = ["PROFILE_VERSION", "CollectiveBandwidth", "LayerTiming", "Profile"]
