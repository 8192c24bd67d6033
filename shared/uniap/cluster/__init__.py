"""Cluster specs and presets."""

from .spec import CLUSTER_PRESETS, ClusterSpec, cluster_preset, load_cluster

__all__ = ["CLUSTER_PRESETS", "ClusterSpec", "cluster_preset", "load_cluster"]
