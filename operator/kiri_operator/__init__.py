"""Kiri operator: reconciles ModelDeployments into cloud and edge workloads."""

__version__ = "0.1.0"
