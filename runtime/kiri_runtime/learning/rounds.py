"""The round record: what `kiri aggregate` writes for each round, and the privacy ledger built from them.

One directory per round under the aggregator's output directory: `rounds/<NNNN>/round.json`, plus
`weights.safetensors` when the round was accepted. The records are the ledger: a site's epsilon is computed from the
rounds it took part in, so the budget survives aggregator restarts (each round is a fresh Job). Imports only
pydantic and the standard library, so the operator can read records.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

SCHEMA_VERSION: Final = "kiri.dev/learning-round/v1"
RECORD_FILE = "round.json"
WEIGHTS_FILE = "weights.safetensors"  # the round's global weights (safetensors), when accepted

RoundStatus = Literal["accepted", "skipped", "refused"]


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class KeptAdapter(_Model):
    """A perSite round's adapter, as its site reported it: it stays on the site (its SuperNode's keep directory,
    served to the site's own edge pods); only these facts leave."""

    file: str  # its name in the site's keep directory (`round-<NNNN>.onnx_adapter`)
    sha256: str
    bytes: int
    held_out_base_perplexity: float  # on the site's own held-out text (one document in ten)
    held_out_adapter_perplexity: float


class Participant(_Model):
    site: str
    samples: int
    upload_bytes: int
    adapter: KeptAdapter | None = None


class SkippedSite(_Model):
    site: str
    reason: str


class Evaluation(_Model):
    loss: float
    accuracy: float | None = None
    samples: int


class Privacy(_Model):
    noise_multiplier: float
    clip_norm: float
    delta: float
    target_epsilon: float | None = None
    # Largest epsilon over all sites after this round, and each participant's own.
    epsilon: float
    per_site: dict[str, float] = Field(default_factory=dict)
    accountant: str = "dp-accounting RDP, Gaussian mechanism per round, no sampling amplification"


class Artifact(_Model):
    path: str
    sha256: str
    bytes: int


class RoundRecord(_Model):
    schema_version: str = SCHEMA_VERSION
    round: int
    status: RoundStatus
    reason: str = ""
    base_sha256: str
    part: dict[str, object] = Field(default_factory=dict)
    aggregation: str = "fedavg"
    # SecAgg+: the server saw only the sum of the sites' updates, never one of them.
    secure_aggregation: bool = False
    participants: list[Participant] = Field(default_factory=list)
    skipped: list[SkippedSite] = Field(default_factory=list)
    eval_before: Evaluation | None = None
    eval_after: Evaluation | None = None
    privacy: Privacy
    model: Artifact | None = None
    # An adapter round whose run config named the served model's LoRA layout: the new global adapter as the
    # edge loads it (`adapter.onnx_adapter`, onnxruntime-genai's format), beside the peft directory `model`.
    served: Artifact | None = None
    # What the round moved through the SuperLink, server side (metering.Traffic): bytes, messages, seconds.
    traffic: dict[str, float] = Field(default_factory=dict)
    opened_at: str
    closed_at: str

    def improvement(self) -> float | None:
        """Accuracy gain on the held-out set (loss decrease when there is no accuracy)."""
        if self.eval_before is None or self.eval_after is None:
            return None
        if self.eval_before.accuracy is not None and self.eval_after.accuracy is not None:
            return self.eval_after.accuracy - self.eval_before.accuracy
        return self.eval_before.loss - self.eval_after.loss


def round_dir(out: Path, number: int) -> Path:
    return out / "rounds" / f"{number:04d}"


def dump(record: RoundRecord, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / RECORD_FILE
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".round-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(record.model_dump(mode="json", by_alias=True), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def load(path: Path) -> RoundRecord:
    return RoundRecord.model_validate_json(path.read_text(encoding="utf-8"))


def history(out: Path) -> list[RoundRecord]:
    records = [load(p) for p in sorted((out / "rounds").glob(f"*/{RECORD_FILE}"))]
    return sorted(records, key=lambda r: r.round)


def participation(records: list[RoundRecord], before_round: int) -> Counter[str]:
    """How many accepted-or-not rounds each site uploaded to: every upload spent privacy, accepted or not."""
    counts: Counter[str] = Counter()
    for r in records:
        if r.round < before_round:
            counts.update(p.site for p in r.participants)
    return counts
