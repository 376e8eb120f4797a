"""Federated fine-tuning at the edge with client-level differential privacy.

`kiri train-edge` trains on a site's local data and uploads only a clipped, noised update; `kiri aggregate`
collects one round of updates, averages them, accounts the privacy spent and publishes the next global model.
See docs/learning.md.
"""
