"""The edge trainer: ask the aggregator for the round, train on local data, upload the privatized update.

What crosses the network from a site is exactly one body per round, built by `deltas.encode`: the noised
update of the trained part, the sample count, the round and the parameters the accountant needs. The site data
is read from a local .npz and never sent. The trainer refuses to train (and so to release anything) when the
round asks for other DP parameters or another trained part than its own configuration, or when the site is
over its privacy budget.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from kiri_runtime import weights as weights_files
from kiri_runtime.learning import deltas
from kiri_runtime.learning.errors import LearningError
from kiri_runtime.learning.loading import load_arrays, load_model, sha256_file
from kiri_runtime.learning.parts import TrainedPart
from kiri_runtime.learning.privatizing import noise_rng, privatize
from kiri_runtime.learning.training import train_local

log = logging.getLogger("kiri.learning.trainer")


@dataclass
class TrainerConfig:
    aggregator: str
    site: str
    token: str = field(repr=False)
    factory: str
    data: Path
    work_dir: Path
    part: TrainedPart
    clip_norm: float
    noise_multiplier: float
    factory_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: Path | None = None
    epochs: int = 1
    learning_rate: float = 0.05
    batch_size: int = 32
    seed: int = 0
    noise_seed: int | None = None
    rounds: int = 1
    connect_timeout: float = 60.0
    poll_interval: float = 0.2


@dataclass
class Upload:
    round: int
    bytes: int
    samples: int
    clipped_from: float
    loss_before: float
    loss_after: float


def _error(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", response.text))
    except ValueError:
        return response.text[:300]


class Trainer:
    def __init__(self, cfg: TrainerConfig, client: httpx.Client | None = None) -> None:
        self.cfg = cfg
        self.client = client or httpx.Client(base_url=cfg.aggregator.rstrip("/"), timeout=30.0)
        self.headers = {"Authorization": f"Bearer {cfg.token}"}
        self.x, self.y = load_arrays(cfg.data, "site data")
        self.weights = cfg.weights
        self.weights_sha = sha256_file(cfg.weights) if cfg.weights is not None else ""

    def _get(self, path: str) -> httpx.Response:
        response = self.client.get(path, params={"site": self.cfg.site}, headers=self.headers)
        if response.status_code >= 400:
            raise LearningError(f"aggregator {path}: {response.status_code} {_error(response)}")
        return response

    def wait_for_round(self, after: int) -> dict[str, Any] | None:
        """The next open round numbered above `after` this site has not uploaded to; None when finished."""
        deadline = time.monotonic() + self.cfg.connect_timeout
        while True:
            try:
                info: dict[str, Any] = self._get("/v1/round").json()
                deadline = time.monotonic() + self.cfg.connect_timeout
            except httpx.TransportError as e:
                if time.monotonic() > deadline:
                    raise LearningError(f"aggregator {self.cfg.aggregator} unreachable: {e}") from None
                info = {}
            if info.get("finished"):
                return None
            if info.get("open") and info["round"] > after and not info.get("submitted"):
                if info.get("eligible"):
                    return info
                log.warning(
                    "round %d: site %s may not take part: %s", info["round"], self.cfg.site, info["reason"]
                )
                after = info["round"]
            time.sleep(self.cfg.poll_interval)

    def _check_round(self, info: dict[str, Any]) -> None:
        cfg = self.cfg
        if info["part"] != cfg.part.describe():
            raise LearningError(
                f"round {info['round']} trains {info['part']}, this site is set to {cfg.part.describe()}"
            )
        if not np.isclose(info["clipNorm"], cfg.clip_norm) or not np.isclose(
            info["noiseMultiplier"], cfg.noise_multiplier
        ):
            raise LearningError(
                f"round {info['round']} asks for clipNorm {info['clipNorm']} noiseMultiplier {info['noiseMultiplier']}, "
                f"this site is set to {cfg.clip_norm} and {cfg.noise_multiplier}; refusing to release an update"
            )

    def _base_weights(self, sha: str) -> Path:
        if self.weights is not None and self.weights_sha == sha:
            return self.weights
        response = self._get("/v1/model")
        got = response.headers.get("X-Kiri-Sha256", "")
        import hashlib

        actual = hashlib.sha256(response.content).hexdigest()
        if actual != sha or got != sha:
            raise LearningError(
                f"global model from the aggregator has sha256 {actual[:12]}, the round's is {sha[:12]}"
            )
        self.cfg.work_dir.mkdir(parents=True, exist_ok=True)
        # Round weights are safetensors; the first round's are the user's file, which may be a torch .pt.
        path = self.cfg.work_dir / f"global-{sha[:16]}{weights_files.suffix_for(response.content)}"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(response.content)
        tmp.replace(path)
        self.weights, self.weights_sha = path, sha
        return path

    def train_round(self, info: dict[str, Any]) -> Upload | None:
        cfg = self.cfg
        number = int(info["round"])
        self._check_round(info)
        weights = self._base_weights(info["baseSha256"])
        module = load_model(cfg.factory, cfg.factory_kwargs, weights, cfg.seed)
        result = train_local(
            module,
            self.x,
            self.y,
            cfg.part,
            epochs=cfg.epochs,
            lr=cfg.learning_rate,
            batch_size=cfg.batch_size,
            seed=cfg.seed + number,
            lora_seed=int(info["loraSeed"]),
        )
        rng = noise_rng(None if cfg.noise_seed is None else cfg.noise_seed + number)
        noised, norm = privatize(result.update, cfg.clip_norm, cfg.noise_multiplier, rng)
        body = deltas.encode(
            deltas.Delta(
                round=number,
                site=cfg.site,
                samples=result.samples,
                base_sha256=info["baseSha256"],
                part=cfg.part.describe(),
                clip_norm=cfg.clip_norm,
                noise_multiplier=cfg.noise_multiplier,
                tensors=noised,
            )
        )
        response = self.client.post(
            f"/v1/rounds/{number}/sites/{cfg.site}/delta",
            content=body,
            headers={**self.headers, "Content-Type": deltas.MEDIA_TYPE},
        )
        if response.status_code == 410:
            log.warning("round %d closed before the update arrived", number)
            return None
        if response.status_code != 202:
            raise LearningError(f"aggregator refused the update: {response.status_code} {_error(response)}")
        log.info(
            "round %d: uploaded %d bytes (%d samples, update norm %.3f clipped to %g, local loss %.4f -> %.4f)",
            number,
            len(body),
            result.samples,
            norm,
            cfg.clip_norm,
            result.loss_before,
            result.loss_after,
        )
        return Upload(number, len(body), result.samples, norm, result.loss_before, result.loss_after)

    def run(self) -> list[Upload]:
        uploads: list[Upload] = []
        last = 0
        for _ in range(self.cfg.rounds):
            info = self.wait_for_round(last)
            if info is None:
                break
            last = int(info["round"])
            upload = self.train_round(info)
            if upload is not None:
                uploads.append(upload)
        return uploads
