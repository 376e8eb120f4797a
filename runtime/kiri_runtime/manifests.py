"""The compression manifest: what `kiri compress` publishes and the operator gates on.

Versioned by `schemaVersion`. The operator image loads this module, so it imports only pydantic and the
standard library. Field names are camelCase on the wire (like Kubernetes objects) and snake_case in Python.
Readers ignore unknown fields so that additive changes within v1 do not break older operators; any
incompatible change gets a new schemaVersion.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

SCHEMA_VERSION: Final = "kiri.dev/compression-manifest/v1"
MANIFEST_FILE = "manifest.json"

Method = Literal["int8-dynamic", "int8-static", "fp16", "distilled", "int4", "int8"]
Metric = Literal["cosine", "top1-agreement", "max-abs-error", "kl", "perplexity", "greedy-match"]
Stat = Literal["mean", "min", "p5", "max", "ratio"]
Op = Literal[">=", ">", "<=", "<"]
SourceFormat = Literal["onnx", "torch-export", "torchscript", "factory", "hf", "gguf"]
ModelKind = Literal["tensor", "causal-lm"]
LM_METHODS: Final = ("int4", "int8")
"""Methods only a causal language model has (fp16 serves both kinds)."""
LM_METRICS: Final = ("kl", "perplexity", "greedy-match")
"""Gate metrics of causal language models; top1-agreement serves both kinds (per position for an LM)."""
TENSOR_METRICS: Final = ("cosine", "max-abs-error")


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Gate(_Model):
    """One fidelity condition, e.g. cosine.min >= 0.99.

    `stat` applies to per-sample metrics (cosine); top1-agreement is a single rate and max-abs-error a single
    maximum, so their stat is ignored when evaluated.
    """

    metric: Metric
    stat: Stat = "mean"
    op: Op
    threshold: float

    @model_validator(mode="before")
    @classmethod
    def _error_stat_is_max(cls, data: Any) -> Any:
        # max-abs-error is one number over the whole eval set; "max" says so when no stat was given, as
        # "ratio" does for perplexity (variant perplexity / full model perplexity).
        # The ModelDeployment API defaults every stat to "mean", which for perplexity reads as the ratio.
        if (
            isinstance(data, dict)
            and data.get("metric") == "perplexity"
            and data.get("stat") in (None, "mean")
        ):
            return {**data, "stat": "ratio"}
        if isinstance(data, dict) and data.get("metric") == "max-abs-error" and data.get("stat") is None:
            return {**data, "stat": "max"}
        return data

    def describe(self) -> str:
        return f"{self.metric}.{self.stat}{self.op}{self.threshold:g}"


class VariantSpec(_Model):
    """A variant to build: the input to `kiri compress` (same shape as ModelDeployment spec.edge.variants[])."""

    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    method: Method
    options: dict[str, Any] = Field(default_factory=dict)
    gate: list[Gate] = Field(default_factory=list)


class GpuPack(_Model):
    """The full model built for GPU nodes (`kiri compress --gpu-pack fp16`): an uncompressed tar of an
    onnxruntime-genai model directory built for CUDA, which `kiri serve --device cuda` loads."""

    uri: str = Field(description="Relative to the manifest directory or an absolute URI.")
    sha256: str
    size_bytes: int
    precision: Literal["fp16"] = "fp16"
    execution_provider: Literal["cuda"] = "cuda"
    max_abs_weight_error: float = Field(
        description="Largest difference of a weight from the verified fp32 build's (fp16 rounding)."
    )


class ModelInfo(_Model):
    name: str | None = None
    version: str | None = None
    source_uri: str
    source_sha256: str
    format: SourceFormat
    uri: str = Field(
        description="The fp32 ONNX model, relative to the manifest directory or an absolute URI."
    )
    onnx_sha256: str
    size_bytes: int
    inputs: list[str] = Field(default_factory=list)
    outputs: list[str] = Field(default_factory=list)
    export_max_abs_error: float | None = Field(
        default=None, description="ONNX vs eager PyTorch on the eval inputs; None for ONNX sources."
    )
    kind: ModelKind = Field(
        default="tensor",
        description="causal-lm: `uri` is an uncompressed tar of an onnxruntime-genai model directory "
        "(its variants' are xz-compressed tars).",
    )
    architecture: str | None = Field(default=None, description="causal-lm: the HF architecture.")
    gpu_pack: GpuPack | None = Field(
        default=None, description="causal-lm: the full model for GPU nodes, when the Job was asked for it."
    )


class EvalData(_Model):
    uri: str | None = Field(default=None, description="None when the inputs were synthesized.")
    sha256: str | None = None
    samples: int
    synthetic: bool = False


class LmFidelity(_Model):
    """A causal LM variant against the full model, teacher-forced on the eval texts (docs/manifest.md)."""

    kl_mean: float = Field(description="mean KL(full || variant) of the next-token distributions, nats")
    top1_agreement: float = Field(description="share of positions whose most likely next token agrees")
    perplexity_ratio: float = Field(
        description="variant perplexity / full model perplexity on the eval texts"
    )
    greedy_match: float | None = Field(
        default=None, description="share of the first greedyTokens greedy tokens equal to the full model's"
    )
    positions: int = Field(description="predicted positions scored (over all samples)")
    samples: int = 0
    greedy_tokens: int = 0


class Decode(_Model):
    """Greedy decoding speed of a causal LM variant under onnxruntime-genai on the CPU."""

    decode_tokens_per_s: float = Field(description="tokens after the first / their wall time")
    ttft_ms: float = Field(description="time from the prompt to the first generated token")
    new_tokens: int
    prompt_tokens: int = 0
    threads: int = 1


LORA_LAYOUT_KEY = "loraLayout"
"""`Variant.extra` key of a LoRA-ready language-model variant: its `lora.json` (kiri_runtime/lora_layouts.py)."""


class Baseline(_Model):
    p50_latency_ms: float = Field(
        description="causal-lm: ms per decoded token of the fp32 model (1000 / tok/s)"
    )
    size_bytes: int
    decode: Decode | None = Field(default=None, description="causal-lm: the fp32 model's decode speed.")


class CosineStats(_Model):
    mean: float
    min: float
    p5: float


class Fidelity(_Model):
    cosine: CosineStats
    top1_agreement: float | None = None
    max_abs_error: float
    samples: int = 0


class Latency(_Model):
    p50_ms: float
    ratio_vs_fp32: float = Field(
        description="variant p50 / fp32 p50 measured in the same run; < 1 is faster."
    )


class GateResult(Gate):
    value: float | None = None
    passed: bool


class Candidate(_Model):
    """One configuration tried while tuning a variant."""

    options: dict[str, Any]
    fidelity: Fidelity | None = None
    latency: Latency | None = None
    size_bytes: int | None = None
    passed: bool
    error: str | None = None
    generative: LmFidelity | None = None


class Variant(_Model):
    name: str
    method: Method
    options: dict[str, Any] = Field(default_factory=dict)
    uri: str | None = Field(default=None, description="None when the variant was rejected and not written.")
    sha256: str | None = None
    size_bytes: int | None = None
    size_ratio_vs_fp32: float | None = None
    fidelity: Fidelity | None = None
    latency: Latency | None = None
    gate: list[GateResult] = Field(default_factory=list)
    accepted: bool
    reason: str
    search: list[Candidate] = Field(default_factory=list)
    extra: dict[str, Any] = Field(
        default_factory=dict, description="Method-specific facts (distillation, GGUF transcoding)."
    )
    generative: LmFidelity | None = Field(default=None, description="causal-lm variants: their fidelity.")
    decode: Decode | None = Field(default=None, description="causal-lm variants: decode speed.")


class Manifest(_Model):
    schema_version: Literal["kiri.dev/compression-manifest/v1"] = SCHEMA_VERSION
    model: ModelInfo
    baseline: Baseline
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    seed: int
    device: str = "cpu"
    eval_data: EvalData | None = None
    variants: list[Variant] = Field(default_factory=list)

    def variant(self, name: str) -> Variant | None:
        return next((v for v in self.variants if v.name == name), None)

    def accepted(self) -> list[Variant]:
        return [v for v in self.variants if v.accepted]


def load(path: str | os.PathLike[str]) -> Manifest:
    """Load and validate a manifest file (or a directory holding manifest.json)."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_FILE
    return loads(p.read_text(encoding="utf-8"))


def loads(text: str | bytes) -> Manifest:
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("schemaVersion") != SCHEMA_VERSION:
        found = data.get("schemaVersion") if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"unsupported compression manifest schemaVersion {found!r}; expected {SCHEMA_VERSION!r}"
        )
    return Manifest.model_validate(data)


def dumps(manifest: Manifest) -> str:
    return manifest.model_dump_json(by_alias=True, indent=2) + "\n"


def dump(manifest: Manifest, path: str | os.PathLike[str]) -> Path:
    """Write atomically: readers see the old file or the complete new one, never a partial manifest."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_FILE
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(dumps(manifest))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the operator and runtimes may run as other users
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p
