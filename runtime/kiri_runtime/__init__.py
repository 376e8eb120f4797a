"""Kiri runtime: the model server, artifact fetcher and compressor that run in cloud and edge pods."""

__version__ = "0.1.0"
