"""A round's settings, as Flower hands them to Kiri's ServerApp and ClientApp: the run config.

`kiri learn-round` (and the operator through it) submits each round with `flwr run --run-config`; the
defaults are in the Flower App's `pyproject.toml` (`learning/flower_app/`). Keys are Flower's kebab-case TOML
keys; values are str, int, float or bool. Pure: no flwr, no torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from kiri_runtime.learning import accounting
from kiri_runtime.learning.errors import LearningError
from kiri_runtime.learning.parts import TrainedPart

# FitIns config keys: what the ServerApp (federating) sends and the ClientApp (site_app) reads.
KEY_ROUND = "kiri.round"
KEY_BASE = "kiri.base-weights"  # the global weights file's bytes (safetensors or the user's .pt)
KEY_BASE_SHA = "kiri.base-sha256"
KEY_LORA_SEED = "kiri.lora-seed"
KEY_PART = "kiri.part"
KEY_POLICY = "kiri.policy"  # "perSite": the site keeps what it trained and answers with metrics only

Aggregation = Literal["fedavg", "trimmed-mean"]
AGGREGATIONS: tuple[Aggregation, ...] = ("fedavg", "trimmed-mean")
Policy = Literal["federated", "perSite"]
POLICIES: tuple[Policy, ...] = ("federated", "perSite")


def _get(config: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    value = config.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise LearningError(f"run config {key!r}: expected {kind.__name__}, got {value!r}")
    return value


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def factory_kwargs(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise LearningError(f"factory-kwargs: invalid JSON: {e}") from None
    if not isinstance(value, dict):
        raise LearningError("factory-kwargs: expected a JSON object")
    return value


@dataclass(frozen=True)
class ModelSettings:
    """What both sides need to build the model and its trained part."""

    factory: str
    factory_kwargs: dict[str, Any]
    part: TrainedPart

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> ModelSettings:
        factory = _get(config, "factory", str, "")
        if not factory and _get(config, "part", str, "lora") != "adapter":
            raise LearningError("run config 'factory' is required (pkg.module:function)")
        part = TrainedPart(
            kind=_get(config, "part", str, "lora"),
            names=_names(_get(config, "layers", str, "")),
            rank=_get(config, "lora-rank", int, 4),
        )
        return cls(factory, factory_kwargs(_get(config, "factory-kwargs", str, "{}")), part)


@dataclass(frozen=True)
class TrainingSettings:
    epochs: int
    learning_rate: float
    batch_size: int

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> TrainingSettings:
        out = cls(
            epochs=_get(config, "epochs", int, 1),
            learning_rate=_get(config, "learning-rate", float, 0.05),
            batch_size=_get(config, "batch-size", int, 32),
        )
        if out.epochs < 1 or out.learning_rate <= 0 or out.batch_size < 1:
            raise LearningError(
                f"need epochs >= 1, learning-rate > 0, batch-size >= 1 (got {out.epochs}, "
                f"{out.learning_rate}, {out.batch_size})"
            )
        return out


@dataclass(frozen=True)
class RoundSettings:
    """The ServerApp's side of a round."""

    model: ModelSettings
    weights: str  # the base weights file (the last accepted round's, or the user's first)
    eval: str  # held-out .npz
    out: str  # rounds/<NNNN>/{round.json,weights.safetensors}
    round: int  # 0: the next after the records in `out`
    sites: tuple[str, ...]
    min_clients: int
    deadline_seconds: float
    clip_norm: float
    noise_multiplier: float
    dp_delta: float
    target_epsilon: float | None
    secure_aggregation: bool
    policy: Policy
    aggregation: Aggregation
    trim_fraction: float
    server_lr: float
    clipping_range: float  # SecAgg+ quantises each value in [-range, range]
    ledger: str  # KIND:TARGET, or "" for ledger.json in `out`
    ledger_factory: str  # module:function that opens KIND ledgers (the operator's ConfigMap ledger)
    ledger_owner: str
    transcript: str  # a directory for every message the server received (an audit of what it held), or ""
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # the run config as given

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> RoundSettings:
        target = _get(config, "target-epsilon", float, 0.0)
        out = cls(
            model=ModelSettings.from_run_config(config),
            weights=_get(config, "weights", str, ""),
            eval=_get(config, "eval", str, ""),
            out=_get(config, "out", str, ""),
            round=_get(config, "round", int, 0),
            sites=_names(_get(config, "sites", str, "")),
            min_clients=_get(config, "min-clients", int, 2),
            deadline_seconds=_get(config, "deadline-seconds", float, 600.0),
            clip_norm=_get(config, "clip-norm", float, 1.0),
            noise_multiplier=_get(config, "noise-multiplier", float, 1.0),
            dp_delta=_get(config, "dp-delta", float, 1e-5),
            target_epsilon=target if target > 0 else None,
            secure_aggregation=_get(config, "secure-aggregation", bool, True),
            policy=_get(config, "policy", str, "federated"),
            aggregation=_get(config, "aggregation", str, "fedavg"),
            trim_fraction=_get(config, "trim-fraction", float, 0.1),
            server_lr=_get(config, "server-learning-rate", float, 1.0),
            clipping_range=_get(config, "clipping-range", float, 8.0),
            ledger=_get(config, "ledger", str, ""),
            ledger_factory=_get(config, "ledger-factory", str, ""),
            ledger_owner=_get(config, "ledger-owner", str, ""),
            transcript=_get(config, "transcript", str, ""),
            raw=dict(config),
        )
        out.check()
        return out

    def check(self) -> None:
        if not self.eval or not self.out:
            raise LearningError("run config 'eval' and 'out' are required")
        if not self.weights and self.model.part.kind != "adapter":  # an adapter's round 1 starts untrained
            raise LearningError("run config 'weights' is required (the round's base weights)")
        if self.min_clients < 1:
            raise LearningError(f"min-clients must be >= 1, got {self.min_clients}")
        if self.sites and self.min_clients > len(self.sites):
            raise LearningError(
                f"min-clients {self.min_clients} exceeds the {len(self.sites)} expected sites"
            )
        if self.policy not in POLICIES:
            raise LearningError(f"policy {self.policy!r}: use one of {', '.join(POLICIES)}")
        if self.aggregation not in AGGREGATIONS:
            raise LearningError(f"aggregation {self.aggregation!r}: use one of {', '.join(AGGREGATIONS)}")
        if self.policy == "federated" and self.aggregation == "trimmed-mean" and self.secure_aggregation:
            # SecAgg+ hands the server the sum and nothing else: no per-coordinate order statistics exist.
            raise LearningError(
                "aggregation trimmed-mean needs each site's update in the clear; it cannot run with "
                "secure-aggregation (SecAgg+ only reveals the sum): use fedavg, or turn secure aggregation off"
            )
        if not self.clip_norm > 0 or self.noise_multiplier < 0:
            raise LearningError("clip-norm must be > 0 and noise-multiplier >= 0")
        if self.deadline_seconds <= 0:
            raise LearningError("deadline-seconds must be > 0")
        if self.policy == "federated" and self.secure_aggregation and self.min_clients < 2:
            raise LearningError("secure aggregation needs min-clients >= 2: the sum of one site is that site")
        accounting.epsilon(self.noise_multiplier, 1, self.dp_delta)  # validates delta
