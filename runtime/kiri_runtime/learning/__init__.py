"""Federated fine-tuning at the edge with client-level differential privacy, on Flower.

A site's SuperNode runs `site_app` (local training, clipping, SecAgg+ masks); the SuperLink runs `federating`
(admission by privacy budget, the ledger, secure aggregation, the noise, the round record). `kiri learn-round`
submits a round. See docs/learning.md.
"""
